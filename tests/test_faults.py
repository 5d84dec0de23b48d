"""Crashes and damaged files: a run killed with SIGKILL and restarted ends bit for bit where an
uninterrupted run ends, and a damaged checkpoint is reported and skipped, never deleted."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import make_data, make_estimator

# One training job, run in a fresh interpreter, that kills itself with SIGKILL at the point named
# by argv[2]: "mid-window" (in the 8th step, inside a window that follows a checkpoint),
# "mid-write" (half way through writing the second checkpoint), "after-save" (just after the
# second checkpoint is complete), or "never".
TRAIN = """
import json, os, signal, sys, torch
from helpers import adam_with_schedule, make_data, make_estimator, model_fn
from torch_tpu_estimator import CheckpointSaverListener
model_dir, kill_at = sys.argv[1], sys.argv[2]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
steps = [0]

def counting_model_fn(model, features, labels, mode, params):
    steps[0] += 1
    if kill_at == "mid-window" and steps[0] == 8:
        die()
    return model_fn(model, features, labels, mode, params)

saves = [0]
real_save = torch.save

def save(state, handle, *args, **kwargs):
    if isinstance(state, dict) and "global_step" in state:
        saves[0] += 1
        if kill_at == "mid-write" and saves[0] == 2:
            handle.write(b"PK" + b"\\0" * 4096)
            handle.flush()
            die()
    return real_save(state, handle, *args, **kwargs)

torch.save = save

class KillAfterSave(CheckpointSaverListener):
    def after_save(self, context, path):
        if kill_at == "after-save" and saves[0] == 2:
            die()

estimator = make_estimator(model_dir, fn=counting_model_fn, optimizer_fn=adam_with_schedule,
                           dropout=0.3, iterations_per_loop=3, save_checkpoints_steps=3,
                           keep_checkpoint_max=None)
estimator.train(lambda params: make_data(60), max_steps=17, saving_listeners=[KillAfterSave()])
print(json.dumps({"steps_run": steps[0]}))
"""


def _train(model_dir, kill_at: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="1",
               PYTHONPATH=os.path.dirname(__file__))
    return subprocess.run([sys.executable, "-c", TRAIN, str(model_dir), kill_at], env=env,
                          capture_output=True, text=True, timeout=600)


def _final_state(model_dir) -> dict:
    return torch.load(os.path.join(model_dir, "model.ckpt-17.pt"), weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("uninterrupted")
    result = _train(model_dir, "never")
    assert result.returncode == 0, result.stderr[-3000:]
    return _final_state(model_dir)


# Windows end at steps 3, 6, 9, ..., each saving a checkpoint. What the restart must replay:
# killed in step 8 -> from step 6; while writing step 6's checkpoint -> from step 3; just after
# writing it -> from step 6.
STEPS_REPLAYED = {"mid-window": 11, "mid-write": 14, "after-save": 11}


@pytest.mark.parametrize("kill_at", ["mid-window", "mid-write", "after-save"])
def test_sigkilled_training_restarted_ends_bit_for_bit_like_an_uninterrupted_run(
        tmp_path, uninterrupted, kill_at):
    killed = _train(tmp_path, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "model.ckpt-17.pt").exists()

    restarted = _train(tmp_path, "never")

    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert json.loads(restarted.stdout.splitlines()[-1]) == {"steps_run": STEPS_REPLAYED[kill_at]}
    resumed = _final_state(tmp_path)
    assert resumed["global_step"] == uninterrupted["global_step"] == 17
    for name, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    for index, value in uninterrupted["update"]["optimizers"]["default"]["state"].items():
        for key, tensor in value.items():
            assert torch.equal(
                torch.as_tensor(resumed["update"]["optimizers"]["default"]["state"][index][key]),
                torch.as_tensor(tensor)), (index, key)
    assert resumed["update"]["schedulers"] == uninterrupted["update"]["schedulers"]
    assert resumed["input"] == uninterrupted["input"]
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]


def _damage(path, how: str) -> None:
    data = bytearray(open(path, "rb").read())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:  # one flipped byte in the middle: same size, still a zip archive
        data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "flipped-byte"])
def test_a_damaged_latest_checkpoint_is_named_skipped_and_kept(tmp_path, caplog, how):
    data = make_data(64)
    reference = make_estimator(tmp_path / "reference", save_checkpoints_steps=4,
                               iterations_per_loop=4, dropout=0.3)
    reference.train(lambda params: data, max_steps=12)
    estimator = make_estimator(tmp_path / "damaged", save_checkpoints_steps=4,
                               iterations_per_loop=4, dropout=0.3)
    estimator.train(lambda params: data, max_steps=8)
    damaged = tmp_path / "damaged" / "model.ckpt-8.pt"
    _damage(damaged, how)
    damaged_bytes = damaged.read_bytes()

    with caplog.at_level(logging.WARNING, logger="torch_tpu_estimator"):
        assert estimator.latest_checkpoint() == str(tmp_path / "damaged" / "model.ckpt-4.pt")
        assert estimator.evaluate(lambda params: data, steps=1)["global_step"] == 4
    assert f"Checkpoint {damaged} is damaged" in caplog.text
    assert damaged.read_bytes() == damaged_bytes  # reported, never deleted or repaired

    estimator.train(lambda params: data, max_steps=12)  # resumes from step 4
    for name in reference.get_variable_names():
        assert (estimator.get_variable_value(name) == reference.get_variable_value(name)).all()
    # the new checkpoint of step 8 did not overwrite the damaged one: it was moved aside
    assert (tmp_path / "damaged" / "model.ckpt-8.pt.damaged").read_bytes() == damaged_bytes


def test_when_every_checkpoint_is_damaged_training_refuses_to_start_afresh(tmp_path):
    estimator = make_estimator(tmp_path, save_checkpoints_steps=4, keep_checkpoint_max=1)
    estimator.train(lambda params: make_data(32), max_steps=4)
    _damage(tmp_path / "model.ckpt-4.pt", "flipped-byte")
    damaged_bytes = (tmp_path / "model.ckpt-4.pt").read_bytes()
    with pytest.raises(ValueError, match=r"every checkpoint listed in .*checkpoint\.json is "
                                         r"damaged \(model\.ckpt-4\.pt\): nothing to resume from"):
        estimator.train(lambda params: make_data(32), max_steps=8)
    assert (tmp_path / "model.ckpt-4.pt").read_bytes() == damaged_bytes


def test_an_unreadable_checkpoint_given_by_path_is_a_clear_error(tmp_path):
    """Listed in its folder's index, the digest names the damage; elsewhere the reader does."""
    estimator = make_estimator(tmp_path / "model", save_checkpoints_steps=4)
    estimator.train(lambda params: make_data(32), max_steps=4)
    listed = tmp_path / "model" / "model.ckpt-4.pt"
    _damage(listed, "truncated")
    with pytest.raises(ValueError, match=r"checkpoint '.*model\.ckpt-4\.pt' is damaged: its "
                                         r"SHA-256 differs from the one recorded"):
        estimator.evaluate(lambda params: make_data(8), checkpoint_path=str(listed))
    (tmp_path / "loose").mkdir()
    loose = tmp_path / "loose" / "model.ckpt-4.pt"
    loose.write_bytes(listed.read_bytes())
    with pytest.raises(ValueError, match=r"checkpoint '.*model\.ckpt-4\.pt' cannot be read "
                                         r"\(truncated, corrupt or not readable\)"):
        estimator.evaluate(lambda params: make_data(8), checkpoint_path=str(loose))
