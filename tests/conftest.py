"""Every test runs XLA on the CPU backend unless it starts its own subprocess."""

import os

os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("CPU_NUM_DEVICES", "1")

# Autograd's engine sizes its device queues at the first backward pass: a test that runs one on
# the CPU before the XLA runtime starts would leave XLA backward impossible in this worker.
# (SPMD, which must start before any device use, runs in tests' own subprocesses.)
import torch_xla  # noqa: E402

torch_xla.device()
