"""Exact resume when the input draws random numbers on the host: input_fn's noise, a random
augmentation per example in the Dataset (torch, Python and NumPy draws) and dropout. A run
SIGKILLed at random moments and restarted each time ends bit for bit like one never
interrupted, on one XLA device and a 4-device SPMD mesh here, with training replayed
(TPUConfig(replay_training)) in test_random_input_resume_replay.py, on plain PyTorch and 2 gloo
replicas in test_random_input_resume_torch.py (random_input_job.py is the job; three files,
so that two test workers share the work)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import same_values

JOB = os.path.join(os.path.dirname(__file__), "random_input_job.py")
MAX_STEPS = 150
KILLS = 10


def _start(model_dir, layout: str, steps: int = MAX_STEPS, window: int = 3) -> subprocess.Popen:
    env = dict(os.environ, PJRT_DEVICE="CPU", PYTHONPATH=os.path.dirname(__file__),
               CPU_NUM_DEVICES="4" if layout == "spmd4" else "1")
    return subprocess.Popen([sys.executable, JOB, str(model_dir), layout, str(steps),
                             str(window)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _final(model_dir, steps: int = MAX_STEPS) -> dict:
    """The run's last checkpoint (model_dir: a folder, or a bucket's URL)."""
    import fsspec

    with fsspec.open(f"{model_dir}/model.ckpt-{steps}.pt", "rb") as handle:
        return torch.load(handle, weights_only=True)


def _run_to_end(model_dir, layout: str, steps: int = MAX_STEPS) -> None:
    job = _start(model_dir, layout, steps)
    stdout, stderr = job.communicate(timeout=600)
    assert job.returncode == 0 and f"done {steps}" in stdout, stderr[-3000:]


def _kill_somewhere_in_the_next_windows(job: subprocess.Popen, chooser: random.Random) -> None:
    """Lets the job run one to three windows past its first window end, then kills it at a
    random moment of up to one and a half windows later (a step, a checkpoint write, a window
    end)."""
    first, seen, window_seconds = None, 0.0, 0.0
    extra = 3 * chooser.randint(1, 3)
    for line in job.stdout:
        if not line.startswith("step "):
            continue
        step, now = int(line.split()[1]), time.perf_counter()
        if first is None:
            first = step
        else:
            window_seconds = now - seen
        seen = now
        if step >= first + extra:
            break
    time.sleep(chooser.uniform(0.0, 1.5 * window_seconds))
    os.killpg(job.pid, signal.SIGKILL)  # the whole job at once, replicas included
    job.wait(timeout=60)
    assert job.returncode == -signal.SIGKILL, job.stderr.read()[-3000:]


def sigkills_then_a_restart_end_bit_for_bit(tmp_path, layout: str, model_dir=None,
                                            restart_after: float = 0.0, kills: int = KILLS,
                                            steps: int = MAX_STEPS) -> None:
    """`kills` runs of the job in `model_dir` (a folder by default), each with windows of 2-4
    steps and SIGKILLed at a random moment, each restarted `restart_after` seconds later, then
    one to the end (`steps`): its final checkpoint equals an uninterrupted run's (windows of
    3), every tensor and RNG state."""
    _run_to_end(tmp_path / "uninterrupted", layout, steps)
    chooser = random.Random(f"kills-{layout}")
    model_dir = model_dir or tmp_path / "killed"
    for _ in range(kills):
        # each restart takes windows of 2 to 4 steps: batches made ahead of a checkpoint must
        # not change what the resumed run draws
        _kill_somewhere_in_the_next_windows(
            _start(model_dir, layout, steps, window=chooser.randint(2, 4)), chooser)
        time.sleep(restart_after)
    _run_to_end(model_dir, layout, steps)
    resumed = _final(model_dir, steps)
    uninterrupted = _final(tmp_path / "uninterrupted", steps)
    assert same_values(resumed, uninterrupted)
    if os.path.isdir(model_dir):
        assert not [name for name in os.listdir(model_dir) if name.startswith(".tmp-")]


@pytest.mark.parametrize("layout, kills, steps", [
    ("xla", 5, 90),  # 10 kills over 150 steps on one XLA device: test_object_storage_faults.py
    ("spmd4", KILLS, MAX_STEPS)])
def test_sigkills_at_random_moments_then_a_restart_end_bit_for_bit_on_xla(tmp_path, layout,
                                                                         kills, steps):
    sigkills_then_a_restart_end_bit_for_bit(tmp_path, layout, kills=kills, steps=steps)
