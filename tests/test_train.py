"""Training end to end on XLA:CPU and plain PyTorch: losses, resume, windows, input kinds, hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    adam_with_schedule,
    checkpoint_weights,
    make_data,
    make_estimator,
    model_fn,
    read_scalars,
    same_values,
)
from torch.utils.data import DataLoader

from torch_tpu_estimator import (
    CheckpointSaverListener,
    DatasetConfig,
    Hook,
    LossHistory,
    ModeKeys,
    NanLossDuringTrainingError,
    StopAtStepHook,
    TPUEstimatorSpec,
)


class WindowRecorder(Hook):
    def __init__(self):
        self.windows, self.begun, self.ended = [], None, None

    def begin(self, context):
        self.begun = context.global_step

    def after_window(self, context, window):
        self.windows.append((window.first_step, window.last_step, list(window.losses)))

    def end(self, context):
        self.ended = context.global_step


@pytest.mark.parametrize("use_tpu", [True, False], ids=["xla", "torch"])
def test_training_loss_falls(tmp_path, use_tpu):
    recorder = WindowRecorder()
    estimator = make_estimator(tmp_path, use_tpu=use_tpu, iterations_per_loop=10)
    data = make_data(200)
    estimator.train(lambda params: data, max_steps=100, hooks=[recorder])
    losses = np.concatenate([np.array(losses) for _, _, losses in recorder.windows])
    assert len(losses) == 100
    assert losses[-10:].mean() < 0.5 * losses[:10].mean()
    assert estimator.get_variable_value("global_step") == 100


@pytest.mark.parametrize("use_tpu", [True, False], ids=["xla", "torch"])
def test_resume_equals_uninterrupted_run(tmp_path, use_tpu):
    """train(steps=7) then train(steps=13) gives, tensor by tensor, what train(steps=20) gives:
    weights, Adam moments, LR schedule, dropout RNG and the input position all carry over."""
    data = make_data(60)  # 7.5 batches of 8 a pass: the split falls mid-pass

    def run(model_dir, step_plan):
        estimator = make_estimator(model_dir, use_tpu=use_tpu, optimizer_fn=adam_with_schedule,
                                   dropout=0.3, save_checkpoints_steps=5)
        for steps in step_plan:
            estimator.train(lambda params: data, steps=steps)
        return estimator

    split = run(tmp_path / "split", [7, 13])
    whole = run(tmp_path / "whole", [20])
    split_state = torch.load(split.latest_checkpoint(), weights_only=True)
    whole_state = torch.load(whole.latest_checkpoint(), weights_only=True)
    assert split_state["global_step"] == whole_state["global_step"] == 20
    for name, value in whole_state["model"].items():
        assert torch.equal(split_state["model"][name], value), name
    for index, slots in whole_state["update"]["optimizers"]["default"]["state"].items():
        for slot, value in slots.items():
            assert torch.equal(split_state["update"]["optimizers"]["default"]["state"][index][slot],
                               value), (index, slot)
    assert split_state["update"]["schedulers"] == whole_state["update"]["schedulers"]
    assert split_state["input"] == whole_state["input"] == {
        "host": {"epoch": 2, "batch": 6}}


def _loader_with_workers(params):
    """A DataLoader of the user's own, shuffling, with two worker processes."""
    from random_input_job import input_fn

    return DataLoader(input_fn(params), batch_size=params["batch_size"], shuffle=True,
                      num_workers=2, drop_last=True)


@pytest.mark.parametrize("use_tpu, workers, loader", [
    (True, 0, False), (False, 0, False), (False, 2, False), (False, 0, True)],
    ids=["xla", "torch", "torch_2_loader_workers", "torch_users_dataloader_2_workers"])
def test_random_input_resumes_in_one_process_like_an_uninterrupted_run(tmp_path, use_tpu,
                                                                      workers, loader):
    """TF's DCGAN way of making input: input_fn draws its noise when called, the Dataset a random
    augmentation per example (torch, Python and NumPy draws; in DataLoader workers with
    num_workers, or in the workers of a DataLoader input_fn returns), the model dropout.
    train(15) then train(15) in one process ends, every tensor and RNG state, as train(30)."""
    from random_input_job import input_fn

    def run(model_dir, step_plan):
        estimator = make_estimator(model_dir, use_tpu=use_tpu, optimizer_fn=adam_with_schedule,
                                   dropout=0.3, dataset_config=DatasetConfig(
                                       shuffle=True, num_workers=workers))
        for steps in step_plan:
            estimator.train(_loader_with_workers if loader else input_fn, steps=steps)
        return torch.load(estimator.latest_checkpoint(), weights_only=True)

    split, whole = run(tmp_path / "split", [15, 15]), run(tmp_path / "whole", [30])
    assert split["global_step"] == whole["global_step"] == 30
    assert same_values(split, whole)


def test_steps_add_to_restored_step_and_max_steps_is_absolute(tmp_path):
    estimator = make_estimator(tmp_path)
    data = make_data(64)
    estimator.train(lambda params: data, steps=5)
    assert estimator.get_variable_value("global_step") == 5
    estimator.train(lambda params: data, steps=5)
    assert estimator.get_variable_value("global_step") == 10
    estimator.train(lambda params: data, max_steps=12)
    assert estimator.get_variable_value("global_step") == 12
    before = estimator.latest_checkpoint()
    estimator.train(lambda params: data, max_steps=8)  # already past: nothing runs
    assert estimator.latest_checkpoint() == before
    assert estimator.get_variable_value("global_step") == 12


def test_last_window_is_shortened_to_land_on_the_target(tmp_path):
    recorder = WindowRecorder()
    estimator = make_estimator(tmp_path, iterations_per_loop=4)
    estimator.train(lambda params: make_data(64), steps=10, hooks=[recorder])
    assert [(first, last) for first, last, _ in recorder.windows] == [(0, 4), (4, 8), (8, 10)]
    assert (recorder.begun, recorder.ended) == (0, 10)


def test_loss_history_keeps_every_step_whatever_the_windows(tmp_path):
    in_windows, step_by_step = LossHistory(), LossHistory()
    make_estimator(tmp_path / "windows", iterations_per_loop=4).train(
        lambda params: make_data(64), steps=10, hooks=[in_windows])
    make_estimator(tmp_path / "steps", iterations_per_loop=1).train(
        lambda params: make_data(64), steps=10, hooks=[step_by_step])
    assert in_windows.steps == step_by_step.steps == list(range(1, 11))
    assert in_windows.losses == step_by_step.losses  # the same graph, each step's own loss
    assert (in_windows.first, in_windows.last) == (step_by_step.losses[0], step_by_step.losses[9])
    assert in_windows.last < in_windows.first


def test_time_budget_windows_still_land_on_the_target(tmp_path):
    recorder = WindowRecorder()
    estimator = make_estimator(tmp_path, iterations_per_loop="30s")
    estimator.train(lambda params: make_data(64), steps=9, hooks=[recorder])
    assert recorder.windows[-1][1] == 9
    assert sum(last - first for first, last, _ in recorder.windows) == 9


def test_one_shot_iterator_ends_training_cleanly(tmp_path):
    data = make_data(40)
    batches = [(data.tensors[0][i:i + 8], data.tensors[1][i:i + 8]) for i in range(0, 40, 8)]
    estimator = make_estimator(tmp_path)
    estimator.train(lambda params: iter(batches), max_steps=100)
    assert estimator.get_variable_value("global_step") == 5


def test_dataloader_is_restarted_every_pass(tmp_path):
    loader = DataLoader(make_data(24), batch_size=8)
    estimator = make_estimator(tmp_path)
    estimator.train(lambda params: loader, max_steps=10)
    assert estimator.get_variable_value("global_step") == 10


def test_dataloader_short_last_batch_is_skipped_in_training(tmp_path):
    recorder = WindowRecorder()
    loader = DataLoader(make_data(20), batch_size=8)  # 8, 8, then 4 skipped
    estimator = make_estimator(tmp_path, iterations_per_loop=1)
    estimator.train(lambda params: loader, max_steps=6, hooks=[recorder])
    assert estimator.get_variable_value("global_step") == 6


def test_params_hold_batch_size_context_and_use_tpu(tmp_path):
    seen = {}

    def recording_model_fn(model, features, labels, mode, params):
        seen["model_fn"] = (params["batch_size"], params["use_tpu"], params["context"].num_replicas)
        return model_fn(model, features, labels, mode, params)

    def input_fn(params):
        seen["input_fn"] = (params["batch_size"], params["context"].replica_id, params["lr"])
        return make_data(32)

    estimator = make_estimator(tmp_path, fn=recording_model_fn, params={"lr": 0.05},
                               train_batch_size=16)
    estimator.train(input_fn, steps=1)
    assert seen == {"model_fn": (16, True, 1), "input_fn": (16, 0, 0.05)}


def test_keep_checkpoint_max_is_honoured(tmp_path):
    estimator = make_estimator(tmp_path, iterations_per_loop=2, save_checkpoints_steps=2,
                               keep_checkpoint_max=3)
    estimator.train(lambda params: make_data(64), steps=12)
    kept = sorted(path.name for path in tmp_path.glob("model.ckpt-*.pt"))
    assert kept == ["model.ckpt-10.pt", "model.ckpt-12.pt", "model.ckpt-8.pt"]
    assert estimator.latest_checkpoint() == str(tmp_path / "model.ckpt-12.pt")


def test_interrupted_checkpoint_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    estimator = make_estimator(tmp_path, save_checkpoints_steps=4)
    data = make_data(64)
    estimator.train(lambda params: data, steps=4)
    good = estimator.latest_checkpoint()
    good_weights = checkpoint_weights(estimator)

    import torch_tpu_estimator.state.storage as checkpoint_module

    def crash_mid_write(state, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        estimator.train(lambda params: data, steps=4)
    monkeypatch.undo()

    assert estimator.latest_checkpoint() == good
    assert sorted(path.name for path in tmp_path.iterdir() if "ckpt" in path.name) == [
        "model.ckpt-4.pt"]
    restored = checkpoint_weights(estimator)
    assert all(np.array_equal(restored[name], value) for name, value in good_weights.items())
    estimator.train(lambda params: data, steps=4)  # resumes from the good one
    assert estimator.get_variable_value("global_step") == 8


def test_summaries_are_written_to_event_files(tmp_path):
    recorder = WindowRecorder()
    estimator = make_estimator(tmp_path, iterations_per_loop=3, save_summary_steps=5)
    estimator.train(lambda params: make_data(64), steps=12, hooks=[recorder])
    scalars = read_scalars(str(tmp_path))
    assert set(scalars) >= {"loss", "learning_rate", "global_step/sec", "examples/sec"}
    assert sorted(scalars["loss"]) == [5, 10]
    per_step = np.concatenate([np.array(losses) for _, _, losses in recorder.windows])
    assert scalars["loss"][5] == pytest.approx(per_step[4], rel=1e-6)
    assert scalars["loss"][10] == pytest.approx(per_step[9], rel=1e-6)
    assert scalars["learning_rate"][10] == pytest.approx(0.1)
    assert scalars["examples/sec"][10] > 0


def test_training_logs_loss_and_rates(tmp_path, caplog):
    caplog.set_level("INFO", logger="torch_tpu_estimator")
    estimator = make_estimator(tmp_path, iterations_per_loop=5, log_step_count_steps=5)
    estimator.train(lambda params: make_data(64), steps=10)
    text = caplog.text
    assert "step = 5" in text and "step = 10" in text and "loss = " in text
    assert "global_step/sec: " in text and "examples/sec: " in text


def test_nan_loss_stops_with_a_clear_error_and_no_checkpoint(tmp_path):
    def exploding_model_fn(model, features, labels, mode, params):
        spec = model_fn(model, features, labels, mode, params)
        return TPUEstimatorSpec(mode, loss=spec.loss * float("nan"))

    estimator = make_estimator(tmp_path, fn=exploding_model_fn, iterations_per_loop=3)
    with pytest.raises(NanLossDuringTrainingError, match="global step 1"):
        estimator.train(lambda params: make_data(64), steps=6)
    assert estimator.latest_checkpoint() is None


def test_stop_at_step_hook_ends_the_window_exactly(tmp_path):
    recorder = WindowRecorder()
    estimator = make_estimator(tmp_path, iterations_per_loop=4)
    estimator.train(lambda params: make_data(64), steps=50,
                    hooks=[StopAtStepHook(num_steps=6), recorder])
    assert estimator.get_variable_value("global_step") == 6
    assert recorder.windows[-1][:2] == (4, 6)


def test_stop_at_a_step_already_passed_runs_nothing(tmp_path):
    estimator = make_estimator(tmp_path)
    estimator.train(lambda params: make_data(64), steps=6)
    before = estimator.latest_checkpoint()
    estimator.train(lambda params: make_data(64), hooks=[StopAtStepHook(last_step=4)])
    assert estimator.get_variable_value("global_step") == 6
    assert estimator.latest_checkpoint() == before


def test_saving_listeners_see_every_checkpoint(tmp_path):
    class Listener(CheckpointSaverListener):
        def __init__(self):
            self.events = []

        def before_save(self, context):
            self.events.append(("before", context.global_step))

        def after_save(self, context, path):
            self.events.append(("after", context.global_step, path.rsplit("/", 1)[-1]))

    listener = Listener()
    estimator = make_estimator(tmp_path, save_checkpoints_steps=4)
    estimator.train(lambda params: make_data(64), steps=6, saving_listeners=[listener])
    assert listener.events == [("before", 4), ("after", 4, "model.ckpt-4.pt"),
                               ("before", 6), ("after", 6, "model.ckpt-6.pt")]


def test_warm_start_loads_weights_not_optimizer_state_or_step(tmp_path):
    source = make_estimator(tmp_path / "source")
    source.train(lambda params: make_data(64), steps=5)
    source_weights = checkpoint_weights(source)

    frozen = make_estimator(tmp_path / "warm", params={"lr": 0.0},
                            warm_start_from=str(tmp_path / "source"))
    frozen.train(lambda params: make_data(64), steps=1)
    warm_weights = checkpoint_weights(frozen)
    assert warm_weights.pop("global_step") == 1
    for name, value in warm_weights.items():
        assert np.array_equal(value, source_weights[name]), name


def test_get_variable_names_and_values(tmp_path):
    estimator = make_estimator(tmp_path)
    with pytest.raises(ValueError, match="no checkpoint"):
        estimator.get_variable_names()
    estimator.train(lambda params: make_data(64), steps=2)
    assert estimator.get_variable_names() == [
        "global_step", "layers.0.bias", "layers.0.weight", "layers.3.bias", "layers.3.weight"]
    assert estimator.get_variable_value("layers.0.weight").shape == (16, 8)
    with pytest.raises(ValueError, match="no variable 'nope'"):
        estimator.get_variable_value("nope")


def test_model_fn_without_scalar_loss_in_train_is_an_error(tmp_path):
    def no_loss(model, features, labels, mode, params):
        return TPUEstimatorSpec(ModeKeys.TRAIN, predictions={"x": model(features)})

    estimator = make_estimator(tmp_path, fn=no_loss)
    with pytest.raises(ValueError, match="scalar tensor `loss` in mode 'train'"):
        estimator.train(lambda params: make_data(64), steps=1)
    assert list(tmp_path.iterdir()) == []
