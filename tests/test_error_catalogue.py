"""The error catalogue (README, "Errors"): each bad input gets its own clear message, and a
model_dir that already holds a trained model is byte for byte the same after the error."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import Net, make_data, make_estimator, model_fn, sgd

from torch_tpu_estimator import (
    NanLossDuringTrainingError,
    RunConfig,
    TPUConfig,
    TPUEstimator,
    TPUEstimatorSpec,
    metrics,
)


def _spec_fn(make_spec):
    """A model_fn whose TRAIN/EVAL/PREDICT answer is make_spec(logits, labels, mode)."""
    def fn(model, features, labels, mode, params):
        return make_spec(model(features), labels, mode)
    return fn


def _estimator(model_dir, fn=model_fn, **kwargs):
    arguments = dict(model_fn=fn, model_init_fn=lambda params: Net(), optimizer_fn=sgd,
                     model_dir=str(model_dir), train_batch_size=8, eval_batch_size=8,
                     predict_batch_size=8)
    arguments.update(kwargs)
    return TPUEstimator(**arguments)


def _train(fn=model_fn, data=None, **kwargs):
    data = make_data(32) if data is None else data
    return lambda model_dir: _estimator(model_dir, fn, **kwargs).train(lambda p: data, steps=2)


def _wrong_metric(labels, logits):
    return {"accuracy": float((logits.argmax(-1) == labels).float().mean())}


CATALOGUE = [
    ("model_fn-returns-a-dict",
     _train(lambda model, features, labels, mode, params: {"loss": model(features).sum()}),
     TypeError, "model_fn must return a TPUEstimatorSpec or EstimatorSpec in mode 'train', got "
                "dict"),
    ("train-spec-without-loss",
     _train(_spec_fn(lambda logits, labels, mode: TPUEstimatorSpec(mode, predictions=logits))),
     ValueError, "model_fn must return a spec with a scalar tensor `loss` in mode 'train', got "
                 "NoneType"),
    ("predict-spec-without-predictions",
     lambda model_dir: list(_estimator(model_dir, _spec_fn(
         lambda logits, labels, mode: TPUEstimatorSpec(mode, loss=logits.sum()))).predict(
         lambda params: make_data(8))),
     ValueError, "model_fn must return a spec with `predictions` in mode 'infer'"),
    ("non-scalar-loss",
     _train(_spec_fn(lambda logits, labels, mode: TPUEstimatorSpec(
         mode, loss=F.cross_entropy(logits, labels, reduction="none")))),
     ValueError, r"model_fn's loss must be a scalar tensor in mode 'train', got shape \(8,\)"),
    ("non-finite-loss",
     _train(_spec_fn(lambda logits, labels, mode: TPUEstimatorSpec(
         mode, loss=F.cross_entropy(logits, labels) * float("inf")))),
     NanLossDuringTrainingError, "model_fn's loss is inf at global step 5; stopped before "
                                 "writing a checkpoint for it"),
    ("features-and-labels-of-different-batch-sizes",
     lambda model_dir: _estimator(model_dir).train(
         lambda params: [(torch.zeros(8, 8), torch.zeros(6, dtype=torch.long))], steps=1),
     ValueError, r"share their first \(batch\) dimension.*\(8, 8\), \(6,\)"),
    ("input_fn-returns-a-tensor",
     lambda model_dir: _estimator(model_dir).train(lambda params: torch.zeros(8, 8), steps=1),
     TypeError, "input_fn returned a Tensor; return a Dataset"),
    ("input_fn-returns-an-empty-dataset", _train(data=make_data(0)),
     ValueError, "input_fn returned an empty Dataset"),
    ("metric_fn-returns-a-float",
     lambda model_dir: _estimator(model_dir, _spec_fn(lambda logits, labels, mode: TPUEstimatorSpec(
         mode, loss=F.cross_entropy(logits, labels),
         eval_metrics=(_wrong_metric, [labels, logits])))).evaluate(lambda params: make_data(8)),
     TypeError, "metric_fn's 'accuracy' is a float, not a Metric"),
    ("metric_fn-returns-a-list",
     lambda model_dir: _estimator(model_dir, _spec_fn(lambda logits, labels, mode: TPUEstimatorSpec(
         mode, loss=F.cross_entropy(logits, labels),
         eval_metrics=(lambda labels, logits: [metrics.accuracy(labels, logits.argmax(-1))],
                       [labels, logits])))).evaluate(lambda params: make_data(8)),
     TypeError, "metric_fn must return a dict of name -> Metric, got list"),
    ("batch-size-not-divisible-by-replicas",
     lambda model_dir: _estimator(model_dir, use_tpu=False, train_batch_size=9, config=RunConfig(
         tpu_config=TPUConfig(num_shards=2))),
     ValueError, r"train_batch_size=9 is not divisible by the number of replicas \(2\)"),
    ("reserved-params-key",
     lambda model_dir: _estimator(model_dir, params={"batch_size": 4}),
     ValueError, "params holds the reserved key 'batch_size'"),
    ("model_dir-is-a-file",
     lambda model_dir: _estimator(os.path.join(model_dir, "checkpoint.json")),
     ValueError, r"model_dir '.*checkpoint\.json' exists and is not a directory"),
    ("checkpoint-of-another-model",
     _train(model_init_fn=lambda params: torch.nn.Sequential(torch.nn.Linear(8, 2))),
     ValueError, r"does not fit the model built by model_init_fn: missing keys \['0.weight', "
                 r"'0.bias'\], unexpected keys \['layers.0.weight'"),
    ("steps-and-max_steps",
     lambda model_dir: _estimator(model_dir).train(lambda p: make_data(8), steps=1, max_steps=2),
     ValueError, "Can not provide both steps and max_steps"),
    ("evaluate-without-eval_batch_size",
     lambda model_dir: _estimator(model_dir, eval_batch_size=None).evaluate(
         lambda params: make_data(8)),
     ValueError, "eval_batch_size must be set in the constructor to eval"),
    ("unknown-predict_keys",
     lambda model_dir: list(_estimator(model_dir).predict(lambda params: make_data(8),
                                                          predict_keys=["class"])),
     ValueError, r"predict_keys \['class'\] are not in the predictions \['logits'\]"),
    ("model_init_fn-returns-a-str", _train(model_init_fn=lambda params: "net"),
     TypeError, "model_init_fn must return a torch.nn.Module, got str"),
    ("batch-larger-than-batch_size",
     lambda model_dir: _estimator(model_dir).train(
         lambda params: [(torch.zeros(16, 8), torch.zeros(16, dtype=torch.long))], steps=1),
     ValueError, r"batch of 16 examples but params\['batch_size'\] is 8"),
    ("warm_start_from-not-a-path",
     lambda model_dir: _estimator(model_dir, warm_start_from=3),
     TypeError, "warm_start_from must be a checkpoint path, a model_dir or a WarmStartSettings, "
                "got int"),
    ("export-example-features-that-do-not-fit",
     lambda model_dir: _estimator(model_dir).export_saved_model(
         os.path.join(model_dir, "export"), torch.zeros(2, 5)),
     ValueError, r"model_fn fails in PREDICT mode on the example features \(features: "
                 r"float32\[batch, 5\]\)"),
]


@pytest.fixture(scope="module")
def trained_model_dir(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("trained")
    make_estimator(model_dir, save_checkpoints_steps=2).train(lambda p: make_data(32), steps=4)
    return model_dir


def _contents(directory) -> dict[str, str]:
    """Every file under `directory` with the SHA-256 of its bytes, and every directory."""
    contents = {}
    for root, directories, names in os.walk(directory):
        for name in directories:
            contents[os.path.relpath(os.path.join(root, name), directory)] = "directory"
        for name in names:
            path = os.path.join(root, name)
            contents[os.path.relpath(path, directory)] = hashlib.sha256(
                open(path, "rb").read()).hexdigest()
    return contents


@pytest.mark.parametrize("call, error, message", [entry[1:] for entry in CATALOGUE],
                         ids=[entry[0] for entry in CATALOGUE])
def test_bad_input_is_a_clear_error_that_leaves_model_dir_unchanged(
        trained_model_dir, tmp_path, call, error, message):
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model_dir, model_dir)
    before = _contents(model_dir)
    assert any(name.startswith("model.ckpt-4") for name in before)

    with pytest.raises(error, match=message):
        call(str(model_dir))

    assert _contents(model_dir) == before
