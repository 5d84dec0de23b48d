"""Training compiles a fixed number of graphs and reads back once per window (torch_xla metrics).

Runs in a fresh interpreter so no other test's compiled graphs are in the cache.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from helpers import adam_with_schedule, checkpoint_weights, make_data, make_estimator, model_fn, run_fresh

from torch_tpu_estimator import ModeKeys, RecompilationError

SCRIPT = r"""
import json, sys
import torch_xla.debug.metrics as met
from helpers import adam_with_schedule, make_data, make_estimator
from torch_tpu_estimator import Hook

def count(name):
    data = met.metric_data(name)
    return data[0] if data else 0

class MetricsRecorder(Hook):
    rows = []
    def after_window(self, context, window):
        self.rows.append((window.last_step, count("CompileTime"), count("TransferFromDeviceTime")))

data = make_data(100)
estimator = make_estimator(sys.argv[1], iterations_per_loop=10, optimizer_fn=adam_with_schedule,
                           dropout=0.2, save_checkpoints_steps=None, log_step_count_steps=50,
                           save_summary_steps=25)
estimator.train(lambda params: data, max_steps=200, hooks=[MetricsRecorder()])
print(json.dumps(MetricsRecorder.rows))
"""


def test_compilations_do_not_grow_and_one_transfer_per_window(tmp_path):
    rows = run_fresh(SCRIPT, tmp_path)
    steps = [step for step, _, _ in rows]
    compiles = [compiled for _, compiled, _ in rows]
    transfers = [moved for _, _, moved in rows]
    assert steps == list(range(10, 201, 10))
    # The first window compiles the step (and Adam's first step, which creates its state);
    # after that, 180 more steps compile nothing.
    assert compiles[-1] == compiles[1] <= 3
    # Between two window ends: exactly one device-to-host transfer (the window's losses).
    assert [later - earlier for earlier, later in zip(transfers, transfers[1:], strict=False)] == [1] * 19


EVAL_SCRIPT = r"""
import json, sys
import torch_xla.debug.metrics as met
import torch.nn.functional as F
from helpers import make_data, make_estimator
from test_eval_predict import exact_model_fn

def compiles():
    data = met.metric_data("CompileTime")
    return data[0] if data else 0

estimator = make_estimator(sys.argv[1], fn=exact_model_fn, iterations_per_loop=3)
estimator.train(lambda params: make_data(64), steps=2)
counts = {}
for mode in ("eval", "predict"):
    for size in (29, 1, 8, 9, 50):
        before = compiles()
        if mode == "eval":
            estimator.evaluate(lambda params: make_data(size))
        else:
            list(estimator.predict(lambda params: make_data(size)))
        counts.setdefault(mode, []).append(compiles() - before)
print(json.dumps(counts))
"""


def test_eval_and_predict_compile_one_graph_whatever_the_data_set_size(tmp_path):
    counts = run_fresh(EVAL_SCRIPT, tmp_path)
    assert counts == {"eval": [1, 0, 0, 0, 0], "predict": [1, 0, 0, 0, 0]}


def _changes_graph_at_call(call: int):
    """helpers.model_fn, except that from its `call`-th call on it traces one more op: the kind
    of silent recompilation (a Python value baked into the graph) the guard is there to catch."""
    calls = [0]

    def fn(model, features, labels, mode, params):
        calls[0] += 1
        spec = model_fn(model, features, labels, mode, params)
        if calls[0] >= call and spec.loss is not None:
            spec.loss = spec.loss * 1.5
        return spec
    return fn


def test_recompilation_guard_names_the_mode_and_leaves_model_dir_as_it_was(tmp_path):
    estimator = make_estimator(tmp_path, fn=_changes_graph_at_call(3), iterations_per_loop=4,
                               save_checkpoints_steps=None, save_summary_steps=None,
                               max_graphs={ModeKeys.TRAIN: 1})
    with pytest.raises(RecompilationError, match=r"mode 'train' traced a step graph unlike the 1 "
                                                 r"allowed by TPUConfig\.max_graphs_per_mode"):
        estimator.train(lambda params: make_data(64), steps=8)
    assert estimator.latest_checkpoint() is None


def test_eval_recompilation_is_caught_too(tmp_path):
    make_estimator(tmp_path).train(lambda params: make_data(32), steps=2)
    estimator = make_estimator(tmp_path, fn=_changes_graph_at_call(2),
                               max_graphs={ModeKeys.EVAL: 1})
    with pytest.raises(RecompilationError, match="mode 'eval'"):
        estimator.evaluate(lambda params: make_data(32))


def test_guarded_runs_train_evaluate_and_predict_as_unguarded_ones(tmp_path, caplog):
    limits = {ModeKeys.TRAIN: 2, ModeKeys.EVAL: 1, ModeKeys.PREDICT: 1}  # Adam: 2 train graphs
    results = []
    for name, max_graphs in (("plain", None), ("guarded", limits)):
        estimator = make_estimator(tmp_path / name, optimizer_fn=adam_with_schedule,
                                   max_graphs=max_graphs)
        with caplog.at_level(logging.INFO, logger="torch_tpu_estimator"):
            estimator.train(lambda params: make_data(64), steps=10)
            metrics = estimator.evaluate(lambda params: make_data(21))
            predictions = list(estimator.predict(lambda params: make_data(11)))
        results.append((checkpoint_weights(estimator), metrics, predictions))
    (plain_weights, plain_metrics, plain_predictions), (weights, metrics, predictions) = results
    assert all((weights[name] == value).all() for name, value in plain_weights.items())
    assert metrics == plain_metrics
    assert all(torch.equal(a["logits"], b["logits"]) for a, b in zip(
        predictions, plain_predictions, strict=True))
    for mode in ("train", "eval", "infer"):
        assert re.search(rf"{mode} on XLA: \d+ compilation\(s\) in [\d.]+ s, \d+ execution\(s\), "
                         r"\d+ device-to-host transfer\(s\)", caplog.text), mode


SPMD_SCRIPT = r"""
import json, sys
import torch_xla.debug.metrics as met
from helpers import make_data, make_estimator
from test_eval_predict import exact_model_fn

def count(name):
    data = met.metric_data(name)
    return data[0] if data else 0

estimator = make_estimator(sys.argv[1], fn=exact_model_fn, strategy="spmd", iterations_per_loop=3)
estimator.train(lambda params: make_data(64), steps=2)
counts = {}
for mode in ("eval", "predict"):
    for size in (29, 29, 9):
        before = count("CompileTime"), count("ExecuteReplicatedTime")
        if mode == "eval":
            estimator.evaluate(lambda params: make_data(size))
        else:
            list(estimator.predict(lambda params: make_data(size)))
        counts.setdefault(mode, []).append([count("CompileTime") - before[0],
                                            count("ExecuteReplicatedTime") - before[1]])
print(json.dumps(counts))
"""


def test_on_an_spmd_mesh_eval_and_predict_compile_once_and_not_again(tmp_path):
    """4 devices: one graph the first call, none on a repeat call or another data set size
    (torch_xla's reads of sharded outputs used to compile a program per window)."""
    counts = run_fresh(SPMD_SCRIPT, tmp_path, CPU_NUM_DEVICES="4")
    for mode in ("eval", "predict"):
        compiles, executions = zip(*counts[mode], strict=True)
        assert compiles == (1, 0, 0), (mode, counts)
        assert executions == (4, 4, 2), (mode, counts)  # one per step: ceil(29 / 8), ceil(9 / 8)


RESUMED_CALLS = r"""
import json, sys
import torch
import torch.nn.functional as F
import torch_xla.debug.metrics as met
from helpers import Net, make_data, make_estimator
from torch_tpu_estimator import ModeKeys, TPUEstimatorSpec

class Counting(Net):
    '''A 0-dim buffer restored from each checkpoint, as a batch norm's num_batches_tracked.'''
    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))

def counting_model_fn(model, features, labels, mode, params):
    if mode == ModeKeys.TRAIN:
        model.seen += 1
    logits = model(features) * 8.0 + 0 * model.seen  # 8.0: the value `seen` has after 8 steps
    if mode == ModeKeys.PREDICT:
        return TPUEstimatorSpec(mode, predictions=logits)
    return TPUEstimatorSpec(mode, loss=F.cross_entropy(logits, labels))

def compiles():
    return (met.metric_data("CompileTime") or (0,))[0]

estimator = make_estimator(sys.argv[1], fn=counting_model_fn, iterations_per_loop=4,
                           model_init_fn=lambda params: Counting(),
                           optimizer_fn=lambda model, params: torch.optim.Adam(
                               model.parameters(), lr=0.01))
counts = []
for _ in range(4):
    before = compiles()
    estimator.train(lambda params: make_data(64), steps=4)
    middle = compiles()
    estimator.evaluate(lambda params: make_data(16))
    counts.append([middle - before, compiles() - middle])
print(json.dumps(counts))
"""


def test_train_calls_that_resume_in_one_process_compile_nothing_after_the_second(tmp_path):
    """train_and_evaluate's rounds: the first call compiles the step graphs, the second the
    step after a restore (the flat optimizer packs the restored moments), none after; a
    restored 0-dim buffer equal to a constant of the step (here at the third call) used to
    share its device value and change the graph."""
    counts = run_fresh(RESUMED_CALLS, tmp_path)
    assert [train for train, _ in counts[2:]] == [0, 0]
    assert [evaluate for _, evaluate in counts[1:]] == [0, 0, 0]
