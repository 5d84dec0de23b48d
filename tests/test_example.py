"""The digits example trains, evaluates and predicts end to end, as `make demo` runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "digits.py")


@pytest.mark.parametrize("layout, devices", [
    ([], "1"),
    (["--spmd"], "4"),
    (["--no-tpu", "--processes", "2"], "1"),
    (["--bf16"], "1"),
], ids=["xla", "spmd4", "gloo2", "bf16"])
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
    # bfloat16 computes, float32 keeps the weights (and the Adam moments)
    saved = torch.load(sorted(tmp_path.glob("model.ckpt-*.pt"))[-1], weights_only=True)
    assert {value.dtype for value in saved["model"].values()} == {torch.float32}
    assert {value.dtype for state in saved["update"]["optimizers"]["default"]["state"].values()
            for key, value in state.items() if key != "step"} == {torch.float32}
