"""Replica processes run the same steps in every window even when their input streams end at
different steps (per-replica input) or windows are cut by the chief's clock (time budgets)."""

from __future__ import annotations

from helpers import run_fresh

SCRIPT = r"""
import json, sys
from helpers import make_data, make_estimator
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

scenario, model_dir = sys.argv[1], sys.argv[2]
recorder = Windows()
if scenario == "uneven":
    estimator = make_estimator(model_dir, use_tpu=False, num_shards=2, iterations_per_loop=2,
                               per_host_input_for_training=False)
    estimator.train(uneven_one_shot, max_steps=100, hooks=[recorder])
else:
    estimator = make_estimator(model_dir, use_tpu=False, num_shards=2,
                               iterations_per_loop="0.05s")
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
    assert all(first == last_of_previous for (first, _), (_, last_of_previous)
               in zip(windows[1:], windows[:-1], strict=True))
