"""A replica that fails ends the whole multi-process job: the caller gets that replica's error
(not a peer's broken-connection error), and no replica process is left behind.

Each scenario runs in a fresh interpreter: the estimator forks its gloo replicas, which a
process that already ran backward on an XLA device cannot do (tested last, here).
"""

from __future__ import annotations

import pytest
from helpers import make_data, make_estimator, run_fresh

SCENARIO = r"""
import json, os, signal, sys
from helpers import child_pids, make_data, make_estimator, model_fn
from torch.utils.data import TensorDataset

def fails_on_replica_1(action):
    def model_fn_that_fails(model, features, labels, mode, params):
        if params["context"].replica_id == 1:
            action()
        return model_fn(model, features, labels, mode, params)
    return model_fn_that_fails

def bad_features():
    raise ValueError("bad features on replica 1")

def shard_input_fn(params):
    if params["context"].input_pipeline_id == 1:
        raise FileNotFoundError("shard 1 is missing")
    data = make_data(64)
    return TensorDataset(*[t[params["context"].input_pipeline_id::2] for t in data.tensors])

scenario, replicas, model_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fn = {"raise": fails_on_replica_1(bad_features),
      "kill": fails_on_replica_1(lambda: os.kill(os.getpid(), signal.SIGKILL))}.get(scenario, model_fn)
estimator = make_estimator(model_dir, use_tpu=False, num_shards=replicas, fn=fn,
                           per_host_input_for_training=scenario != "input_fn")
outcome = {}
try:
    if scenario in ("evaluate", "predict"):
        make_estimator(model_dir, use_tpu=False, num_shards=replicas).train(
            lambda params: make_data(64), steps=2)
        failing = make_estimator(model_dir, use_tpu=False, num_shards=replicas,
                                 fn=fails_on_replica_1(bad_features))
        if scenario == "evaluate":
            failing.evaluate(lambda params: make_data(20))
        else:
            list(failing.predict(lambda params: make_data(20)))
    else:
        estimator.train(shard_input_fn if scenario == "input_fn" else
                        (lambda params: make_data(64)), steps=4)
except Exception as error:
    outcome = {"type": type(error).__name__, "message": str(error),
               "notes": "\n".join(getattr(error, "__notes__", []))}
outcome["children"] = child_pids()
outcome["checkpoints"] = sorted(name for name in os.listdir(model_dir) if name.startswith("model."))
print(json.dumps(outcome))
"""


@pytest.mark.parametrize("replicas", [2, 4])
def test_model_fn_error_in_one_replica_is_raised_in_the_caller(tmp_path, replicas):
    outcome = run_fresh(SCENARIO, "raise", replicas, tmp_path)
    assert (outcome["type"], outcome["message"]) == ("ValueError", "bad features on replica 1")
    assert "raised in replica process 1" in outcome["notes"]
    assert "model_fn_that_fails" in outcome["notes"]  # the replica's traceback
    assert outcome["children"] == [] and outcome["checkpoints"] == []


def test_input_fn_error_in_one_replica_is_raised_in_the_caller(tmp_path):
    outcome = run_fresh(SCENARIO, "input_fn", 2, tmp_path)
    assert (outcome["type"], outcome["message"]) == ("FileNotFoundError", "shard 1 is missing")
    assert outcome["children"] == []


def test_replica_killed_by_a_signal_is_reported_by_number(tmp_path):
    outcome = run_fresh(SCENARIO, "kill", 2, tmp_path)
    assert outcome["type"] == "ReplicaFailedError"
    assert outcome["message"].startswith("replica 1 exited with code -9 without a Python error")
    assert outcome["children"] == []


@pytest.mark.parametrize("mode", ["evaluate", "predict"])
def test_failure_during_evaluate_or_predict_ends_the_job(tmp_path, mode):
    outcome = run_fresh(SCENARIO, mode, 2, tmp_path)
    assert (outcome["type"], outcome["message"]) == ("ValueError", "bad features on replica 1")
    assert outcome["children"] == [] and outcome["checkpoints"] == ["model.ckpt-2.pt"]


def test_forking_replicas_after_xla_backward_is_refused_before_any_work(tmp_path):
    make_estimator(tmp_path / "xla").train(lambda params: make_data(16), steps=1)
    gloo = make_estimator(tmp_path / "gloo", use_tpu=False, num_shards=2)
    with pytest.raises(RuntimeError, match="already ran a backward pass on an XLA or CUDA"):
        gloo.train(lambda params: make_data(16), steps=1)
    assert not (tmp_path / "gloo").exists()
