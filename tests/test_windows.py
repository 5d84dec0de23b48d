"""Windows and step groups: how a call's steps are cut into windows (host visits) and, in evaluate
and predict, into device programs of several steps (TPUConfig.inference_steps_per_execution)."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
import torch
from helpers import make_data, make_estimator, run_fresh
from test_eval_predict import exact_model_fn

from torch_tpu_estimator import TPUConfig
from torch_tpu_estimator.step.plan import ExecutionPlan, steps_per_program
from torch_tpu_estimator.step.windows import WindowedBatches, groups


@pytest.mark.parametrize(("setting", "window_steps", "expected"), [
    (1, 100, 1), (10, 100, 10), (16, 100, 10), (30, 100, 25), (4, 6, 3), (5, 7, 1),
    (8, 2, 2), (7, None, 7)])
def test_a_group_divides_a_step_count_window(setting, window_steps, expected):
    assert steps_per_program(setting, window_steps) == expected


def test_groups_are_consecutive_and_only_the_last_is_short():
    assert list(groups(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(groups(iter(range(6)), 3)) == [[0, 1, 2], [3, 4, 5]]
    assert list(groups(iter([]), 3)) == []


def _timed_windows(batches: int, group_size: int, seconds: float) -> WindowedBatches:
    """WindowedBatches over `batches` items with a time budget, on one chief process."""
    replica = SimpleNamespace(is_chief=True, topology=SimpleNamespace(num_processes=1),
                              host_gather=lambda value: [value])
    plan = ExecutionPlan(window_steps=math.inf, window_seconds=seconds,
                         steps_per_program=group_size, replay=False, replay_training=False,
                         agree_each_step=False, max_graphs=None)
    return WindowedBatches(iter(range(batches)), plan, replica)


def _window_sizes(windows: WindowedBatches, pause: float) -> list[int]:
    sizes = []
    while not windows.exhausted and len(sizes) < 50:  # empty windows would never end
        window = []
        for batch in windows.window():
            window.append(batch)
            time.sleep(pause)  # each step outlasts the budget
        sizes.append(len(window))
    return sizes


@pytest.mark.parametrize("group_size", [1, 3])
def test_a_spent_time_budget_ends_windows_only_at_whole_groups(group_size):
    windows = _timed_windows(10, group_size, seconds=1e-6)
    sizes = _window_sizes(windows, pause=1e-4)
    assert sizes[:-1] == [group_size] * (len(sizes) - 1)
    assert sum(sizes) == 10 and 0 <= sizes[-1] <= group_size


def test_a_budget_spent_before_the_first_step_still_runs_a_step():
    windows = _timed_windows(3, 1, seconds=1e-9)
    assert _window_sizes(windows, pause=0.0)[:3] == [1, 1, 1]


def test_inference_steps_per_execution_is_checked_by_name():
    with pytest.raises(ValueError, match="inference_steps_per_execution must be a positive int"):
        TPUConfig(inference_steps_per_execution=0)
    with pytest.raises(ValueError, match="inference_steps_per_execution"):
        TPUConfig(inference_steps_per_execution=None)


GROUPED_SCRIPT = r"""
import json, sys
import torch
import torch_xla.debug.metrics as met
from helpers import make_data, make_estimator
from test_eval_predict import exact_model_fn

def count(name):
    data = met.metric_data(name)
    return data[0] if data else 0

model_dir, strategy = sys.argv[1], sys.argv[2]
executions = "ExecuteReplicatedTime" if strategy == "spmd" else "ExecuteTime"
make_estimator(model_dir, fn=exact_model_fn, strategy=strategy).train(
    lambda params: make_data(64), steps=2)
rows = {}
for steps_per_execution in (4, 1):  # grouped first: its compile counts start from nothing
    estimator = make_estimator(model_dir, fn=exact_model_fn, strategy=strategy,
                               iterations_per_loop=6,
                               tpu_config_extra={"inference_steps_per_execution":
                                                 steps_per_execution})
    for size in (29, 50, 29):
        before = count("CompileTime"), count(executions)
        metrics = estimator.evaluate(lambda params: make_data(size, seed=3))
        predictions = list(estimator.predict(lambda params: make_data(size, seed=4)))
        rows.setdefault(steps_per_execution, []).append({
            "compiles": count("CompileTime") - before[0],
            "executions": count(executions) - before[1],
            "metrics": metrics,
            "logits": torch.stack([p["logits"] for p in predictions]).tolist(),
            "classes": [int(p["class"]) for p in predictions]})
print(json.dumps(rows))
"""


@pytest.mark.parametrize("strategy", ["mp", "spmd"])
def test_grouped_inference_runs_fewer_programs_with_the_same_results(tmp_path, strategy):
    """Windows of 6 steps, groups of 3 (the largest divisor of 6 up to 4), batches of 8: 29
    examples are 4 steps (3 + 1), 50 are 7 (3 + 3, then 1). One device, and 4 devices in SPMD."""
    rows = run_fresh(GROUPED_SCRIPT, tmp_path, strategy,
                     **({"CPU_NUM_DEVICES": "4"} if strategy == "spmd" else {}))
    single, grouped = rows["1"], rows["4"]
    for one, many in zip(single, grouped, strict=True):
        assert many["metrics"] == one["metrics"]
        assert many["logits"] == one["logits"] and many["classes"] == one["classes"]
    assert [len(call["classes"]) for call in grouped] == [29, 50, 29]
    # Per call, eval and predict: 4 and 7 steps one at a time; 2 and 3 programs grouped.
    assert [call["executions"] for call in single] == [8, 14, 8]
    assert [call["executions"] for call in grouped] == [4, 6, 4]
    # Groups of 3 and of 1, eval and predict: 4 graphs in the first call, none after.
    assert [call["compiles"] for call in grouped] == [4, 0, 0]


def test_grouped_inference_on_the_torch_backend_equals_ungrouped(tmp_path):
    estimator = make_estimator(tmp_path, use_tpu=False, fn=exact_model_fn)
    estimator.train(lambda params: make_data(64), steps=2)
    results = []
    for steps_per_execution in (1, 4):
        grouped = make_estimator(tmp_path, use_tpu=False, fn=exact_model_fn,
                                 iterations_per_loop=6,
                                 tpu_config_extra={"inference_steps_per_execution":
                                                   steps_per_execution})
        predictions = list(grouped.predict(lambda params: make_data(29, seed=4)))
        results.append((grouped.evaluate(lambda params: make_data(29, seed=3)),
                        torch.stack([p["logits"] for p in predictions])))
    (metrics, logits), (grouped_metrics, grouped_logits) = results
    assert grouped_metrics == metrics and torch.equal(grouped_logits, logits)


def test_grouped_inference_runs_under_the_recompilation_guard(tmp_path):
    """Full groups and the last window's rest are the 2 graphs max_graphs_per_mode allows."""
    make_estimator(tmp_path, fn=exact_model_fn).train(lambda params: make_data(64), steps=2)
    results = []
    for max_graphs in (None, {"eval": 2, "infer": 2}):
        estimator = make_estimator(tmp_path, fn=exact_model_fn, iterations_per_loop=6,
                                   max_graphs=max_graphs,
                                   tpu_config_extra={"inference_steps_per_execution": 3})
        predictions = list(estimator.predict(lambda params: make_data(29, seed=4)))
        results.append((estimator.evaluate(lambda params: make_data(50, seed=3)),
                        torch.stack([p["logits"] for p in predictions])))
    (metrics, logits), (guarded_metrics, guarded_logits) = results
    assert guarded_metrics == metrics and torch.equal(guarded_logits, logits)
