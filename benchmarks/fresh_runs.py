"""What the benchmark scripts share: one measurement in a fresh interpreter, and a summary of
repeated measurements as median (min-max)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys


def run_fresh(script: str, options: list[str], env: dict[str, str], what: str) -> dict:
    """Runs `script` with `options` in a new interpreter; returns the JSON it prints last."""
    done = subprocess.run([sys.executable, script, *options], env=env, capture_output=True,
                          text=True, timeout=3600)
    if done.returncode:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(values: list[float]) -> str:
    """Median (min-max), three decimals."""
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"
