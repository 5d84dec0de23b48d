"""The update step: clipping by global norm after the gradients are averaged over replicas,
gradient accumulation inside one compiled step, an EMA of the weights, and model_fn taking
charge of the update with two optimizers (a GAN) that resumes bit for bit."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    Net,
    adam_with_schedule,
    make_data,
    make_estimator,
    model_fn,
    read_scalars,
    run_fresh,
    same_values,
)
from torch.utils.data import TensorDataset

from torch_tpu_estimator import (
    DatasetConfig,
    EstimatorSpec,
    ModeKeys,
    RunConfig,
    TPUConfig,
    TPUEstimator,
    TPUEstimatorSpec,
    UpdateConfig,
)
from torch_tpu_estimator.data import TensorSlices
from torch_tpu_estimator.state.checkpoint import latest_checkpoint
from torch_tpu_estimator.state.schema import Checkpoint
from torch_tpu_estimator.step.flat_update import FlatAdam

CLIP = 0.05

# One SGD step (lr 1) with clipping, on a layout given by argv: prints the weights after it.
CLIPPED_STEP = r"""
import json, sys, torch
from helpers import make_data, make_estimator
from torch_tpu_estimator import DatasetConfig, UpdateConfig
layout, model_dir = sys.argv[1], sys.argv[2]
kwargs = {"xla": {}, "spmd4": {"strategy": "spmd"},
          "gloo2": {"use_tpu": False, "num_shards": 2}}[layout]
estimator = make_estimator(model_dir, params={"lr": 1.0}, update_config=UpdateConfig(
    clip_global_norm=float(sys.argv[3])), dataset_config=DatasetConfig(shuffle=False),
    **kwargs)
estimator.train(lambda params: make_data(64), steps=1)
print(json.dumps({name: estimator.get_variable_value(name).tolist()
                  for name in estimator.get_variable_names() if name != "global_step"}))
"""


def _hand_clipped_gradient() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """The initial weights, the first batch's gradient clipped to CLIP by hand, and its norm."""
    torch.manual_seed(0)  # RunConfig.seed seeds model_init_fn
    net = Net()
    initial = {name: value.detach().clone() for name, value in net.state_dict().items()}
    features, labels = make_data(64).tensors
    F.cross_entropy(net(features[:8]), labels[:8]).backward()
    grads = {name: parameter.grad for name, parameter in net.named_parameters()}
    norm = float(torch.sqrt(sum((grad ** 2).sum() for grad in grads.values())))
    return initial, {name: grad * CLIP / norm for name, grad in grads.items()}, norm


@pytest.mark.parametrize("layout", ["xla", "spmd4", "gloo2"])
def test_clipping_applies_to_the_averaged_gradient_on_every_layout(tmp_path, layout):
    initial, clipped, norm = _hand_clipped_gradient()
    assert norm > 5 * CLIP  # the clip is active
    weights = run_fresh(CLIPPED_STEP, layout, tmp_path, CLIP,
                        CPU_NUM_DEVICES="4" if layout == "spmd4" else "1")
    applied = {name: initial[name] - torch.tensor(value) for name, value in weights.items()}
    applied_norm = float(torch.sqrt(sum((step ** 2).sum() for step in applied.values())))
    assert applied_norm == pytest.approx(CLIP, rel=1e-4)
    for name, step in applied.items():
        np.testing.assert_allclose(step, clipped[name], rtol=1e-3, atol=1e-7, err_msg=name)


def test_the_gradient_norm_before_clipping_is_charted_in_tensorboard(tmp_path):
    """A training scalar of the update step, read back at the window's end like the loss."""
    _, _, norm = _hand_clipped_gradient()
    estimator = make_estimator(tmp_path, params={"lr": 1.0}, save_summary_steps=1,
                               update_config=UpdateConfig(clip_global_norm=CLIP),
                               dataset_config=DatasetConfig(shuffle=False))
    estimator.train(lambda params: make_data(64), steps=2)
    charted = read_scalars(str(tmp_path))["gradient_norm"]
    assert sorted(charted) == [1, 2]
    assert charted[1] == pytest.approx(norm, rel=1e-5)


ACCUMULATED = r"""
import json, sys, torch
import torch_xla.debug.metrics as met
from helpers import adam_with_schedule, make_data, make_estimator
from torch_tpu_estimator import LossHistory, UpdateConfig

steps, model_dir = int(sys.argv[1]), sys.argv[2]
losses = LossHistory()
estimator = make_estimator(model_dir, optimizer_fn=adam_with_schedule, train_batch_size=16,
                           update_config=UpdateConfig(accumulation_steps=steps))
estimator.train(lambda params: make_data(96), steps=12, hooks=[losses])
print(json.dumps({"compiles": met.metric_data("CompileTime")[0], "losses": losses.losses,
                  "weights": {name: estimator.get_variable_value(name).tolist()
                              for name in estimator.get_variable_names()}}))
"""


def test_four_micro_batches_update_like_one_batch_in_as_many_graphs(tmp_path):
    """k=4 micro-batches of 4 rows equal one batch of 16 (no batch norm), Adam with a schedule,
    and compile no more graphs (one step graph and Adam's first step; the whole batch's flat
    Adam adds its packing, accumulation takes torch's Adam)."""
    whole = run_fresh(ACCUMULATED, 1, tmp_path / "whole")
    accumulated = run_fresh(ACCUMULATED, 4, tmp_path / "accumulated")
    assert accumulated["compiles"] <= whole["compiles"] <= 3
    np.testing.assert_allclose(accumulated["losses"], whole["losses"], rtol=1e-5)
    for name, value in whole["weights"].items():
        np.testing.assert_allclose(accumulated["weights"][name], value, rtol=1e-4, atol=1e-6,
                                   err_msg=name)


def test_accumulation_needs_a_batch_the_micro_batches_divide(tmp_path):
    with pytest.raises(ValueError, match=r"train_batch_size=10 is not divisible by the number "
                                         r"of replicas x UpdateConfig.accumulation_steps \(4\)"):
        make_estimator(tmp_path, train_batch_size=10,
                       update_config=UpdateConfig(accumulation_steps=4))


def test_the_ema_follows_the_weights_and_serves_inference(tmp_path):
    decay = 0.8
    estimator = make_estimator(tmp_path, iterations_per_loop=1, save_checkpoints_steps=1,
                               keep_checkpoint_max=None,
                               update_config=UpdateConfig(ema_decay=decay))
    data = make_data(64)
    estimator.train(lambda params: data, steps=5)
    torch.manual_seed(0)
    expected = {name: value.clone() for name, value in Net().state_dict().items()}
    for step in range(1, 6):
        weights = torch.load(tmp_path / f"model.ckpt-{step}.pt", weights_only=True)["model"]
        expected = {name: decay * value + (1 - decay) * weights[name]
                    for name, value in expected.items()}
    saved = torch.load(tmp_path / "model.ckpt-5.pt", weights_only=True)
    for name, value in expected.items():
        torch.testing.assert_close(saved["update"]["ema"][name], value, rtol=1e-5, atol=1e-6)
        assert not torch.equal(saved["update"]["ema"][name], saved["model"][name])

    features = data.tensors[0][:8]
    for use_ema, weights in ((True, saved["update"]["ema"]), (False, saved["model"])):
        reader = make_estimator(tmp_path, update_config=UpdateConfig(
            ema_decay=decay, ema_for_inference=use_ema))
        predicted = torch.stack([item["logits"] for item in reader.predict(
            lambda params: TensorDataset(features))])
        net = Net()
        net.load_state_dict(weights)
        torch.testing.assert_close(predicted, net(features).detach(), rtol=1e-5, atol=1e-6)


def test_the_ema_starts_at_warm_started_or_restored_weights(tmp_path):
    make_estimator(tmp_path / "pretrained").train(lambda params: make_data(64), steps=5)
    pretrained = Checkpoint.load(latest_checkpoint(str(tmp_path / "pretrained"))).part("model")
    frozen = {"lr": 0.0}  # the weights stay where they start: so must their average
    warm = make_estimator(tmp_path / "warm", params=frozen,
                          warm_start_from=str(tmp_path / "pretrained"),
                          update_config=UpdateConfig(ema_decay=0.9))
    warm.train(lambda params: make_data(64), steps=2)
    ema = Checkpoint.load(latest_checkpoint(str(tmp_path / "warm"))).part("update", "ema")
    assert all(torch.equal(ema[name], value) for name, value in pretrained.items())

    # a run that adds an EMA on resume averages from the restored weights (the optimizer's
    # restored learning rate moves them: one step, then ema = lerp(restored, new, 1 - decay))
    added = make_estimator(tmp_path / "pretrained", update_config=UpdateConfig(ema_decay=0.9))
    added.train(lambda params: make_data(64), steps=1)
    resumed = Checkpoint.load(latest_checkpoint(str(tmp_path / "pretrained")))
    for name, value in pretrained.items():
        expected = torch.lerp(value, resumed.part("model")[name], 0.1)
        torch.testing.assert_close(resumed.part("update", "ema")[name], expected, rtol=0, atol=1e-7)


def _adamw(model, params):
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


class LateLayer(torch.nn.Module):
    """A layer that joins from the second step on: Adam's state starts a step behind for it."""

    def __init__(self):
        super().__init__()
        self.first, self.late, self.calls = torch.nn.Linear(8, 2), torch.nn.Linear(8, 2), 0

    def forward(self, features):
        self.calls += 1
        logits = self.first(features)
        return logits + self.late(features) if self.calls > 1 else logits


def _flat_and_torch_states(tmp_path, monkeypatch, optimizer_fn, model_init_fn=None,
                           fn=model_fn, steps=7, **update):
    """The checkpointed weights and update state after `steps` steps with the flat optimizer
    and with torch's own, and how many optimizer steps took the flat path."""
    flat_calls = []
    original = FlatAdam._step
    monkeypatch.setattr(FlatAdam, "_step", lambda self, *args: (flat_calls.append(1),
                                                               original(self, *args)))
    states = {}
    for flat in (True, False):
        estimator = make_estimator(tmp_path / str(flat), optimizer_fn=optimizer_fn,
                                   model_init_fn=model_init_fn, fn=fn, iterations_per_loop=3,
                                   update_config=UpdateConfig(flat_optimizer=flat, **update))
        estimator.train(lambda params: make_data(64), steps=steps)
        saved = Checkpoint.load(estimator.latest_checkpoint())
        states[flat] = {"model": saved.part("model"), **saved.part("update")}
    return states[True], states[False], len(flat_calls)


def _update_step(model, features, labels, mode, params, update):
    loss = F.cross_entropy(model(features), labels)
    update.step(loss)
    return TPUEstimatorSpec(mode, loss=loss.detach())


@pytest.mark.parametrize("optimizer_fn, model_init_fn, fn, flat_steps", [
    (adam_with_schedule, None, model_fn, 7), ("adam", None, model_fn, 7),
    ("adam_l2", None, model_fn, 7), ("adam", None, _update_step, 7),
    (adam_with_schedule, lambda params: LateLayer(), model_fn, 0)],
    ids=["adam_with_schedule", "adam", "adam_l2", "update_step_in_model_fn", "late_layer"])
def test_the_flat_adam_updates_bit_for_bit_like_torch(tmp_path, monkeypatch, recwarn,
                                                     optimizer_fn, model_init_fn, fn, flat_steps):
    optimizer_fn = {"adam": _adam, "adam_l2": _adam_with_l2}.get(optimizer_fn, optimizer_fn)
    flat, torch_own, steps = _flat_and_torch_states(tmp_path, monkeypatch, optimizer_fn,
                                                    model_init_fn, fn=fn)
    assert steps == flat_steps  # a layer that sat a step out: torch's update from then on
    assert same_values(flat, torch_own)
    assert not [warning for warning in recwarn if "lr_scheduler" in str(warning.message)]


class Shared(torch.nn.Module):
    """A trunk that two heads, each with its own optimizer, share."""

    def __init__(self):
        super().__init__()
        self.trunk, self.one, self.two = (torch.nn.Linear(8, 8), torch.nn.Linear(8, 2),
                                          torch.nn.Linear(8, 2))


def _two_heads_model_fn(model, features, labels, mode, update):
    first = F.cross_entropy(model.one(model.trunk(features)), labels)
    update.step(first, "one")
    second = F.cross_entropy(model.two(model.trunk(features)), labels)
    update.step(second, "two")
    return TPUEstimatorSpec(mode, loss=first.detach())


def _two_optimizers_sharing_the_trunk(model, params):
    return {"one": torch.optim.Adam([*model.trunk.parameters(), *model.one.parameters()], lr=0.01),
            "two": torch.optim.Adam([*model.trunk.parameters(), *model.two.parameters()], lr=0.01)}


def _clamping_model_fn(model, features, labels, mode, params):
    """A weight constraint the common way: the first layer's weight replaced by its clamp."""
    weight = model.layers[0].weight
    weight.data = weight.data.clamp(-0.2, 0.2)
    return model_fn(model, features, labels, mode, params)


class Unfrozen(torch.nn.Module):
    """A second layer trained from step 3 on (the usual unfreezing with add_param_group)."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(8, 2), torch.nn.Linear(8, 2)

    def forward(self, features):
        return self.first(features) + self.second(features)


def _unfreezing_model_fn(model, features, labels, mode, params, update):
    if update.global_step == 3:
        update.optimizers["default"].add_param_group({"params": model.module_to_unfreeze()})
    return model_fn(model, features, labels, mode, params)


Unfrozen.module_to_unfreeze = lambda self: list(self.second.parameters())


class EveryOtherStep(torch.nn.Module):
    """A layer that only odd steps use: its parameters have no gradient on even steps."""

    def __init__(self):
        super().__init__()
        self.first, self.sometimes, self.calls = torch.nn.Linear(8, 2), torch.nn.Linear(8, 2), 0

    def forward(self, features):
        self.calls += 1
        logits = self.first(features)
        return logits + self.sometimes(features) if self.calls % 2 else logits


def _frozen_bias(params):
    net = Net()
    net.layers[0].bias.requires_grad_(False)
    return net


def _adam(model, params):
    return torch.optim.Adam(model.parameters(), lr=0.01)


def _adam_with_l2(model, params):
    return torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.01)


def _scaling_its_gradients(model, features, labels, mode, params, update):
    """model_fn computing the gradients and changing them before the update applies (by a
    factor that is not a power of two: a fused multiply-add would round otherwise)."""
    loss = F.cross_entropy(model(features), labels)
    update.backward(loss)
    for parameter in model.parameters():
        parameter.grad.mul_(0.3)
    update.apply()
    return TPUEstimatorSpec(mode, loss=loss.detach())


def _clipping_itself(model, features, labels, mode, params, update):
    loss = F.cross_entropy(model(features), labels)
    update.backward(loss)
    update.clip_grad_norm(0.05)
    update.apply()
    return TPUEstimatorSpec(mode, loss=loss.detach())


def _stepping_adam_itself(model, features, labels, mode, params, update):
    optimizer = update.optimizers["default"]
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(features), labels)
    loss.backward()
    optimizer.step()
    return TPUEstimatorSpec(mode, loss=loss.detach())


def _adam_with_a_step_hook(model, params):
    """Adam whose pre-step hook scales the gradients (code torch runs around its step)."""
    optimizer = _adam(model, params)

    def scale(optimizer, args, kwargs):
        for parameter in [p for group in optimizer.param_groups for p in group["params"]]:
            parameter.grad.mul_(0.3)
    optimizer.register_step_pre_hook(scale)
    return optimizer


def _hooking_a_gradient(model, features, labels, mode, params):
    """A gradient hook registered once the module is on its device (moving a module to XLA
    makes new parameters, without the hooks of the old ones)."""
    if not getattr(model, "hooked", False):
        model.layers[0].weight.register_hook(lambda grad: grad * 0.3)
        model.hooked = True
    return model_fn(model, features, labels, mode, params)


def _adamw_without_decay(model, params):
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0)


def _decay_from_step_3(model, features, labels, mode, params, update):
    """A weight-decay schedule of one's own: AdamW's decay switched on at step 3."""
    if update.global_step == 3:
        update.optimizers["default"].param_groups[0]["weight_decay"] = 0.1
    return model_fn(model, features, labels, mode, params)


@pytest.mark.parametrize("case, reason, flat_steps", [
    (dict(fn=_two_heads_model_fn, model_init_fn=lambda params: Shared(),
          optimizer_fn=_two_optimizers_sharing_the_trunk), "optimizers ['one', 'two'] share", 0),
    (dict(fn=_clamping_model_fn), "a parameter's data was replaced (param.data = ...)", 0),
    (dict(fn=_unfreezing_model_fn, model_init_fn=lambda params: Unfrozen(),
          optimizer_fn=lambda model, params: torch.optim.Adam(model.first.parameters(), lr=0.01)),
     "its parameter groups changed (add_param_group)", 2),
    (dict(model_init_fn=lambda params: EveryOtherStep()), "a parameter has no gradient", 1),
    (dict(model_init_fn=_frozen_bias), "a parameter has no gradient", 0),
    (dict(clip_global_norm=0.05), "UpdateConfig(clip_global_norm) is set", 0),
    (dict(accumulation_steps=8), "UpdateConfig(accumulation_steps=8) adds up", 0),
    (dict(optimizer_fn=_adamw), "a decoupled weight_decay is set (AdamW)", 0),
    (dict(optimizer_fn=_adamw_without_decay, fn=_decay_from_step_3),
     "a decoupled weight_decay is set (AdamW)", 2),
    (dict(fn=_scaling_its_gradients), "model_fn computed the gradients update.apply applies", 0),
    (dict(fn=_clipping_itself), "model_fn computed the gradients update.apply applies", 0),
    (dict(fn=_stepping_adam_itself), "model_fn steps the optimizer itself", 0),
    (dict(optimizer_fn=_adam_with_a_step_hook), "optimizer step hooks are registered", 0),
    (dict(fn=_hooking_a_gradient), "a parameter has gradient hooks", 0),
], ids=["shared_by_two_optimizers", "data_replaced", "add_param_group", "unused_on_some_steps",
        "frozen", "clip_global_norm", "accumulation_steps", "adamw_decay", "adamw_decay_switched_on",
        "gradients_changed_in_model_fn", "clipped_in_model_fn", "model_fn_steps_adam",
        "optimizer_step_hook", "gradient_hook"])
def test_the_flat_adam_hands_what_it_does_not_cover_to_torch_exactly(
        tmp_path, monkeypatch, caplog, case, reason, flat_steps):
    """Each case gives torch's own Adam's numbers bit for bit, after as many flat steps as ran
    before the case arose, and the log says why the flat path stepped aside (with the flat
    step, clipping, AdamW's decay, scaled gradients and hooks were wrong or a float32 rounding
    apart from torch's)."""
    case = {"optimizer_fn": _adam, **case}
    with caplog.at_level(logging.INFO, logger="torch_tpu_estimator"):
        flat, torch_own, steps = _flat_and_torch_states(tmp_path, monkeypatch, **case)
    assert same_values(flat, torch_own)
    assert steps == flat_steps
    assert "flat_optimizer: " in caplog.text and reason in caplog.text


@pytest.mark.parametrize("processes, scaled", [(1, False), (2, False), (3, True), (4, False),
                                               (6, True)])
def test_an_average_over_processes_that_is_not_a_power_of_two_keeps_torch_s_adam(processes,
                                                                                scaled):
    """Averaging over n XLA processes scales the gradients by 1/n, exact only for a power of
    two: other counts keep torch's own step (several XLA processes cannot run here)."""
    from torch_tpu_estimator.step.update import _scaled_gradients

    reason = _scaled_gradients(UpdateConfig(), processes)
    assert (reason is not None) == scaled
    if scaled:
        assert f"averaged over {processes} processes" in reason


def test_use_tpu_in_params_names_the_runtime_evaluate_runs_on(tmp_path):
    seen = {}

    def recording_model_fn(model, features, labels, mode, params):
        seen[mode] = params["use_tpu"]
        return model_fn(model, features, labels, mode, params)

    estimator = make_estimator(tmp_path, fn=recording_model_fn, eval_on_tpu=False)
    estimator.train(lambda params: make_data(32), steps=1)
    estimator.evaluate(lambda params: make_data(8))
    assert seen == {ModeKeys.TRAIN: True, ModeKeys.EVAL: False}


# --- model_fn in charge of the update: a GAN on a toy 2-D distribution -----------------------

TARGET = (2.0, -1.0)


class GAN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.generator = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(),
                                             torch.nn.Linear(16, 2))
        self.discriminator = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(),
                                                 torch.nn.Linear(16, 1))


def gan_model_fn(model, features, mode, update):
    noise = torch.randn(features.shape[0], 2, device=features.device)
    fake = model.generator(noise)
    if mode == ModeKeys.PREDICT:
        return TPUEstimatorSpec(mode, predictions=fake)
    real_logits, fake_logits = model.discriminator(features), model.discriminator(fake.detach())
    d_loss = (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
              + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
    update.step(d_loss, "discriminator")
    g_logits = model.discriminator(fake)
    g_loss = F.binary_cross_entropy_with_logits(g_logits, torch.ones_like(g_logits))
    update.step(g_loss, "generator")
    return TPUEstimatorSpec(mode, loss=d_loss.detach() + g_loss.detach())


def gan_optimizers(model, params):
    optimizers = {}
    for name in ("generator", "discriminator"):
        optimizer = torch.optim.Adam(getattr(model, name).parameters(), lr=0.01, betas=(0.5, 0.999))
        optimizers[name] = (optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 4, 0.9))
    return optimizers


def gan_estimator(model_dir, fn=gan_model_fn, **update):
    return TPUEstimator(
        model_fn=fn, model_init_fn=lambda params: GAN(), optimizer_fn=gan_optimizers,
        model_dir=str(model_dir), train_batch_size=64, predict_batch_size=64,
        config=RunConfig(save_checkpoints_steps=None, tpu_config=TPUConfig(iterations_per_loop=5),
                         update_config=UpdateConfig(ema_decay=0.9, **update),
                         dataset_config=DatasetConfig(shuffle=True)))


def gan_data() -> TensorDataset:
    return TensorDataset(torch.tensor(TARGET) + 0.3 * torch.randn(
        512, 2, generator=torch.Generator().manual_seed(1)))


def test_a_gan_with_two_optimizers_learns_the_target(tmp_path):
    estimator = gan_estimator(tmp_path)
    estimator.train(lambda params: gan_data(), steps=1)

    def distance() -> float:
        samples = torch.stack(list(estimator.predict(lambda params: TensorDataset(
            torch.zeros(256, 2)))))
        return float((samples.mean(0) - torch.tensor(TARGET)).norm())

    before = distance()
    estimator.train(lambda params: gan_data(), max_steps=400)
    assert distance() < 0.3 * before


def test_a_gan_resumes_bit_for_bit_with_both_optimizers_schedulers_and_the_ema(tmp_path):
    def final(name, plan):
        estimator = gan_estimator(tmp_path / name)
        for steps in plan:
            estimator.train(lambda params: gan_data(), steps=steps)
        return torch.load(estimator.latest_checkpoint(), weights_only=True)

    split, whole = final("split", [7, 13]), final("whole", [20])
    assert split["global_step"] == whole["global_step"] == 20
    for split_weights, whole_weights in ((split["model"], whole["model"]),
                                         (split["update"]["ema"], whole["update"]["ema"])):
        for name, value in whole_weights.items():
            assert torch.equal(split_weights[name], value), name
    assert sorted(whole["update"]["optimizers"]) == ["discriminator", "generator"]
    for optimizer, state in whole["update"]["optimizers"].items():
        for index, slots in state["state"].items():
            for slot, value in slots.items():
                assert torch.equal(split["update"]["optimizers"][optimizer]["state"][index][slot], value)
    assert split["update"]["schedulers"] == whole["update"]["schedulers"]
    assert whole["update"]["schedulers"]["generator"]["last_epoch"] == 20


def test_a_model_fn_may_update_with_backward_and_apply(tmp_path):
    def by_hand(model, features, labels, mode, params, update):
        logits = model(features)
        if mode == ModeKeys.PREDICT:
            return TPUEstimatorSpec(mode, predictions={"logits": logits})
        loss = F.cross_entropy(logits, labels)
        if mode == ModeKeys.TRAIN:
            update.backward(loss)
            update.apply()
            loss = loss.detach()
        return TPUEstimatorSpec(mode, loss=loss)

    states = {}
    for name, fn in (("by_hand", by_hand), ("built_in", model_fn)):
        estimator = make_estimator(tmp_path / name, fn=fn, optimizer_fn=adam_with_schedule,
                                   update_config=UpdateConfig(clip_global_norm=0.5))
        estimator.train(lambda params: make_data(64), steps=6)
        saved = Checkpoint.load(estimator.latest_checkpoint())
        states[name] = {"model": saved.part("model"), **saved.part("update")}
    assert same_values(states["by_hand"], states["built_in"])


def test_several_optimizers_without_a_manual_update_is_a_clear_error(tmp_path):
    def automatic(model, features, mode):
        return TPUEstimatorSpec(mode, loss=model.discriminator(features).mean())

    with pytest.raises(ValueError, match=r"optimizer_fn gave several optimizers "
                                         r"\(\['discriminator', 'generator'\]\): model_fn must "
                                         r"run the update itself"):
        gan_estimator(tmp_path, fn=automatic).train(lambda params: gan_data(), steps=1)


def test_a_model_fn_argument_that_cannot_be_bound_fails_before_any_work(tmp_path):
    def unknown_argument(model, features, labels, mode, hyperparameters):
        raise AssertionError("never called")

    with pytest.raises(ValueError, match=r"model_fn takes an argument 'hyperparameters' that "
                                         r"cannot be bound"):
        make_estimator(tmp_path, fn=unknown_argument)
    assert list(tmp_path.iterdir()) == []


# --- model_fn stepping torch optimizers itself, TF's one-forward pattern, train_op -----------

def _sgd_with_schedule(model, params):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


def _stepping_itself(model, features, labels, mode, params, update):
    """The hand-written loop inside model_fn: zero_grad, backward, step, as in torch."""
    loss = F.cross_entropy(model(features), labels)
    optimizer = update.optimizers["default"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return TPUEstimatorSpec(mode, loss=loss.detach())


def _two_steps_a_batch(model, features, labels, mode, params, update):
    """Two updates of one optimizer in one step (a WGAN critic's n_critic loop)."""
    for _ in range(2):
        loss = F.cross_entropy(model(features), labels)
        update.step(loss, "default")
    return TPUEstimatorSpec(mode, loss=loss.detach())


STEPPING_ITSELF = r"""
import json, sys, torch
from helpers import make_data, make_estimator, model_fn
from test_update import _sgd_with_schedule, _stepping_itself, _two_steps_a_batch
fn = {"itself": _stepping_itself, "built_in": model_fn, "twice": _two_steps_a_batch}[sys.argv[1]]
kwargs = {"xla": {}, "gloo2": {"use_tpu": False, "num_shards": 2},
          "torch": {"use_tpu": False}}[sys.argv[2]]
estimator = make_estimator(sys.argv[3], fn=fn, optimizer_fn=_sgd_with_schedule, **kwargs)
estimator.train(lambda params: make_data(64), steps=5)
saved = torch.load(estimator.latest_checkpoint(), weights_only=True)
print(json.dumps({"model": {name: value.tolist() for name, value in saved["model"].items()},
                  "epoch": saved["update"]["schedulers"]["default"]["last_epoch"]}))
"""


@pytest.mark.parametrize("layout", ["xla", "gloo2"])
def test_a_model_fn_stepping_its_optimizer_itself_updates_once_per_step(tmp_path, layout):
    """optimizer.step() in model_fn puts it in charge: one update a step, not two, with the
    gradients averaged over replicas first and the LR scheduler stepped once."""
    runs = {fn: run_fresh(STEPPING_ITSELF, fn, layout, tmp_path / fn)
            for fn in ("itself", "built_in")}
    assert runs["itself"] == runs["built_in"]
    assert runs["itself"]["epoch"] == 5


def test_each_update_of_an_optimizer_averages_its_own_gradients_over_replicas(tmp_path):
    """Two update.step calls of one optimizer in a step: 2 gloo replicas, each with half of
    every batch, end where one replica with the whole batch ends."""
    one = run_fresh(STEPPING_ITSELF, "twice", "torch", tmp_path / "one")
    two = run_fresh(STEPPING_ITSELF, "twice", "gloo2", tmp_path / "two")
    for name, value in one["model"].items():
        np.testing.assert_allclose(two["model"][name], value, rtol=1e-5, atol=1e-6)
    assert one["epoch"] == two["epoch"] == 10


def _both_stepping_themselves(model, features, mode, update):
    real, fake = model.discriminator(features), model.discriminator(
        model.generator(features).detach())
    d_loss = F.softplus(-real).mean() + F.softplus(fake).mean()
    update.optimizers["discriminator"].zero_grad()
    d_loss.backward()
    update.optimizers["discriminator"].step()
    g_loss = F.softplus(-model.discriminator(model.generator(features))).mean()
    update.optimizers["generator"].zero_grad()
    g_loss.backward()
    update.optimizers["generator"].step()
    return TPUEstimatorSpec(mode, loss=d_loss.detach() + g_loss.detach())


def _both_with_update_step(model, features, mode, update):
    real, fake = model.discriminator(features), model.discriminator(
        model.generator(features).detach())
    d_loss = F.softplus(-real).mean() + F.softplus(fake).mean()
    update.step(d_loss, "discriminator")
    g_loss = F.softplus(-model.discriminator(model.generator(features))).mean()
    update.step(g_loss, "generator")
    return TPUEstimatorSpec(mode, loss=d_loss.detach() + g_loss.detach())


def test_two_optimizers_stepped_by_model_fn_equal_update_step(tmp_path):
    def final(name, fn):
        estimator = gan_estimator(tmp_path / name, fn=fn)
        estimator.train(lambda params: gan_data(), steps=6)
        return torch.load(estimator.latest_checkpoint(), weights_only=True)

    itself, built_in = final("itself", _both_stepping_themselves), final(
        "update_step", _both_with_update_step)
    assert same_values(itself["model"], built_in["model"])
    assert itself["update"]["schedulers"] == built_in["update"]["schedulers"]


def _stepping_under_accumulation(model, features, labels, mode, params):
    loss = F.cross_entropy(model(features), labels)
    loss.backward()
    OPTIMIZERS[0].step()
    return TPUEstimatorSpec(mode, loss=loss)


OPTIMIZERS: list = []


def test_stepping_an_optimizer_under_accumulation_is_a_clear_error(tmp_path):
    def keeping_sgd(model, params):
        OPTIMIZERS[:] = [torch.optim.SGD(model.parameters(), lr=0.1)]
        return OPTIMIZERS[0]

    estimator = make_estimator(tmp_path, fn=_stepping_under_accumulation,
                               optimizer_fn=keeping_sgd,
                               update_config=UpdateConfig(accumulation_steps=2))
    with pytest.raises(ValueError, match=r"model_fn stepped optimizer 'default' itself while "
                                         r"UpdateConfig\(accumulation_steps\) drives the update"):
        estimator.train(lambda params: make_data(64), steps=1)


class NoiseGAN(torch.nn.Module):
    """TF's DCGAN in miniature: the generator maps the batch's noise feature to samples."""

    def __init__(self):
        super().__init__()
        self.generator = torch.nn.Linear(2, 2)
        self.discriminator = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(),
                                                 torch.nn.Linear(4, 1))


def _losses(model, features):
    """One forward pass: both networks' losses, as TF's DCGAN model_fn computes them."""
    fake = model.generator(features["random_noise"])
    real_logits = model.discriminator(features["real_images"])
    fake_logits = model.discriminator(fake)
    d_loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    g_loss = F.softplus(-fake_logits).mean()
    return d_loss, g_loss


def _tf_dcgan_model_fn(model, features, mode, update):
    d_loss, g_loss = _losses(model, features)
    update.minimize({"discriminator": d_loss, "generator": g_loss})
    return TPUEstimatorSpec(mode, loss=d_loss.detach())


def _retained_graph_model_fn(model, features, mode, update):
    d_loss, g_loss = _losses(model, features)
    update.backward(d_loss, "discriminator", retain_graph=True)
    update.backward(g_loss, "generator")
    update.apply("discriminator")
    update.apply("generator")
    return TPUEstimatorSpec(mode, loss=d_loss.detach())


def _noise_data() -> TensorSlices:
    generator = torch.Generator().manual_seed(3)
    return TensorSlices({"real_images": torch.randn(16, 2, generator=generator) + 2.0,
                         "random_noise": torch.randn(16, 2, generator=generator)})


@pytest.mark.parametrize("fn", [_tf_dcgan_model_fn, _retained_graph_model_fn],
                         ids=["minimize", "backward_retain_graph_then_apply"])
def test_tf_gans_one_forward_then_both_updates_equal_a_hand_computation(tmp_path, fn):
    """Both networks' gradients come from the same forward pass and the same weights (TF's
    tf.group of two minimize ops with var_lists), then both SGD steps apply."""
    lr = 0.5
    estimator = TPUEstimator(
        model_fn=fn, model_init_fn=lambda params: NoiseGAN(), model_dir=str(tmp_path),
        optimizer_fn=lambda model, params: {
            name: torch.optim.SGD(getattr(model, name).parameters(), lr=lr)
            for name in ("generator", "discriminator")},
        train_batch_size=16, config=RunConfig(dataset_config=DatasetConfig(shuffle=False)))
    estimator.train(lambda params: _noise_data(), steps=1)
    torch.manual_seed(0)  # RunConfig.seed seeds model_init_fn
    model = NoiseGAN()
    d_loss, g_loss = _losses(model, _noise_data().rows(torch.arange(16)))
    discriminator, generator = (list(model.discriminator.parameters()),
                                list(model.generator.parameters()))
    d_grads = torch.autograd.grad(d_loss, discriminator, retain_graph=True)
    g_grads = torch.autograd.grad(g_loss, generator)
    expected = {f"discriminator.{name}": value - lr * grad for (name, value), grad in zip(
        model.discriminator.named_parameters(), d_grads, strict=True)}
    expected.update({f"generator.{name}": value - lr * grad for (name, value), grad in zip(
        model.generator.named_parameters(), g_grads, strict=True)})
    for name, value in expected.items():
        torch.testing.assert_close(torch.from_numpy(estimator.get_variable_value(name)),
                                   value.detach(), rtol=1e-5, atol=1e-6)


def test_a_spec_with_train_op_says_to_use_the_update_argument():
    with pytest.raises(TypeError, match=r"TPUEstimatorSpec takes no train_op.*take an argument "
                                        r"named `update`.*update.minimize"):
        TPUEstimatorSpec(ModeKeys.TRAIN, loss=torch.zeros(()), train_op=object())
    with pytest.raises(TypeError, match="EstimatorSpec takes no train_op"):
        EstimatorSpec(ModeKeys.TRAIN, loss=torch.zeros(()), train_op=object())
