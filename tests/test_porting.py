"""A TPUEstimator program ports without surprises: TF's argument names and orders, the spec's
hooks, input that ends, TF's input modes by name, time-based and hourly checkpoints, warm start
of a new head, and the TF arguments that only configure graphs."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import Net, make_data, make_estimator, run_fresh, sgd
from torch.utils.data import TensorDataset

from torch_tpu_estimator import (
    DatasetConfig,
    EstimatorSpec,
    Hook,
    InputPipelineConfig,
    ModeKeys,
    RunConfig,
    StopAtStepHook,
    TPUConfig,
    TPUEstimator,
    TPUEstimatorSpec,
    WarmStartSettings,
)
from torch_tpu_estimator.api.job import Job
from torch_tpu_estimator.data import TensorSlices
from torch_tpu_estimator.runtime.base import Topology
from torch_tpu_estimator.runtime.torch_dist import TorchReplica
from torch_tpu_estimator.state import checkpoint
from torch_tpu_estimator.state.warm_start import warm_start
from torch_tpu_estimator.step.context import ModeContext


def _spec(mode, logits, labels):
    if mode == ModeKeys.PREDICT:
        return TPUEstimatorSpec(mode, predictions={"logits": logits})
    return TPUEstimatorSpec(mode, loss=F.cross_entropy(logits, labels))


# The seed page's order (features, labels, params, mode), TF's four and five names, and the
# module added by name where the TF program built its layers.
def seed_order_model_fn(features, labels, params, mode, model):
    assert params["batch_size"] == 8 and mode in ModeKeys.ALL
    return _spec(mode, model(features), labels)


def five_argument_model_fn(features, labels, mode, config, params, model):
    assert isinstance(config, RunConfig) and config.seed == 0 and "batch_size" in params
    return _spec(mode, model(features), labels)


def tf_input_fn(params, mode, config, input_context):
    assert params["batch_size"] == 8 and input_context.input_pipeline_id == 0
    assert isinstance(config, RunConfig) and mode in ModeKeys.ALL
    return make_data(40)


@pytest.mark.parametrize("fn", [seed_order_model_fn, five_argument_model_fn])
def test_tf_style_model_fns_and_input_fns_run_unchanged(tmp_path, fn):
    estimator = make_estimator(tmp_path, fn=fn)
    estimator.train(tf_input_fn, steps=3)
    assert estimator.evaluate(tf_input_fn)["global_step"] == 3
    assert len(list(estimator.predict(lambda mode, params: make_data(5)))) == 5


def test_get_variable_value_takes_a_name_or_a_list_of_names(tmp_path):
    estimator = make_estimator(tmp_path)
    estimator.train(lambda params: make_data(16), steps=1)
    step, bias = estimator.get_variable_value(["global_step", "layers.0.bias"])
    assert step == 1 and (bias == estimator.get_variable_value("layers.0.bias")).all()


def test_predict_passes_labels_none_as_tf_does(tmp_path):
    seen = []

    def recording_model_fn(features, labels, mode, model):
        seen.append((mode, labels is None))
        return _spec(mode, model(features), labels)

    estimator = make_estimator(tmp_path, fn=recording_model_fn)
    estimator.train(lambda params: make_data(16), steps=1)
    list(estimator.predict(lambda params: make_data(8)))  # the Dataset holds labels
    assert seen == [(ModeKeys.TRAIN, False), (ModeKeys.PREDICT, True)]


def _noise_input_fn(params):
    """TF's DCGAN noise_input_fn: one batch of noise features returned as they are."""
    noise = torch.randn(params["batch_size"], 8, generator=torch.Generator().manual_seed(0))
    return {"random_noise": noise}, None


def test_an_input_fn_returning_features_and_none_is_one_batch_as_in_tf(tmp_path):
    def noise_model_fn(features, mode, model):
        return TPUEstimatorSpec(mode, predictions={"logits": model(features["random_noise"])})

    make_estimator(tmp_path).train(lambda params: make_data(16), steps=1)
    estimator = make_estimator(tmp_path, fn=noise_model_fn)
    predictions = list(estimator.predict(_noise_input_fn))
    assert len(predictions) == 8  # predict_batch_size rows, once
    direct = list(estimator.predict(lambda params: TensorSlices(_noise_input_fn(params)[0])))
    assert all(torch.equal(a["logits"], b["logits"]) for a, b in zip(
        predictions, direct, strict=True))


@pytest.mark.parametrize("mode, rows, message", [
    ("train", 12, r"one batch .* of 12 rows; params\['batch_size'\] is 8\. To give a data set"),
    ("train", 4, r"of 4 rows; params\['batch_size'\] is 8 and training needs whole batches"),
    ("infer", 12, r"of 12 rows; params\['batch_size'\] is 8\. To give a data set, return "
                  r"TensorDataset"),
])
def test_one_batch_that_does_not_fit_the_batch_size_is_refused_before_any_step(
        tmp_path, mode, rows, message):
    make_estimator(tmp_path / "trained").train(lambda params: make_data(16), steps=1)
    estimator = make_estimator(tmp_path / "trained", fn=_counting(model_fn_calls := []))
    features, labels = make_data(rows).tensors
    with pytest.raises(ValueError, match=message):
        if mode == "train":
            estimator.train(lambda params: (features, labels), steps=1)
        else:
            list(estimator.predict(lambda params: (features, None)))
    assert model_fn_calls == []


def _counting(calls: list):
    def counting_model_fn(features, labels, mode, model):
        calls.append(mode)
        return _spec(mode, model(features), labels)
    return counting_model_fn


class PhaseRecorder(Hook):
    def __init__(self):
        self.calls = []

    def begin(self, context):
        self.calls.append(("begin", context.mode))

    def after_window(self, context, window):
        self.calls.append(("after_window", window.last_step))

    def end(self, context):
        self.calls.append(("end", context.mode))


def test_the_specs_hooks_run_in_every_mode(tmp_path):
    recorders = {mode: PhaseRecorder() for mode in ModeKeys.ALL}

    def model_fn(features, labels, mode, model):
        spec = _spec(mode, model(features), labels)
        field = {ModeKeys.TRAIN: "training_hooks", ModeKeys.EVAL: "evaluation_hooks",
                 ModeKeys.PREDICT: "prediction_hooks"}[mode]
        setattr(spec, field, [recorders[mode]])
        return spec

    estimator = make_estimator(tmp_path, fn=model_fn, iterations_per_loop=2)
    estimator.train(lambda params: make_data(64), steps=5)
    estimator.evaluate(lambda params: make_data(24))
    list(estimator.predict(lambda params: make_data(20)))
    assert recorders[ModeKeys.TRAIN].calls == [("begin", "train"), ("after_window", 2),
                                               ("after_window", 4), ("after_window", 5),
                                               ("end", "train")]
    assert recorders[ModeKeys.EVAL].calls == [("begin", "eval"), ("after_window", 5),
                                              ("after_window", 5), ("end", "eval")]
    assert recorders[ModeKeys.PREDICT].calls[0] == ("begin", "infer")
    assert recorders[ModeKeys.PREDICT].calls[-1] == ("end", "infer")
    assert len(recorders[ModeKeys.PREDICT].calls) == 4  # 3 batches of 8 in windows of 2


def test_a_stop_hook_among_the_specs_training_hooks_ends_on_its_step(tmp_path):
    def model_fn(features, labels, mode, model):
        spec = _spec(mode, model(features), labels)
        spec.training_hooks = [StopAtStepHook(last_step=6)]
        return spec

    estimator = make_estimator(tmp_path, fn=model_fn, iterations_per_loop=4)
    estimator.train(lambda params: make_data(64), steps=20)
    assert estimator.get_variable_value("global_step") == 6


def test_an_estimator_spec_trains_on_plain_pytorch(tmp_path):
    def model_fn(features, labels, mode, model):
        logits = model(features)
        if mode == ModeKeys.PREDICT:
            return EstimatorSpec(mode, predictions={"logits": logits})
        return EstimatorSpec(mode, loss=F.cross_entropy(logits, labels))

    estimator = make_estimator(tmp_path, fn=model_fn, use_tpu=False)
    estimator.train(lambda params: make_data(64), steps=3)
    assert estimator.get_variable_value("global_step") == 3


def test_a_spec_hook_that_is_not_a_hook_is_named(tmp_path):
    def model_fn(features, labels, mode, model):
        spec = _spec(mode, model(features), labels)
        spec.training_hooks = [object()]
        return spec

    with pytest.raises(TypeError, match="TPUEstimatorSpec.training_hooks must hold Hook "
                                        "instances, got object"):
        make_estimator(tmp_path, fn=model_fn).train(lambda params: make_data(16), steps=1)


# --- input that ends ---------------------------------------------------------------------

def test_train_without_a_limit_reads_one_pass_per_call(tmp_path, caplog):
    estimator = make_estimator(tmp_path, iterations_per_loop=4)
    data = make_data(20)  # 2 whole batches of 8 a pass
    with caplog.at_level(logging.INFO, logger="torch_tpu_estimator"):
        estimator.train(lambda params: data)
    assert estimator.get_variable_value("global_step") == 2
    assert "Input ended at global step 2: one pass over the data" in caplog.text
    estimator.train(lambda params: data)  # the next call reads the next pass
    assert estimator.get_variable_value("global_step") == 4


def test_num_epochs_counts_passes_since_the_first_step(tmp_path):
    estimator = make_estimator(tmp_path, dataset_config=DatasetConfig(num_epochs=3))
    data = make_data(20)
    estimator.train(lambda params: data, max_steps=100)
    assert estimator.get_variable_value("global_step") == 6
    estimator.train(lambda params: data, max_steps=100)  # three passes are done: nothing
    assert estimator.get_variable_value("global_step") == 6
    limited = make_estimator(tmp_path / "steps", dataset_config=DatasetConfig(num_epochs=3))
    limited.train(lambda params: data, steps=5)  # the step limit comes first
    assert limited.get_variable_value("global_step") == 5


# --- TF's input modes by name -------------------------------------------------------------

@pytest.mark.parametrize("mode, per_host", [
    (True, True), (False, False), (InputPipelineConfig.PER_HOST_V1, True),
    ("PER_HOST_V1", True), (InputPipelineConfig.BROADCAST, True), (InputPipelineConfig.SLICED, True),
    (InputPipelineConfig.PER_SHARD_V1, False), (InputPipelineConfig.PER_HOST_V2, False)])
def test_tf_input_modes_map_onto_the_two_layouts(tmp_path, mode, per_host):
    config = RunConfig(tpu_config=TPUConfig(per_host_input_for_training=mode))
    job = Job(model_fn=None, model_init_fn=None, optimizer_fn=None, params={}, config=config,
              model_dir=str(tmp_path), batch_sizes={ModeKeys.TRAIN: 8})
    two_replicas = Topology("torch", num_replicas=2, num_processes=2)
    shards = ModeContext(job, TorchReplica(two_replicas, 1), ModeKeys.TRAIN).input_shards()
    assert [(shard.key, shard.batch_size) for shard in shards] == (
        [("host", 8)] if per_host else [("replica1", 4)])


PER_HOST_V2_ON_A_MESH = r"""
import json
from helpers import make_estimator
from torch_tpu_estimator import InputPipelineConfig
try:
    make_estimator("unused", strategy="spmd",
                   per_host_input_for_training=InputPipelineConfig.PER_HOST_V2)
except ValueError as error:
    print(json.dumps(str(error)))
"""


def test_per_host_v2_on_an_spmd_mesh_is_refused_with_the_way_out():
    message = run_fresh(PER_HOST_V2_ON_A_MESH, CPU_NUM_DEVICES="4")
    assert message.startswith("per_host_input_for_training=PER_HOST_V2 cannot be honoured on an "
                              "SPMD mesh of 4 devices")
    assert "Use PER_HOST_V1" in message


# --- checkpoints by time ------------------------------------------------------------------

class Clock:
    """checkpoint.now, advanced by a hook at every window end."""

    def __init__(self, seconds_per_window: float):
        self.time, self.step = 1_000_000.0, seconds_per_window

    def __call__(self) -> float:
        return self.time


class AdvanceClock(Hook):
    def __init__(self, clock):
        self.clock = clock

    def after_window(self, context, window):
        self.clock.time += self.clock.step


def _checkpoints(model_dir) -> list[int]:
    return sorted(checkpoint.step_of(str(path)) for path in model_dir.glob("model.ckpt-*.pt"))


def test_save_checkpoints_secs_saves_by_the_clock(tmp_path, monkeypatch):
    clock = Clock(seconds_per_window=25)
    monkeypatch.setattr(checkpoint, "now", clock)
    estimator = make_estimator(tmp_path, iterations_per_loop=1, save_checkpoints_steps=None,
                               save_checkpoints_secs=60, keep_checkpoint_max=None)
    estimator.train(lambda params: make_data(64), steps=7, hooks=[AdvanceClock(clock)])
    assert _checkpoints(tmp_path) == [3, 6, 7]  # 75 s and 150 s after the start, and the end


def test_keep_checkpoint_every_n_hours_keeps_one_per_period_besides_the_newest(tmp_path,
                                                                              monkeypatch):
    clock = Clock(seconds_per_window=1800)  # a checkpoint every half hour of the clock
    monkeypatch.setattr(checkpoint, "now", clock)
    estimator = make_estimator(tmp_path, iterations_per_loop=1, save_checkpoints_steps=1,
                               keep_checkpoint_max=2, keep_checkpoint_every_n_hours=1.0)
    estimator.train(lambda params: make_data(64), steps=8, hooks=[AdvanceClock(clock)])
    # written at 0.5 h, 1 h, ... after the first save at step 1: steps 3, 5, 7 are an hour
    # apart; 7 is still among the newest two (7, 8), so it is not yet set aside for good
    assert _checkpoints(tmp_path) == [3, 5, 7, 8]
    assert checkpoint.read_index(str(tmp_path)).preserved == ["model.ckpt-3.pt", "model.ckpt-5.pt"]


def test_retention_below_the_facade():
    index = checkpoint.Index()
    for step in range(1, 7):
        index.digests[f"model.ckpt-{step}.pt"] = None
        index.written[f"model.ckpt-{step}.pt"] = 1000.0 * step
    index.hours_anchor = 1000.0
    deleted = checkpoint.retain(index, keep_max=2, every_n_hours=2000 / 3600)
    assert deleted == ["model.ckpt-1.pt", "model.ckpt-2.pt", "model.ckpt-4.pt"]
    assert index.preserved == ["model.ckpt-3.pt"]
    assert list(index.digests) == ["model.ckpt-3.pt", "model.ckpt-5.pt", "model.ckpt-6.pt"]
    assert checkpoint.retain(index, keep_max=None, every_n_hours=None) == []


# --- warm start ---------------------------------------------------------------------------

class WiderHead(torch.nn.Module):
    """helpers.Net's layers, with three classes instead of two."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                          torch.nn.Dropout(0.0), torch.nn.Linear(16, 3))

    def forward(self, x):
        return self.layers(x)


def test_warm_start_takes_the_body_and_skips_a_new_head_with_a_log_line(tmp_path, caplog):
    source = make_estimator(tmp_path / "pretrained")
    source.train(lambda params: make_data(64), steps=5)
    estimator = make_estimator(tmp_path / "fine-tuned", model_init_fn=lambda params: WiderHead(),
                               warm_start_from=WarmStartSettings(str(tmp_path / "pretrained")))
    with caplog.at_level(logging.INFO, logger="torch_tpu_estimator"):
        estimator.train(lambda params: TensorDataset(make_data(64).tensors[0],
                                                     torch.arange(64) % 3), steps=1)
    assert "Warm started 2 of the model's 4 weights" in caplog.text
    assert "Warm start skipped layers.3.weight (shape [2, 16] in the checkpoint, [3, 16] in " \
           "the model)" in caplog.text
    # one SGD step from the pretrained body: close to it, far from a fresh layer
    pretrained = source.get_variable_value("layers.0.weight")
    assert abs(estimator.get_variable_value("layers.0.weight") - pretrained).max() < 0.05
    assert estimator.get_variable_value("global_step") == 1


def test_warm_start_selects_by_regex_or_list_and_renames(tmp_path):
    source = make_estimator(tmp_path / "pretrained")
    source.train(lambda params: make_data(64), steps=5)
    pretrained = {name: source.get_variable_value(name)
                  for name in ("layers.0.weight", "layers.0.bias")}
    torch.manual_seed(0)
    fresh = Net().state_dict()
    for settings, taken in [
            (WarmStartSettings(str(tmp_path / "pretrained"), vars_to_warm_start="layers\\.0\\..*"),
             {"layers.0.weight", "layers.0.bias"}),
            (WarmStartSettings(str(tmp_path / "pretrained"), vars_to_warm_start=["layers.0.bias"]),
             {"layers.0.bias"})]:
        model = Net()
        model.load_state_dict(fresh)
        warm_start(model, settings)
        for name in ("layers.0.weight", "layers.0.bias"):
            expected = pretrained[name] if name in taken else fresh[name].numpy()
            assert (model.state_dict()[name].numpy() == expected).all(), (settings, name)
    renamed = torch.nn.ModuleDict({"body": torch.nn.Linear(8, 16), "head": torch.nn.Linear(16, 5)})
    warm_start(renamed, WarmStartSettings(str(tmp_path / "pretrained"), vars_to_warm_start=None,
                                          var_name_to_prev_var_name={
                                              "body.weight": "layers.0.weight",
                                              "body.bias": "layers.0.bias"}))
    assert (renamed["body"].weight.detach().numpy() == pretrained["layers.0.weight"]).all()
    assert (renamed["body"].bias.detach().numpy() == pretrained["layers.0.bias"]).all()


def test_warm_start_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"vars_to_warm_start '\(' is not a regular expression"):
        WarmStartSettings(str(tmp_path), vars_to_warm_start="(")
    with pytest.raises(TypeError, match="ckpt_to_initialize_from must be a checkpoint path"):
        WarmStartSettings(3)


# --- host_call every n steps, TF's graph-only arguments, export_savedmodel ------------------

def test_host_call_every_n_steps(tmp_path):
    calls = []

    def model_fn(features, labels, mode, model):
        spec = _spec(mode, model(features), labels)
        if mode == ModeKeys.TRAIN:
            spec.host_call = (lambda loss, global_step: calls.append(global_step),
                              [spec.loss.detach()])
        return spec

    estimator = make_estimator(tmp_path, fn=model_fn, iterations_per_loop=3,
                               tpu_config_extra={"experimental_host_call_every_n_steps": 2})
    estimator.train(lambda params: make_data(64), steps=7)
    assert calls == [2, 4, 6]


def test_tf_graph_arguments_are_accepted_with_one_warning(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = RunConfig(master="grpc://10.0.0.2:8470", session_config=object(),
                           tpu_config=TPUConfig(tpu_job_name="tpu_worker",
                                                initial_infeed_sleep_secs=5))
    messages = [str(warning.message) for warning in caught]
    assert "RunConfig ignores master, session_config: they configure TF graphs" in messages[-1]
    assert "TPUConfig ignores initial_infeed_sleep_secs, tpu_job_name" in messages[0]
    estimator = TPUEstimator(model_fn=five_argument_model_fn, model_init_fn=lambda params: Net(),
                             optimizer_fn=sgd, model_dir=str(tmp_path), config=config,
                             train_batch_size=8, eval_batch_size=8)
    estimator.train(lambda params: make_data(16), steps=1)
    path = estimator.export_savedmodel(str(tmp_path / "exports"), torch.zeros(1, 8),
                                       strip_default_attrs=True, batch_sizes=(1,))
    assert path.startswith(str(tmp_path / "exports")) and math.isfinite(
        float(estimator.evaluate(lambda params: make_data(8))["loss"]))
