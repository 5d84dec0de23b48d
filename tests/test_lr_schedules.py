"""TF's learning-rate decays as torch schedulers give, step by step, the rates TF's own
tf.compat.v1.train functions give (computed by TensorFlow in a process of its own), and the
hooks' arguments are checked as their docstrings say."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from torch_tpu_estimator import StopAtStepHook
from torch_tpu_estimator.lr_schedules import ExponentialDecay, PolynomialDecay

STEPS = 40
CASES = {
    "exponential": dict(kind="exponential", decay_steps=7, decay_rate=0.5, staircase=False),
    "exponential_staircase": dict(kind="exponential", decay_steps=7, decay_rate=0.5,
                                  staircase=True),
    "polynomial": dict(kind="polynomial", decay_steps=30, end_learning_rate=0.001, power=2.0,
                       warmup_steps=0),
    "bert_warmup": dict(kind="polynomial", decay_steps=30, end_learning_rate=0.0, power=1.0,
                        warmup_steps=5),
}

TF_RATES = r"""
import json, sys
import tensorflow as tf
cases, steps = json.loads(sys.argv[1]), int(sys.argv[2])
rates = {}
for name, case in cases.items():
    rows = []
    for step in range(steps):
        if case["kind"] == "exponential":
            rate = tf.compat.v1.train.exponential_decay(0.1, step, case["decay_steps"],
                                                        case["decay_rate"], case["staircase"])
        else:  # BERT's optimization.py: the polynomial decay, then a linear warmup over it
            rate = tf.compat.v1.train.polynomial_decay(0.1, step, case["decay_steps"],
                                                       case["end_learning_rate"], case["power"])
            if step < case["warmup_steps"]:
                rate = 0.1 * step / case["warmup_steps"]
        rows.append(float(rate() if callable(rate) else rate))
    rates[name] = rows
print(json.dumps(rates))
"""


@pytest.fixture(scope="module")
def tf_rates():
    result = subprocess.run([sys.executable, "-c", TF_RATES, json.dumps(CASES), str(STEPS)],
                            capture_output=True, text=True, timeout=300,
                            env={"CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3",
                                 "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(CASES))
def test_tf_decays_give_tf_s_rates_at_every_step(tf_rates, name):
    case = dict(CASES[name])
    kind = case.pop("kind")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    schedule = (ExponentialDecay if kind == "exponential" else PolynomialDecay)(optimizer, **case)
    ours = []
    for _ in range(STEPS):
        ours.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    # TF computes in float32 tensors, torch's schedulers in Python floats
    assert ours == pytest.approx(tf_rates[name], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("kwargs", [{}, {"num_steps": 1, "last_step": 2}])
def test_stop_at_step_hook_takes_exactly_one_of_its_arguments(kwargs):
    with pytest.raises(ValueError, match="exactly one of num_steps and last_step"):
        StopAtStepHook(**kwargs)
