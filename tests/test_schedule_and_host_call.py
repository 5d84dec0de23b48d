"""train_and_evaluate with best-checkpoint and early-stopping hooks; host_call in TRAIN specs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import make_data, make_estimator, model_fn, read_scalars

from torch_tpu_estimator import (
    DatasetConfig,
    EarlyStopping,
    Hook,
    KeepBestCheckpoint,
    ModeKeys,
    RunContext,
    TPUEstimatorSpec,
    train_and_evaluate,
)


class Scripted(Hook):
    """Replaces the measured loss by a scripted sequence, so the hooks' decisions are known."""

    def __init__(self, losses):
        self.losses = list(losses)

    def after_evaluation(self, context, results, checkpoint_path):
        results["loss"] = self.losses.pop(0)


def test_train_and_evaluate_keeps_the_best_and_stops_early(tmp_path):
    estimator = make_estimator(tmp_path / "run", save_checkpoints_steps=None)
    best = KeepBestCheckpoint(str(tmp_path / "best"))
    history = train_and_evaluate(
        estimator, lambda params: make_data(64), lambda params: make_data(20),
        max_steps=40, steps_between_evals=4,
        eval_hooks=[Scripted([0.9, 0.5, 0.7, 0.6, 0.8, 0.1]), best, EarlyStopping(patience=3)])
    assert [int(results["global_step"]) for results in history] == [4, 8, 12, 16, 20]
    record = json.loads((tmp_path / "best" / "best.json").read_text())
    assert record["checkpoint"] == "model.ckpt-8.pt" and record["results"]["loss"] == 0.5
    kept = torch.load(tmp_path / "best" / "model.ckpt-8.pt", weights_only=True)
    assert kept["global_step"] == 8


def test_train_and_evaluate_runs_to_max_steps(tmp_path):
    estimator = make_estimator(tmp_path)
    history = train_and_evaluate(estimator, lambda params: make_data(64),
                                 lambda params: make_data(20), max_steps=10, steps_between_evals=4)
    assert [int(results["global_step"]) for results in history] == [4, 8, 10]
    assert history[-1]["loss"] < history[0]["loss"] * 1.5


def test_train_and_evaluate_stops_when_the_input_ends_before_max_steps(tmp_path):
    estimator = make_estimator(tmp_path, dataset_config=DatasetConfig(num_epochs=1))
    history = train_and_evaluate(estimator, lambda params: make_data(64),  # 8 steps of 8 rows
                                 lambda params: make_data(20), max_steps=100, steps_between_evals=5)
    assert [int(results["global_step"]) for results in history] == [5, 8]


def test_the_best_sharded_checkpoint_is_kept_as_a_whole_directory(tmp_path):
    sharded = tmp_path / "run" / "model.ckpt-8"
    sharded.mkdir(parents=True)
    files = {"__0_0.distcp": b"\x01\x02" * 100, "tensors.json": b"{}", "state.pt": b"state"}
    for name, content in files.items():
        (sharded / name).write_bytes(content)
    context = RunContext(ModeKeys.EVAL, 8, True, str(tmp_path / "run"))
    KeepBestCheckpoint(str(tmp_path / "best")).after_evaluation(
        context, {"loss": 0.5, "global_step": 8}, str(sharded))
    kept = tmp_path / "best" / "model.ckpt-8"
    assert {path.name: path.read_bytes() for path in kept.iterdir()} == files
    assert json.loads((tmp_path / "best" / "best.json").read_text())["checkpoint"] == "model.ckpt-8"
    assert [path.name for path in (tmp_path / "best").iterdir() if path.name.startswith(".")] == []


def test_host_call_runs_each_step_with_gathered_tensors_at_window_ends(tmp_path):
    calls = []

    def host_fn(loss, labels, global_step):
        calls.append((global_step, tuple(loss.shape), tuple(labels.shape)))

    def host_model_fn(model, features, labels, mode, params):
        spec = model_fn(model, features, labels, mode, params)
        return TPUEstimatorSpec(mode, loss=spec.loss, host_call=(host_fn, [spec.loss, labels]))

    estimator = make_estimator(tmp_path, fn=host_model_fn, iterations_per_loop=3)
    estimator.train(lambda params: make_data(64), steps=7)
    assert calls == [(step, (1,), (8,)) for step in range(1, 8)]


def test_host_call_writes_custom_summaries(tmp_path):
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "custom"))

    def host_fn(global_step, logits_norm):
        writer.add_scalar("logits_norm", float(logits_norm.mean()), global_step)

    def host_model_fn(model, features, labels, mode, params):
        logits = model(features)
        if mode != ModeKeys.TRAIN:
            return model_fn(model, features, labels, mode, params)
        return TPUEstimatorSpec(mode, loss=F.cross_entropy(logits, labels),
                                host_call=(host_fn, {"logits_norm": logits.norm(dim=1)}))

    make_estimator(tmp_path / "run", fn=host_model_fn).train(lambda params: make_data(64), steps=4)
    writer.close()
    assert sorted(read_scalars(str(tmp_path / "custom"))["logits_norm"]) == [1, 2, 3, 4]


def test_early_stopping_rejects_bad_patience():
    with pytest.raises(ValueError, match="patience must be >= 1, got 0"):
        EarlyStopping(patience=0)
