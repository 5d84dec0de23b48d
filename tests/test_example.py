"""The digits example trains, evaluates and predicts end to end, as `make demo` runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "digits.py")


@pytest.mark.parametrize("layout, devices", [
    ([], "1"),
    (["--spmd"], "4"),
    (["--no-tpu", "--processes", "2"], "1"),
], ids=["xla", "spmd4", "gloo2"])
def test_digits_example_learns_held_out_digits(tmp_path, layout, devices):
    result = subprocess.run(
        [sys.executable, EXAMPLE, "--model-dir", str(tmp_path), "--steps", "400", *layout],
        env=dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES=devices),
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    first, last = map(float, re.search(r"loss fell from ([\d.]+) to ([\d.]+)", result.stdout).groups())
    assert last < 0.25 * first
    accuracy = float(re.search(r"held-out accuracy ([\d.]+)", result.stdout).group(1))
    assert accuracy > 0.9
    predicted = re.search(r"predicted 360 digits, \d+ correct; first five: (\[.*\])", result.stdout)
    served = re.search(r"served from the export, first five: (\[.*\])", result.stdout)
    assert predicted and served and served.group(1) == predicted.group(1)
