"""evaluate and predict are exact to the last example, whatever the data set size."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import Net, make_data, make_estimator, read_scalars

from torch_tpu_estimator import EstimatorSpec, ModeKeys, TPUEstimatorSpec, metrics

BATCH = 8


def metric_fn(labels, logits):
    predictions = logits.argmax(-1)
    return {
        "accuracy": metrics.accuracy(labels, predictions),
        "precision": metrics.precision(labels, predictions),
        "recall": metrics.recall(labels, predictions),
        "mse": metrics.mean_squared_error(labels.float(), logits.softmax(-1)[:, 1]),
    }


def exact_model_fn(model, features, labels, mode, params):
    logits = model(features)
    if mode == ModeKeys.PREDICT:
        return TPUEstimatorSpec(mode, predictions={"logits": logits, "class": logits.argmax(-1)})
    if mode == ModeKeys.TRAIN:
        return TPUEstimatorSpec(mode, loss=F.cross_entropy(logits, labels))
    per_example = F.cross_entropy(logits, labels, reduction="none")
    return TPUEstimatorSpec(mode, loss=per_example, eval_metrics=(metric_fn, [labels, logits]))


def eager_outputs(estimator, data):
    """The checkpoint's model run eagerly on CPU over all examples at once."""
    model = Net()
    state = torch.load(estimator.latest_checkpoint(), weights_only=True)
    model.load_state_dict(state["model"])
    model.eval()
    with torch.no_grad():
        return model(data.tensors[0])


@pytest.fixture(scope="module", params=[True, False], ids=["xla", "torch"])
def trained(request, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("trained")
    estimator = make_estimator(model_dir, use_tpu=request.param, fn=exact_model_fn,
                               iterations_per_loop=2)
    estimator.train(lambda params: make_data(64, seed=1), steps=6)
    return estimator


@pytest.mark.parametrize("size", [1, BATCH - 1, BATCH, BATCH + 1, 3 * BATCH + 5])
def test_evaluate_equals_one_shot_metrics(trained, size):
    data = make_data(size, seed=2)
    results = trained.evaluate(lambda params: data)
    logits = eager_outputs(trained, data)
    labels = data.tensors[1]
    predictions = logits.argmax(-1)
    true_positives = float(((labels == 1) & (predictions == 1)).sum())
    expected = {
        "loss": F.cross_entropy(logits, labels).item(),
        "accuracy": (predictions == labels).double().mean().item(),
        "precision": true_positives / max(1.0, float((predictions == 1).sum())),
        "recall": true_positives / max(1.0, float((labels == 1).sum())),
        "mse": ((labels.double() - logits.double().softmax(-1)[:, 1]) ** 2).mean().item(),
    }
    assert results.pop("global_step") == 6
    assert results == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("size", [1, BATCH - 1, BATCH, BATCH + 1, 3 * BATCH + 5])
def test_predict_yields_every_example_in_order(trained, size):
    data = make_data(size, seed=3)
    predictions = list(trained.predict(lambda params: data))
    assert len(predictions) == size
    logits = eager_outputs(trained, data)
    got = torch.stack([item["logits"] for item in predictions])
    torch.testing.assert_close(got, logits, rtol=1e-5, atol=1e-5)
    assert [int(item["class"]) for item in predictions] == logits.argmax(-1).tolist()


def test_predict_batches_keys_and_early_stop(trained):
    data = make_data(3 * BATCH + 5, seed=4)
    batches = list(trained.predict(lambda params: data, yield_single_examples=False,
                                   predict_keys=["class"]))
    assert [set(batch) for batch in batches] == [{"class"}] * 4
    assert [len(batch["class"]) for batch in batches] == [8, 8, 8, 5]
    with pytest.raises(ValueError, match=r"predict_keys \['nope'\] are not in the predictions"):
        next(trained.predict(lambda params: data, predict_keys=["nope"]))

    before = threading.active_count()
    generator = trained.predict(lambda params: data)
    first = [next(generator) for _ in range(3)]
    generator.close()
    assert len(first) == 3 and threading.active_count() == before


def test_eval_metrics_as_list_or_dict_give_the_same_results(tmp_path):
    """The seed's MNIST example, in PyTorch: metric_fn(labels, logits), tensors as list or dict."""
    def seed_metric_fn(labels, logits):
        predictions = logits.argmax(1)
        return {"accuracy": metrics.precision(labels=labels, predictions=predictions)}

    def model_fn_with(as_dict):
        def model_fn(model, features, labels, mode, params):
            logits = model(features)
            loss = F.cross_entropy(logits, labels)
            if mode == ModeKeys.EVAL:
                tensors = {"labels": labels, "logits": logits} if as_dict else [labels, logits]
                return TPUEstimatorSpec(mode=mode, loss=loss, eval_metrics=(seed_metric_fn, tensors))
            return TPUEstimatorSpec(mode=mode, loss=loss)
        return model_fn

    data = make_data(21, seed=5)
    as_list = make_estimator(tmp_path, fn=model_fn_with(False))
    as_list.train(lambda params: make_data(64), steps=3)
    as_dict = make_estimator(tmp_path, fn=model_fn_with(True))
    assert as_list.evaluate(lambda params: data) == as_dict.evaluate(lambda params: data)


def test_scalar_tensors_give_one_value_per_step_and_replica(trained, tmp_path):
    seen = {}

    def model_fn(model, features, labels, mode, params):
        logits = model(features)
        loss = F.cross_entropy(logits, labels)

        def metric_fn(batch_loss):
            seen.setdefault("shapes", []).append(tuple(batch_loss.shape))
            return {"mean_batch_loss": metrics.mean(batch_loss)}

        return TPUEstimatorSpec(mode, loss=loss, eval_metrics=(metric_fn, {"batch_loss": loss}))

    estimator = make_estimator(tmp_path, fn=model_fn, iterations_per_loop=10)
    results = estimator.evaluate(lambda params: make_data(20), checkpoint_path=trained.model_dir)
    assert seen["shapes"] == [(3,)]  # three batches of 8, 8 and 4 real examples
    assert set(results) == {"mean_batch_loss", "loss", "global_step"}


def test_metric_named_global_step_or_not_a_metric_is_an_error(trained, tmp_path):
    def with_metrics(returned):
        def model_fn(model, features, labels, mode, params):
            loss = F.cross_entropy(model(features), labels)
            return TPUEstimatorSpec(mode, loss=loss,
                                    eval_metrics=(lambda labels: returned, [labels]))
        return model_fn

    reserved = make_estimator(tmp_path, fn=with_metrics({"global_step": metrics.mean(torch.ones(1))}))
    with pytest.raises(ValueError, match="metric named 'global_step'"):
        reserved.evaluate(lambda params: make_data(9), checkpoint_path=trained.model_dir)
    plain = make_estimator(tmp_path, fn=with_metrics({"acc": 0.5}))
    with pytest.raises(TypeError, match="metric_fn's 'acc' is a float, not a Metric"):
        plain.evaluate(lambda params: make_data(9), checkpoint_path=trained.model_dir)


def test_eval_on_tpu_false_runs_an_estimator_spec_on_plain_pytorch(trained, tmp_path):
    devices = set()

    def model_fn(model, features, labels, mode, params):
        devices.add(features.device.type)
        logits = model(features)
        return EstimatorSpec(mode, loss=F.cross_entropy(logits, labels),
                             eval_metrics=(metric_fn, [labels, logits]))

    estimator = make_estimator(tmp_path, fn=model_fn, eval_on_tpu=False)
    cpu_results = estimator.evaluate(lambda params: make_data(16), checkpoint_path=trained.model_dir)
    assert devices == {"cpu"}
    reference = trained.evaluate(lambda params: make_data(16))
    assert cpu_results["accuracy"] == pytest.approx(reference["accuracy"])


def test_evaluate_writes_eval_summaries_and_needs_a_checkpoint(trained, tmp_path):
    trained.evaluate(lambda params: make_data(9), name="holdout")
    scalars = read_scalars(trained.eval_dir("holdout"))
    assert set(scalars) >= {"accuracy", "loss"} and list(scalars["accuracy"]) == [6]
    assert trained.eval_dir() == str(trained.model_dir) + "/eval"
    with pytest.raises(ValueError, match="Could not find a trained model"):
        make_estimator(tmp_path).evaluate(lambda params: make_data(9))
    assert list(tmp_path.iterdir()) == []


def test_evaluate_steps_limits_the_batches(trained):
    results = trained.evaluate(lambda params: make_data(40, seed=6), steps=2)
    first_16 = trained.evaluate(lambda params: make_data(40, seed=6).__class__(
        *[tensor[:16] for tensor in make_data(40, seed=6).tensors]))
    assert results == first_16
