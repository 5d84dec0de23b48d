"""Every test runs XLA on the CPU backend unless it starts its own subprocess."""

import os

os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("CPU_NUM_DEVICES", "1")
