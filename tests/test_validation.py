"""Every argument error is raised before any work, names the argument, and leaves model_dir as is."""

from __future__ import annotations

import pytest
import torch
from helpers import Net, make_data, make_estimator, model_fn, sgd

from torch_tpu_estimator import (
    DatasetConfig,
    EstimatorSpec,
    ModeKeys,
    RunConfig,
    TPUConfig,
    TPUEstimator,
    TPUEstimatorSpec,
)
from torch_tpu_estimator.api.spec import validate_spec
from torch_tpu_estimator.api.tpu_config import parse_iterations_per_loop


@pytest.mark.parametrize("value, expected", [(5, (5, None)), ("30s", (None, 30.0)),
                                             ("2m", (None, 120.0)), ("1.5h", (None, 5400.0))])
def test_iterations_per_loop_accepts_steps_or_a_duration(value, expected):
    assert parse_iterations_per_loop(value) == expected


@pytest.mark.parametrize("kwargs, message", [
    ({"iterations_per_loop": 0}, "iterations_per_loop must be a positive int, got 0"),
    ({"iterations_per_loop": "soon"}, "iterations_per_loop must be .* duration such as '30s'"),
    ({"iterations_per_loop": True}, "iterations_per_loop"),
    ({"num_shards": 0}, "num_shards must be a positive int or None, got 0"),
    ({"experimental_host_call_every_n_steps": None},
     "experimental_host_call_every_n_steps must be a positive int, got None"),
    ({"strategy": "ring"}, "strategy must be one of .*'ring'"),
    ({"per_host_input_for_training": "yes"}, "per_host_input_for_training must be a bool or one "
                                             "of TF's InputPipelineConfig modes"),
])
def test_tpu_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TPUConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"save_checkpoints_steps": 0}, "save_checkpoints_steps must be a positive int or None"),
    ({"keep_checkpoint_max": -1}, "keep_checkpoint_max must be a positive int or None"),
    ({"log_step_count_steps": 1.5}, "log_step_count_steps must be a positive int or None"),
    ({"save_summary_steps": "10"}, "save_summary_steps must be a positive int or None"),
    ({"seed": -3}, r"seed must be an int in \[0, 2\*\*64\), got -3"),
    ({"seed": 2**64}, r"seed must be an int in \[0, 2\*\*64\), got 18446744073709551616"),
    ({"dataset_config": None}, "dataset_config must be a DatasetConfig"),
    ({"tpu_config": {"iterations_per_loop": 4}}, "tpu_config must be a TPUConfig, got dict"),
    ({"model_dir": 7}, "model_dir must be a str or None"),
])
def test_run_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_workers": True}, "num_workers must be an int >= 0, got True"),
    ({"num_workers": -1}, "num_workers must be an int >= 0, got -1"),
    ({"num_epochs": 0}, "num_epochs must be a positive int or None, got 0"),
    ({"shuffle": 1}, "shuffle must be a bool, got 1"),
])
def test_dataset_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DatasetConfig(**kwargs)


def test_the_largest_seed_trains(tmp_path):
    """2**64 - 1 is the largest seed torch and torch_xla take (unsigned 64 bits)."""
    make_estimator(tmp_path, seed=2**64 - 1).train(lambda params: make_data(16), steps=2)
    assert make_estimator(tmp_path, seed=2**64 - 1).latest_checkpoint().endswith("-2.pt")


def _estimator(**overrides):
    kwargs = dict(model_fn=model_fn, model_init_fn=lambda p: Net(), optimizer_fn=sgd,
                  train_batch_size=8)
    kwargs.update(overrides)
    return TPUEstimator(**kwargs)


@pytest.mark.parametrize("overrides, error, message", [
    ({"params": {"batch_size": 3}}, ValueError, "reserved key 'batch_size'"),
    ({"params": {"context": None}}, ValueError, "reserved key 'context'"),
    ({"params": {"use_tpu": False}}, ValueError, "reserved key 'use_tpu'"),
    ({"params": [1]}, TypeError, "params must be a dict, got list"),
    ({"train_batch_size": 0}, ValueError, "train_batch_size must be a positive int, got 0"),
    ({"eval_batch_size": 2.0}, ValueError, "eval_batch_size must be a positive int, got 2.0"),
    ({"model_fn": None}, TypeError, "model_fn must be callable, got NoneType"),
    ({"model_init_fn": "Net"}, TypeError, "model_init_fn must be callable, got str"),
    ({"optimizer_fn": 0.1}, TypeError, "optimizer_fn must be callable, got float"),
    ({"config": {"seed": 1}}, TypeError, "config must be a RunConfig, got dict"),
    ({"batch_axis": (1, 0)}, ValueError, r"batch_axis=\(1, 0\) is not supported"),
    ({"use_tpu": "yes"}, TypeError, "use_tpu, eval_on_tpu and export_to_tpu must be bools"),
    ({"warm_start_from": 5}, TypeError, "warm_start_from must be a checkpoint path"),
])
def test_constructor_rejects_bad_arguments(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        _estimator(model_dir=str(tmp_path), **overrides)
    assert list(tmp_path.iterdir()) == []


def test_model_dir_that_is_a_file_is_rejected(tmp_path):
    path = tmp_path / "not_a_dir"
    path.write_text("keep me")
    with pytest.raises(ValueError, match="model_dir .*not_a_dir' exists and is not a directory"):
        _estimator(model_dir=str(path))
    assert path.read_text() == "keep me"


def test_model_dir_must_agree_with_config(tmp_path):
    with pytest.raises(ValueError, match="model_dir=.* and config.model_dir=.* differ"):
        _estimator(model_dir=str(tmp_path / "a"), config=RunConfig(model_dir=str(tmp_path / "b")))


def test_no_model_dir_uses_a_temporary_directory():
    estimator = _estimator()
    assert estimator.model_dir and estimator.config.model_dir == estimator.model_dir


def test_several_xla_cpu_devices_with_mp_strategy_point_to_spmd(monkeypatch):
    monkeypatch.setenv("CPU_NUM_DEVICES", "4")
    with pytest.raises(ValueError, match="strategy='spmd'"):
        _estimator()


@pytest.mark.parametrize("devices, use_tpu, tpu_config, batch, message", [
    ("4", True, {"strategy": "spmd"}, 6,
     r"train_batch_size=6 is not divisible by the number of replicas \(4\)"),
    ("4", True, {"strategy": "spmd", "num_shards": 2},
     8, "num_shards=2 does not match the 4 XLA device"),
    ("1", True, {"num_shards": 3}, 8, "num_shards=3 does not match the 1 XLA device"),
    ("1", False, {"num_shards": 4}, 10,
     r"train_batch_size=10 is not divisible by the number of replicas \(4\)"),
])
def test_replica_layout_errors_name_the_numbers(tmp_path, monkeypatch, devices, use_tpu,
                                                tpu_config, batch, message):
    monkeypatch.setenv("CPU_NUM_DEVICES", devices)
    with pytest.raises(ValueError, match=message):
        _estimator(model_dir=str(tmp_path), use_tpu=use_tpu, train_batch_size=batch,
                   config=RunConfig(tpu_config=TPUConfig(**tpu_config)))
    assert list(tmp_path.iterdir()) == []


def test_distributed_sampler_under_per_host_input_is_refused(tmp_path):
    data = make_data(16)
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=0)
    loader = torch.utils.data.DataLoader(data, batch_size=8, sampler=sampler)
    estimator = make_estimator(tmp_path)
    with pytest.raises(ValueError, match="DataLoader with a DistributedSampler, but this input "
                                         "is per-host"):
        estimator.train(lambda params: loader, steps=1)
    assert list(tmp_path.iterdir()) == []

    def sharded_by_context(params):  # per-replica input written for any replica count
        context = params["context"]
        sampler = torch.utils.data.DistributedSampler(
            data, num_replicas=context.num_input_pipelines, rank=context.input_pipeline_id)
        return torch.utils.data.DataLoader(data, batch_size=params["batch_size"], sampler=sampler)

    one_replica = make_estimator(tmp_path, per_host_input_for_training=False)
    one_replica.train(sharded_by_context, steps=2)
    assert one_replica.get_variable_value("global_step") == 2


def test_num_shards_must_agree_with_torchrun_world_size(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="num_shards=4 differs from WORLD_SIZE=2"):
        _estimator(use_tpu=False, config=RunConfig(tpu_config=TPUConfig(num_shards=4)))
    estimator = _estimator(use_tpu=False)  # under torchrun: one replica per rank
    assert (estimator.topology.num_replicas, estimator.caller_is_chief) == (2, True)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"steps": 3, "max_steps": 5}, ValueError, "both steps and max_steps"),
    ({"steps": 0}, ValueError, "steps must be a positive int, got 0"),
    ({"max_steps": -1}, ValueError, "max_steps must be a positive int, got -1"),
    ({"hooks": [object()]}, TypeError, "hooks must hold Hook instances, got object"),
    ({"saving_listeners": [object()]}, TypeError, "saving_listeners must hold Hook instances"),
])
def test_train_rejects_bad_arguments(tmp_path, kwargs, error, message):
    estimator = make_estimator(tmp_path)
    with pytest.raises(error, match=message):
        estimator.train(lambda params: make_data(16), **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_train_needs_train_batch_size_and_optimizer_fn(tmp_path):
    predictor = _estimator(model_dir=str(tmp_path), train_batch_size=None, optimizer_fn=None,
                           predict_batch_size=4)
    with pytest.raises(ValueError, match="train_batch_size must be set in the constructor"):
        predictor.train(lambda params: make_data(16), steps=1)
    with pytest.raises(ValueError, match="optimizer_fn must be given"):
        _estimator(model_dir=str(tmp_path), optimizer_fn=None).train(lambda p: make_data(16), steps=1)


@pytest.mark.parametrize("returned, message", [
    (lambda params: torch.zeros(4, 8), "input_fn returned a Tensor; return a Dataset"),
    (lambda params: (torch.zeros(4, 8), torch.zeros(4), torch.zeros(4)),
     "input_fn returned a tuple"),
    (lambda params: 42, "input_fn must return a Dataset, a DataLoader or an iterable"),
])
def test_input_fn_returning_an_unsupported_type(tmp_path, returned, message):
    with pytest.raises(TypeError, match=message):
        make_estimator(tmp_path).train(returned, steps=1)
    assert list(tmp_path.iterdir()) == []


def test_input_fn_returning_an_empty_dataset(tmp_path):
    with pytest.raises(ValueError, match="empty Dataset"):
        make_estimator(tmp_path).train(lambda params: make_data(0), steps=1)


def test_dataset_smaller_than_one_training_batch(tmp_path):
    with pytest.raises(ValueError, match="no complete training batch of 8 examples"):
        make_estimator(tmp_path).train(lambda params: make_data(5), steps=1)


def test_features_and_labels_of_different_batch_sizes(tmp_path):
    batches = [(torch.zeros(8, 8), torch.zeros(6, dtype=torch.long))]
    with pytest.raises(ValueError, match=r"share their first \(batch\) dimension.*\(8, 8\), \(6,\)"):
        make_estimator(tmp_path).train(lambda params: batches, steps=1)


def test_batch_larger_than_batch_size(tmp_path):
    batches = [(torch.zeros(16, 8), torch.zeros(16, dtype=torch.long))]
    with pytest.raises(ValueError, match="batch of 16 examples but params\\['batch_size'\\] is 8"):
        make_estimator(tmp_path).train(lambda params: batches, steps=1)


def test_model_init_fn_and_optimizer_fn_return_types(tmp_path):
    bad_model = _estimator(model_dir=str(tmp_path / "m"), model_init_fn=lambda p: "net")
    with pytest.raises(TypeError, match="model_init_fn must return a torch.nn.Module, got str"):
        bad_model.train(lambda params: make_data(16), steps=1)
    bad_optimizer = _estimator(model_dir=str(tmp_path / "o"), optimizer_fn=lambda m, p: "sgd")
    with pytest.raises(TypeError, match="optimizer_fn must return a torch.optim.Optimizer"):
        bad_optimizer.train(lambda params: make_data(16), steps=1)


@pytest.mark.parametrize("spec, mode, error, message", [
    ({"loss": 1}, ModeKeys.TRAIN, TypeError, "must return a TPUEstimatorSpec or EstimatorSpec"),
    (TPUEstimatorSpec(ModeKeys.EVAL, loss=torch.tensor(1.0)), ModeKeys.TRAIN, ValueError,
     "called in mode 'train' but returned a spec for 'eval'"),
    (TPUEstimatorSpec(ModeKeys.TRAIN), ModeKeys.TRAIN, ValueError,
     "scalar tensor `loss` in mode 'train', got NoneType"),
    (TPUEstimatorSpec(ModeKeys.TRAIN, loss=torch.ones(3, requires_grad=True)), ModeKeys.TRAIN,
     ValueError, r"loss must be a scalar tensor in mode 'train', got shape \(3,\)"),
    (TPUEstimatorSpec(ModeKeys.TRAIN, loss=torch.tensor(1.0)), ModeKeys.TRAIN, ValueError,
     "does not require grad"),
    (EstimatorSpec(ModeKeys.PREDICT), ModeKeys.PREDICT, ValueError, "with `predictions`"),
    (TPUEstimatorSpec(ModeKeys.EVAL, loss=torch.tensor(1.0), eval_metrics=(len,)),
     ModeKeys.EVAL, ValueError, r"eval_metrics must be a \(fn, tensors\) pair"),
    (TPUEstimatorSpec(ModeKeys.EVAL, loss=torch.tensor(1.0), eval_metrics=(len, torch.ones(2))),
     ModeKeys.EVAL, ValueError, r"eval_metrics\[1\] must be a list or dict of tensors"),
])
def test_validate_spec_says_what_is_wrong(spec, mode, error, message):
    with pytest.raises(error, match=message):
        validate_spec(spec, mode)


def test_checkpoint_of_a_different_model_names_missing_and_unexpected_keys(tmp_path):
    make_estimator(tmp_path).train(lambda params: make_data(16), steps=1)
    before = sorted(path.name for path in tmp_path.iterdir())
    other = _estimator(model_dir=str(tmp_path),
                       model_init_fn=lambda p: torch.nn.Sequential(torch.nn.Linear(8, 2)))
    with pytest.raises(ValueError, match=r"missing keys \['0.weight', '0.bias'\], unexpected keys "
                                         r"\['layers.0.weight'"):
        other.train(lambda params: make_data(16), steps=1)
    wider = _estimator(model_dir=str(tmp_path), model_init_fn=lambda p: Net(hidden=32))
    with pytest.raises(ValueError, match="(?s)does not fit the model .*size mismatch for layers.0.weight"):
        wider.train(lambda params: make_data(16), steps=1)
    assert sorted(path.name for path in tmp_path.iterdir()) == before
