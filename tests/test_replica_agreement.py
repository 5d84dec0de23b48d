"""gloo replica processes stay in step with one another and with one replica: they run the same
steps in every window even when their input streams end at different steps (per-replica input)
or windows are cut by the chief's clock (time budgets); a resumed run continues every replica's
input stream and RNG exactly; a DataLoader of global batches trains like one replica."""

from __future__ import annotations

from helpers import run_fresh

SCRIPT = r"""
import json, sys
import torch
from helpers import adam_with_schedule, make_data, make_estimator
from torch.utils.data import DataLoader, TensorDataset
from torch_tpu_estimator import Hook

class Windows(Hook):
    def __init__(self):
        self.windows = []
    def after_window(self, context, window):
        self.windows.append([window.first_step, window.last_step])

def uneven_one_shot(params):
    # replica 0 has 5 batches, replica 1 has 3: training must end after step 3 on both
    data = make_data(64)
    count = 5 if params["context"].input_pipeline_id == 0 else 3
    batch = params["batch_size"]
    return iter([(data.tensors[0][i * batch:(i + 1) * batch],
                  data.tensors[1][i * batch:(i + 1) * batch]) for i in range(count)])

def uneven_shards(params):
    # per-replica shards of 40 and 24 rows: 10 and 6 batches a pass, so passes drift apart
    data = make_data(64)
    rows = slice(0, 40) if params["context"].input_pipeline_id == 0 else slice(40, 64)
    return TensorDataset(*[tensor[rows] for tensor in data.tensors])

def final_state(estimator):
    state = torch.load(estimator.latest_checkpoint(), weights_only=True)
    return {"model": state["model"], "optimizer": state["update"]["optimizers"]["default"]["state"],
            "positions": state["input"]}

def same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    return a == b

scenario, model_dir = sys.argv[1], sys.argv[2]
recorder = Windows()
if scenario == "resume":
    def run(name, plan):
        estimator = make_estimator(f"{model_dir}/{name}", use_tpu=False, num_shards=2,
                                   per_host_input_for_training=False, dropout=0.3,
                                   optimizer_fn=adam_with_schedule, iterations_per_loop=3)
        for steps in plan:
            estimator.train(uneven_shards, steps=steps)
        return final_state(estimator)
    split, whole = run("split", [7, 6]), run("whole", [13])
    print(json.dumps({"equal": same(split, whole), "positions": whole["positions"]}))
    sys.exit()
if scenario == "resume4":
    def run(name, plan, dropout):
        estimator = make_estimator(f"{model_dir}/{name}{dropout}", use_tpu=False, num_shards=4,
                                   dropout=dropout, optimizer_fn=adam_with_schedule,
                                   iterations_per_loop=3, train_batch_size=16)
        for steps in plan:
            estimator.train(lambda params: make_data(128), max_steps=steps)
        return final_state(estimator)
    print(json.dumps({str(dropout): same(run("split", [6, 12], dropout),
                                         run("whole", [12], dropout))
                      for dropout in (0.0, 0.3)}))
    sys.exit()
if scenario == "loader":
    def input_fn(params):
        features = torch.randn(60, 8)  # drawn from the global RNG, as many input_fns do
        data = TensorDataset(features, (features.sum(1) > 0).long())
        return DataLoader(data, batch_size=params["batch_size"], shuffle=True)

    def weights(**layout):
        estimator = make_estimator(f"{model_dir}/{len(layout)}", use_tpu=False, **layout)
        estimator.train(input_fn, steps=12)
        return estimator.get_variable_value("layers.0.weight")
    one, two = weights(), weights(num_shards=2)
    print(json.dumps({"max_difference": float(abs(one - two).max())}))
    sys.exit()
if scenario == "uneven":
    estimator = make_estimator(model_dir, use_tpu=False, num_shards=2, iterations_per_loop=2,
                               per_host_input_for_training=False)
    estimator.train(uneven_one_shot, max_steps=100, hooks=[recorder])
else:
    estimator = make_estimator(model_dir, use_tpu=False, num_shards=2,
                               iterations_per_loop="0.01s")
    estimator.train(lambda params: make_data(64), steps=40, hooks=[recorder])
print(json.dumps({"step": int(estimator.get_variable_value("global_step")),
                  "windows": recorder.windows}))
"""


def test_per_replica_streams_of_different_lengths_end_training_together(tmp_path):
    outcome = run_fresh(SCRIPT, "uneven", tmp_path)
    assert outcome == {"step": 3, "windows": [[0, 2], [2, 3]]}


def test_time_budget_windows_are_cut_alike_on_every_replica(tmp_path):
    outcome = run_fresh(SCRIPT, "time", tmp_path)
    windows = outcome["windows"]
    assert outcome["step"] == 40 and windows[-1][1] == 40
    assert len(windows) > 1  # the budget, not the target, ended the first window
    assert all(first == last_of_previous for (first, _), (_, last_of_previous)
               in zip(windows[1:], windows[:-1], strict=True))


def test_resumed_run_continues_every_replica_stream_and_rng_exactly(tmp_path):
    """Replicas with shards of different lengths and their own dropout masks: train(7) then
    train(6) ends bit for bit where train(13) does."""
    outcome = run_fresh(SCRIPT, "resume", tmp_path)
    assert outcome["equal"]
    # per-replica batch 4: shard 0 has 10 batches a pass, shard 1 has 6; 13 steps are
    # 10 + 3 and 6 + 6 + 1
    assert outcome["positions"] == {"replica0": {"epoch": 1, "batch": 3},
                                    "replica1": {"epoch": 2, "batch": 1}}


def test_resume_with_four_replicas_is_bit_for_bit(tmp_path):
    """train(max_steps=6) then train(max_steps=12) equals train(max_steps=12) on 4 gloo
    replicas: gradients are reduced in one fixed layout every step (DDP's re-bucketing after
    its first step changed the sum order, and the last bit, of a resumed run)."""
    assert run_fresh(SCRIPT, "resume4", tmp_path) == {"0.0": True, "0.3": True}


def test_dataloader_of_global_batches_trains_like_one_replica(tmp_path):
    """A shuffled DataLoader of params["batch_size"] (global) batches over data drawn from the
    global RNG: every replica builds the same data and order and takes its rows of it, and the
    short last batch of each pass is skipped by all."""
    outcome = run_fresh(SCRIPT, "loader", tmp_path)
    assert outcome["max_difference"] < 1e-5
