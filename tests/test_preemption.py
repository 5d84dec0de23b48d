"""Preemption and hangs: SIGTERM ends training with a checkpoint and a restart continues bit for
bit; a replica that hangs (asleep in model_fn, or stopped) ends the job after the replica
timeout with an error naming it, and no process is left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import same_values

# A training job in a fresh interpreter. argv: model_dir, layout ("xla" or "gloo2"), and when
# to send SIGTERM: "never", or the step (counted in replica 1's model_fn calls for gloo2, in the
# only replica's for xla) at which SIGTERM reaches the process a scheduler would signal: the
# training process itself, or the launcher of the gloo replicas.
TRAIN = r"""
import json, os, signal, sys
from helpers import adam_with_schedule, make_data, make_estimator, model_fn
from torch_tpu_estimator import Hook
model_dir, layout, term_at = sys.argv[1], sys.argv[2], sys.argv[3]
launcher = os.getpid()
calls = [0]

class StepCounter(Hook):  # its attributes come back from the chief replica to this process
    steps = 0
    def after_window(self, context, window):
        self.steps += window.last_step - window.first_step

def signalling_model_fn(model, features, labels, mode, params):
    calls[0] += 1
    if term_at != "never" and calls[0] == int(term_at) and params["context"].replica_id == (
            1 if layout == "gloo2" else 0):
        os.kill(launcher, signal.SIGTERM)
    return model_fn(model, features, labels, mode, params)

if os.environ.get("SLOW_UPLOAD_SECONDS"):  # a bucket far away: each upload takes this long
    import time
    from torch_tpu_estimator.state.stores import ObjectStore
    upload = ObjectStore.upload
    def slow_upload(self, *args, **kwargs):
        time.sleep(float(os.environ["SLOW_UPLOAD_SECONDS"]))
        upload(self, *args, **kwargs)
    ObjectStore.upload = slow_upload

gloo = {"use_tpu": False, "num_shards": 2} if layout == "gloo2" else {}
estimator = make_estimator(model_dir, fn=signalling_model_fn, optimizer_fn=adam_with_schedule,
                           dropout=0.3, iterations_per_loop=3, save_checkpoints_steps=None,
                           keep_checkpoint_max=None, **gloo)
counter = StepCounter()
estimator.train(lambda params: make_data(60), max_steps=17, hooks=[counter])
print(json.dumps({"steps_run": counter.steps}))
"""


def _train(model_dir, layout: str, term_at: str, **environment) -> subprocess.CompletedProcess:
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="1",
               PYTHONPATH=os.path.dirname(__file__), **environment)
    return subprocess.run([sys.executable, "-c", TRAIN, str(model_dir), layout, term_at],
                          env=env, capture_output=True, text=True, timeout=600)


def _final_state(model_dir) -> dict:
    """The checkpoint of step 17 in model_dir (a folder, or a bucket's URL)."""
    import fsspec

    with fsspec.open(f"{model_dir}/model.ckpt-17.pt", "rb") as handle:
        return torch.load(handle, weights_only=True)



# xla: SIGTERM in step 8 -> the step finishes, the checkpoint of step 8 is written.
# gloo2: replicas agree at the window end: windows of 3 end at 9 -> checkpoint of step 9.
STOPPED_AT = {"xla": 8, "gloo2": 9}


@pytest.mark.parametrize("layout", ["xla", "gloo2"])
def test_sigterm_writes_a_checkpoint_and_the_restart_continues_bit_for_bit(tmp_path, layout):
    uninterrupted = _train(tmp_path / "uninterrupted", layout, "never")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    terminated = _train(tmp_path / "terminated", layout, "8")
    assert terminated.returncode == 128 + signal.SIGTERM, terminated.stderr[-3000:]
    stopped = STOPPED_AT[layout]
    assert f"SIGTERM: stopped at global step {stopped} and wrote its checkpoint" in \
        terminated.stderr
    assert sorted(name for name in os.listdir(tmp_path / "terminated")
                  if name.startswith("model.ckpt")) == [f"model.ckpt-{stopped}.pt"]

    restarted = _train(tmp_path / "terminated", layout, "never")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert json.loads(restarted.stdout.splitlines()[-1]) == {"steps_run": 17 - stopped}
    resumed, expected = _final_state(tmp_path / "terminated"), _final_state(
        tmp_path / "uninterrupted")
    for key in ("global_step", "model", "update", "input"):
        assert same_values(resumed[key], expected[key]), key


HANG = r"""
import json, os, signal, sys, time
from helpers import child_pids, make_data, make_estimator, model_fn
how, model_dir = sys.argv[1], sys.argv[2]
calls = [0]

def hanging_model_fn(model, features, labels, mode, params):
    calls[0] += 1
    if params["context"].replica_id == 1 and calls[0] == 3:
        if how == "sleep":
            time.sleep(600)
        else:
            os.kill(os.getpid(), signal.SIGSTOP)
    return model_fn(model, features, labels, mode, params)

estimator = make_estimator(model_dir, use_tpu=False, num_shards=2, fn=hanging_model_fn,
                           replica_timeout_secs=8)
started = time.monotonic()
try:
    estimator.train(lambda params: make_data(64), steps=10)
    outcome = {"error": None}
except Exception as error:
    outcome = {"type": type(error).__name__, "error": str(error)}
outcome.update(seconds=time.monotonic() - started, children=child_pids())
print(json.dumps(outcome))
"""


@pytest.mark.parametrize("how", ["sleep", "sigstop"])
def test_a_hung_replica_ends_the_job_after_the_timeout_naming_it(tmp_path, how):
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="1",
               PYTHONPATH=os.path.dirname(__file__))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", HANG, how, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["type"] == "ReplicaHungError"
    assert outcome["error"].startswith("no replica made progress for 8 s "
                                       "(TPUConfig.replica_timeout_secs): replica 1 was last in "
                                       "model_fn (step 3)")
    if how == "sigstop":
        assert "its process is stopped (SIGSTOP or a debugger)" in outcome["error"]
    assert outcome["children"] == []
    assert 8 <= outcome["seconds"] < 60 and time.monotonic() - started < 120


def test_sigterm_while_a_checkpoint_uploads_publishes_it_before_exiting(tmp_path, bucket):
    """model_dir in a bucket whose uploads take 2 s: SIGTERM in step 8 -> the checkpoint of
    step 8 is uploaded and listed before the process exits; the restart ends bit for bit."""
    import fsspec

    uninterrupted = _train(tmp_path / "uninterrupted", "xla", "never")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    model_dir = f"{bucket}/terminated"
    terminated = _train(model_dir, "xla", "8", SLOW_UPLOAD_SECONDS="2")
    assert terminated.returncode == 128 + signal.SIGTERM, terminated.stderr[-3000:]
    index = json.loads(fsspec.filesystem("s3", skip_instance_cache=True).cat_file(
        f"{model_dir}/checkpoint.json"))
    assert index["checkpoints"] == ["model.ckpt-8.pt"]

    restarted = _train(model_dir, "xla", "never")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    resumed, expected = _final_state(model_dir), _final_state(tmp_path / "uninterrupted")
    for key in ("global_step", "model", "update", "input"):
        assert same_values(resumed[key], expected[key]), key
