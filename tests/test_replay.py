"""Replayed inference (TPUConfig.replay_inference): two traced groups of steps, then their
compiled program on every later batch; the same results as tracing, or tracing when a replay
could differ (replay.py)."""

from __future__ import annotations

import collections
import logging

import pytest
import torch
import torch.nn.functional as F
import torch_xla
from helpers import make_data, make_estimator, run_fresh
from test_eval_predict import metric_fn
from torch.utils.data import TensorDataset

from torch_tpu_estimator import ModeKeys, TPUConfig, TPUEstimatorSpec
from torch_tpu_estimator.step.replay import GroupPlan, Source

CALLS: collections.Counter = collections.Counter()


def counted_model_fn(model, features, labels, mode, params):
    """Per-example loss, labels passed through to the metrics; predictions holding the
    features as they came in, one tensor under two names, detached and cloned."""
    CALLS[mode] += 1
    logits = model(features)
    if mode == ModeKeys.TRAIN:
        return TPUEstimatorSpec(mode, loss=F.cross_entropy(logits, labels))
    if mode == ModeKeys.PREDICT:
        return TPUEstimatorSpec(mode, predictions={"logits": logits, "again": logits,
                                                   "detached": logits.detach(),
                                                   "cloned": logits.clone(),
                                                   "class": logits.argmax(-1),
                                                   "features": features})
    return TPUEstimatorSpec(mode, loss=F.cross_entropy(logits, labels, reduction="none"),
                            eval_metrics=(metric_fn, [labels, logits]))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("replay")
    make_estimator(directory, fn=counted_model_fn).train(lambda params: make_data(64), steps=3)
    return directory


def _run(model_dir, fn, replay: bool, examples: int = 120, steps_per_execution: int = 1,
         **options):
    """evaluate and predict over `examples` (batches of 8, windows of 6 steps), and how many
    times model_fn ran in each."""
    estimator = make_estimator(model_dir, fn=fn, iterations_per_loop=6, tpu_config_extra={
        "replay_inference": replay, "inference_steps_per_execution": steps_per_execution},
        **options)
    CALLS.clear()
    metrics = estimator.evaluate(lambda params: make_data(examples, seed=3))
    predictions = list(estimator.predict(lambda params: make_data(examples, seed=4)))
    return metrics, predictions, dict(CALLS)


def _stacked(predictions, key):
    return torch.stack([prediction[key] for prediction in predictions])


@pytest.mark.parametrize(("steps_per_execution", "traced_calls"), [(1, 2), (3, 6)])
def test_replay_gives_the_traced_results_and_runs_model_fn_for_two_groups(
        model_dir, steps_per_execution, traced_calls):
    """120 examples are 15 batches of 8; groups of 1, or of 3 (5 full groups): model_fn runs
    for the first two groups only, and every result is the same bit for bit."""
    traced = _run(model_dir, counted_model_fn, replay=False,
                  steps_per_execution=steps_per_execution)
    replayed = _run(model_dir, counted_model_fn, replay=True,
                    steps_per_execution=steps_per_execution)
    assert traced[2] == {ModeKeys.EVAL: 15, ModeKeys.PREDICT: 15}
    assert replayed[2] == {ModeKeys.EVAL: traced_calls, ModeKeys.PREDICT: traced_calls}
    assert replayed[0] == traced[0]
    for key in ("logits", "again", "detached", "cloned", "class", "features"):
        assert torch.equal(_stacked(replayed[1], key), _stacked(traced[1], key)), key
    assert torch.equal(_stacked(replayed[1], "features"), make_data(120, seed=4).tensors[0])
    assert torch.equal(_stacked(replayed[1], "again"), _stacked(replayed[1], "logits"))


def test_a_padded_last_batch_and_a_short_last_group_are_exact(model_dir):
    """29 examples: 3 full batches and one of 5 real rows (padded); groups of 3 and 1."""
    traced = _run(model_dir, counted_model_fn, replay=False, examples=29,
                  steps_per_execution=3)
    replayed = _run(model_dir, counted_model_fn, replay=True, examples=29, steps_per_execution=3)
    assert replayed[0] == traced[0] and len(replayed[1]) == 29
    assert torch.equal(_stacked(replayed[1], "logits"), _stacked(traced[1], "logits"))


def test_replay_runs_under_the_recompilation_guard(model_dir):
    guarded = _run(model_dir, counted_model_fn, replay=True,
                   max_graphs={ModeKeys.EVAL: 1, ModeKeys.PREDICT: 1})
    traced = _run(model_dir, counted_model_fn, replay=False)
    assert guarded[0] == traced[0]
    assert torch.equal(_stacked(guarded[1], "logits"), _stacked(traced[1], "logits"))


def _number_per_call_model_fn(model, features, labels, mode, params):
    """Scales the logits by a Python number that changes at every call."""
    CALLS[mode] += 1
    logits = model(features) * (1.0 + CALLS[mode] / 16)
    if mode == ModeKeys.PREDICT:
        return TPUEstimatorSpec(mode, predictions={"logits": logits})
    return TPUEstimatorSpec(mode, loss=F.cross_entropy(logits, labels, reduction="none"))


def _random_model_fn(model, features, labels, mode, params):
    """Monte Carlo dropout at inference: new random draws at every step."""
    CALLS[mode] += 1
    logits = F.dropout(model(features), 0.5, training=True)
    if mode == ModeKeys.PREDICT:
        return TPUEstimatorSpec(mode, predictions={"logits": logits})
    return TPUEstimatorSpec(mode, loss=F.cross_entropy(logits, labels, reduction="none"))


class _CountingNet(torch.nn.Module):
    """A linear model with a buffer that model_fn advances at every step."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 2)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, features):
        return self.linear(features)


def _buffer_model_fn(model, features, labels, mode, params):
    """Adds the count of steps seen, kept in a model buffer, to the logits."""
    CALLS[mode] += 1
    model.seen += 1
    logits = model(features) + model.seen
    if mode == ModeKeys.PREDICT:
        return TPUEstimatorSpec(mode, predictions={"logits": logits})
    return TPUEstimatorSpec(mode, loss=F.cross_entropy(logits, labels, reduction="none"))


def _replaced_buffer_model_fn(model, features, labels, mode, params):
    """The same count, with the buffer replaced by a new tensor at every step."""
    CALLS[mode] += 1
    model.seen = model.seen + 1
    logits = model(features) + model.seen
    if mode == ModeKeys.PREDICT:
        return TPUEstimatorSpec(mode, predictions={"logits": logits})
    return TPUEstimatorSpec(mode, loss=F.cross_entropy(logits, labels, reduction="none"))


@pytest.mark.parametrize(("fn", "reason"), [
    (_number_per_call_model_fn, "different"),
    (_random_model_fn, "random numbers"),
    (_buffer_model_fn, "parameters or buffers"),
    (_replaced_buffer_model_fn, "parameters or buffers")])
def test_a_step_a_replay_could_change_is_traced_every_time(tmp_path, caplog, fn, reason):
    make_estimator(tmp_path, fn=counted_model_fn,
                   model_init_fn=lambda params: _CountingNet()).train(
        lambda params: make_data(64), steps=2)
    traced = _run(tmp_path, fn, replay=False, examples=40,
                  model_init_fn=lambda params: _CountingNet())
    with caplog.at_level(logging.INFO, logger="torch_tpu_estimator"):
        replayed = _run(tmp_path, fn, replay=True, examples=40,
                        model_init_fn=lambda params: _CountingNet())
    assert "replay_inference: every step is traced, because" in caplog.text
    assert reason in caplog.text
    assert replayed[2] == {ModeKeys.EVAL: 5, ModeKeys.PREDICT: 5}
    assert replayed[0] == traced[0]
    assert torch.equal(_stacked(replayed[1], "logits"), _stacked(traced[1], "logits"))


def _positives_first(examples: int, seed: int) -> TensorDataset:
    """make_data with a first feature that is positive in the first 16 rows (the two traced
    groups of batches of 8) and of either sign after."""
    features, labels = make_data(examples, seed=seed).tensors
    features = features.clone()
    features[:16, 0] = features[:16, 0].abs() + 0.1
    return TensorDataset(features, labels)


def _reading_model_fn(read):
    """A model_fn whose logits depend on what `read(negative)` makes of the batch's negative
    first features: a branch, a number read back, or an op torch_xla runs on the host."""
    def model_fn(model, features, labels, mode, params):
        CALLS[mode] += 1
        logits = model(features) + read(features[:, 0] < 0)
        if mode == ModeKeys.PREDICT:
            return TPUEstimatorSpec(mode, predictions={"logits": logits})
        return TPUEstimatorSpec(mode, loss=F.cross_entropy(logits, labels, reduction="none"))
    return model_fn


@pytest.mark.parametrize(("read", "named"), [
    (lambda negative: 5.0 if bool(negative.any()) else 0.0, ".item(), bool()"),
    (lambda negative: negative.sum().item(), ".item(), bool()"),
    (lambda negative: sum(negative.tolist()), ".tolist(), .cpu()"),
    (lambda negative: torch.nonzero(negative).shape[0], "aten::nonzero (run on the host)"),
    (lambda negative: torch.bincount(negative.long(), minlength=2)[1],
     "aten::bincount (run on the host)"),
    (lambda negative: torch.unique(negative).numel(), "aten::_unique2 (run on the host)"),
    (lambda negative: torch.arange(8.0, device=negative.device)[negative].sum(),
     "aten::nonzero (run on the host)"),
], ids=["bool", "item", "tolist", "nonzero", "bincount", "unique", "mask"])
def test_a_host_read_while_traced_refuses_replay_and_names_it(model_dir, caplog, read, named):
    """The first two batches have no negative feature, later ones do: a replayed program
    would keep the traced outcome."""
    def run(replay):
        estimator = make_estimator(model_dir, fn=_reading_model_fn(read), tpu_config_extra={
            "replay_inference": replay})
        CALLS.clear()
        metrics = estimator.evaluate(lambda params: _positives_first(48, seed=3))
        logits = _stacked(estimator.predict(lambda params: _positives_first(48, seed=4)),
                          "logits")
        return metrics, logits, dict(CALLS)

    traced = run(False)
    with caplog.at_level(logging.INFO, logger="torch_tpu_estimator"):
        replayed = run(True)
    assert "replay_inference: every step is traced, because model_fn reads the device" in \
        caplog.text
    assert named in caplog.text
    assert replayed[2] == traced[2] == {ModeKeys.EVAL: 6, ModeKeys.PREDICT: 6}
    assert replayed[0] == traced[0] and torch.equal(replayed[1], traced[1])


KEPT: list = []
MODULES: list = []


def _keeping_model_fn(model, features, labels, mode, params):
    """Keeps a tensor of every call in a list and on the module, outside its outputs."""
    logits = model(features)
    KEPT.append(logits.sum())
    model.last_mean = logits.mean()
    MODULES[:] = [model]
    return TPUEstimatorSpec(mode, predictions={"logits": logits})


def test_replay_keeps_the_values_of_tensors_it_does_not_own(model_dir):
    """A device tensor the caller made before predict, and tensors model_fn keeps outside its
    outputs, still hold their values (the traced steps' ones) after a replayed predict."""
    device = torch_xla.device()
    total = torch.arange(3.0, device=device) * 10 + 1  # pending, never synced by the caller
    estimator = make_estimator(model_dir, fn=_keeping_model_fn, tpu_config_extra={
        "replay_inference": True})
    KEPT.clear()
    data = make_data(80, seed=5)
    logits = _stacked(estimator.predict(lambda params: data), "logits")
    assert torch.equal(total.cpu(), torch.tensor([1.0, 11.0, 21.0]))
    assert len(KEPT) == 2  # model_fn ran for the two traced batches of 8
    for index, kept in enumerate(KEPT):
        torch.testing.assert_close(kept.cpu(), logits[8 * index:8 * index + 8].sum())
    torch.testing.assert_close(MODULES[0].last_mean.cpu(), logits[8:16].mean())


def test_replay_has_no_effect_on_the_torch_backend(model_dir, tmp_path, caplog):
    make_estimator(tmp_path, use_tpu=False, fn=counted_model_fn).train(
        lambda params: make_data(64), steps=2)
    with caplog.at_level(logging.INFO, logger="torch_tpu_estimator"):
        replayed = _run(tmp_path, counted_model_fn, replay=True, use_tpu=False)
    traced = _run(tmp_path, counted_model_fn, replay=False, use_tpu=False)
    assert "replay_inference has no effect on TorchReplica" in caplog.text
    assert replayed[2] == {ModeKeys.EVAL: 15, ModeKeys.PREDICT: 15}
    assert replayed[0] == traced[0]


def test_replay_inference_is_checked_by_name():
    with pytest.raises(ValueError, match="replay_inference must be a bool, got 'yes'"):
        TPUConfig(replay_inference="yes")


# The plan's rules, below the estimator.

def _device(*values: float) -> torch.Tensor:
    tensor = torch.tensor(values).to(torch_xla.device())
    torch_xla.sync()
    return tensor


def test_sources_differ_by_batch_position_or_by_the_value_of_a_fixed_tensor():
    weight = _device(1.0, 2.0)
    assert not Source(fixed=weight, fixed_id=1).differs_from(Source(fixed=weight, fixed_id=1))
    assert not Source(fixed=_device(0.5), fixed_id=2).differs_from(
        Source(fixed=_device(0.5), fixed_id=3))  # a constant made again, with the same value
    assert Source(fixed=_device(0.5), fixed_id=2).differs_from(
        Source(fixed=_device(0.25), fixed_id=3))
    assert not Source(batch_position=1).differs_from(Source(batch_position=1))
    assert Source(batch_position=0).differs_from(Source(batch_position=1))
    assert Source(batch_position=0).differs_from(Source(fixed=weight, fixed_id=1))


def test_a_plan_replays_only_batches_of_the_traced_structure_and_shapes():
    from torch.utils._pytree import tree_flatten

    batch = [_device(1.0, 2.0), _device(3.0)]
    _, spec = tree_flatten([(batch[0], batch[1])])
    plan = GroupPlan("hash", spec, ((((2,), torch.float32)), (((1,), torch.float32))), (),
                    spec, (), 0)
    assert plan.fits(spec, batch)
    assert not plan.fits(spec, [_device(1.0, 2.0, 3.0), _device(3.0)])
    _, dict_spec = tree_flatten([({"x": batch[0]}, batch[1])])
    assert not plan.fits(dict_spec, batch)
    other_graph = GroupPlan("other", spec, plan.batch_shapes, (), spec, (), 0)
    assert plan.difference(other_graph) == "two groups of steps traced different graphs"
    moved = GroupPlan("hash", spec, plan.batch_shapes, (Source(batch_position=1),), spec, (), 0)
    assert "different values" in GroupPlan(
        "hash", spec, plan.batch_shapes, (Source(batch_position=0),), spec, (), 0
    ).difference(moved)


SPMD_SCRIPT = r"""
import json, sys
import torch
from helpers import make_data, make_estimator, run_fresh
from torch.utils.data import TensorDataset
from test_replay import CALLS, counted_model_fn

model_dir = sys.argv[1]
make_estimator(model_dir, fn=counted_model_fn, strategy="spmd").train(
    lambda params: make_data(64), steps=2)
runs = {}
for replay in (False, True):
    estimator = make_estimator(model_dir, fn=counted_model_fn, strategy="spmd",
                               iterations_per_loop=6, tpu_config_extra={
                                   "replay_inference": replay, "inference_steps_per_execution": 3})
    CALLS.clear()
    metrics = estimator.evaluate(lambda params: make_data(120, seed=3))
    predictions = list(estimator.predict(lambda params: make_data(120, seed=4)))
    runs[str(replay)] = {"metrics": metrics, "calls": dict(CALLS),
                         "logits": torch.stack([p["logits"] for p in predictions]).tolist()}
print(json.dumps(runs))
"""


def test_replay_on_a_4_device_spmd_mesh_gives_the_traced_results(tmp_path):
    """The batch is split over 4 devices; groups of 3 steps, 5 groups per call."""
    runs = run_fresh(SPMD_SCRIPT, tmp_path, CPU_NUM_DEVICES="4")
    traced, replayed = runs["False"], runs["True"]
    assert traced["calls"] == {ModeKeys.EVAL: 15, ModeKeys.PREDICT: 15}
    assert replayed["calls"] == {ModeKeys.EVAL: 6, ModeKeys.PREDICT: 6}
    assert replayed["metrics"] == traced["metrics"] and replayed["logits"] == traced["logits"]
