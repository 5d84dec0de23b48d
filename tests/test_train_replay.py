"""Replayed training (TPUConfig(replay_training=True)): the compiled step replayed untraced
gives the numbers of a run that traces every step, bit for bit, for what users train with; what
it does not cover is refused with its reason in the log and traced as before."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import torch.nn.functional as F
from helpers import make_data, make_estimator, run_fresh, same_values, sgd

from torch_tpu_estimator import Hook, RecompilationError, TPUEstimatorSpec, UpdateConfig

REPLAYING = "replay_training: replaying the compiled training step"
TRACING = "replay_training: every training step is traced, because"


class Losses(Hook):
    """Every step's loss, as the windows give them."""

    def __init__(self):
        self.values: list[float] = []

    def after_window(self, context, window):
        self.values.extend(float(loss) for loss in window.losses)


def sgd_nesterov(model, params):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                weight_decay=1e-3)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))


def sgd_dampened(model, params):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.8, dampening=0.3)


def adam_step_lr(model, params):
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-4)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)


def adamw_one_cycle(model, params):
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)
    return optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.02, total_steps=40)


class BatchNormNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                                          torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                          torch.nn.Linear(16, 2))

    def forward(self, x):
        return self.layers(x)


class UnusedHead(BatchNormNet):
    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Linear(8, 3)  # no gradient: Adam leaves it, and its state, alone


CASES = {
    "sgd_momentum_nesterov_decay_schedule": dict(optimizer_fn=sgd_nesterov),
    "sgd_dampening_dropout": dict(optimizer_fn=sgd_dampened, dropout=0.3),
    "adam_step_lr_dropout": dict(optimizer_fn=adam_step_lr, dropout=0.3),
    "adamw_one_cycle": dict(optimizer_fn=adamw_one_cycle),
    "clipping": dict(optimizer_fn=adam_step_lr, update_config=UpdateConfig(clip_global_norm=0.1)),
    "accumulation": dict(optimizer_fn=sgd_nesterov,
                         update_config=UpdateConfig(accumulation_steps=2)),
    "ema": dict(optimizer_fn=adam_step_lr, update_config=UpdateConfig(ema_decay=0.9)),
    "batch_norm": dict(optimizer_fn=adam_step_lr, model_init_fn=lambda params: BatchNormNet()),
    "bf16_autocast": dict(optimizer_fn=adam_step_lr, dropout=0.3,
                          tpu_config_extra={"precision": "bf16"}),
    "unused_parameter": dict(optimizer_fn=adamw_one_cycle,
                             model_init_fn=lambda params: UnusedHead()),
}


def train(model_dir, replay: bool, steps: int = 12, max_steps: int | None = None,
          tpu_config_extra: dict | None = None, **options) -> tuple[dict, list[float]]:
    """Trains from model_dir (fresh or not); returns the final checkpoint and the losses."""
    losses = Losses()
    estimator = make_estimator(model_dir, log_step_count_steps=None, **options,
                               tpu_config_extra={**(tpu_config_extra or {}),
                                                 "replay_training": replay})
    estimator.train(lambda params: make_data(200), steps=None if max_steps else steps,
                    max_steps=max_steps, hooks=[losses])
    return torch.load(estimator.latest_checkpoint(), weights_only=True), losses.values


def torch_arithmetic(options: dict) -> dict:
    """`options` with torch's own optimizer step (no flat buffers), which replay runs op for op."""
    config = options.get("update_config", UpdateConfig())
    return {**options, "update_config": dataclasses.replace(config, flat_optimizer=False)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_replayed_run_equals_a_traced_one_bit_for_bit(tmp_path, case, caplog):
    caplog.set_level(logging.INFO, logger="torch_tpu_estimator")
    replayed, replayed_losses = train(tmp_path / "replayed", True, **CASES[case])
    assert REPLAYING in caplog.text and TRACING not in caplog.text
    traced, traced_losses = train(tmp_path / "traced", False, **torch_arithmetic(CASES[case]))
    assert replayed_losses == traced_losses and len(traced_losses) == 12
    assert same_values(replayed["model"], traced["model"])  # weights, batch norm statistics
    assert same_values(replayed["update"], traced["update"])  # optimizer, scheduler, EMA
    assert same_values(replayed["rng"], traced["rng"])


def test_replay_compiles_no_graph_per_step_and_resumes_bit_for_bit(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="torch_tpu_estimator")
    options = dict(optimizer_fn=adam_step_lr, dropout=0.3, iterations_per_loop=5)
    whole, whole_losses = train(tmp_path / "whole", True, max_steps=20, **options)
    compilations = [line for line in caplog.text.splitlines() if "compilation(s)" in line]
    assert int(compilations[-1].split("train on XLA: ")[1].split()[0]) <= 4  # not one per step
    train(tmp_path / "parts", True, max_steps=7, **options)
    parts, part_losses = train(tmp_path / "parts", True, max_steps=20, **options)
    assert part_losses == whole_losses[7:]
    assert same_values(parts, whole)


def test_host_call_gets_every_nth_replayed_step_as_a_traced_run_gives_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="torch_tpu_estimator")
    calls = {True: [], False: []}

    def model_fn(model, features, labels, mode, params):
        logits = model(features)
        loss = F.cross_entropy(logits, labels)
        record = calls[params["replay"]]
        return TPUEstimatorSpec(mode, loss=loss, host_call=(
            lambda global_step, norms: record.append((global_step, norms.tolist())),
            {"norms": logits.norm(dim=1)}))

    for replay in (True, False):
        options = dict(fn=model_fn, params={"replay": replay}, optimizer_fn=adam_step_lr)
        train(tmp_path / str(replay), replay, steps=10,
              tpu_config_extra={"experimental_host_call_every_n_steps": 3},
              **(options if replay else torch_arithmetic(options)))
    assert REPLAYING in caplog.text
    assert [step for step, _ in calls[True]] == [3, 6, 9]
    assert calls[True] == calls[False]


def test_replay_runs_model_fn_for_the_traced_steps_only(tmp_path, caplog, capsys):
    """What a Python side effect in model_fn sees: the steps that were traced (TF's model_fn,
    called once, would see one)."""
    caplog.set_level(logging.INFO, logger="torch_tpu_estimator")
    calls = []

    class Recording(BatchNormNet):
        def forward(self, x):
            calls.append(x.shape[0])
            print("forward called")
            return super().forward(x)

    train(tmp_path / "model", True, steps=15, model_init_fn=lambda params: Recording(),
          optimizer_fn=adam_step_lr)
    assert REPLAYING in caplog.text
    assert len(calls) == 3  # the optimizer's first step (new state), then two alike
    assert capsys.readouterr().out.count("forward called") == 3


def test_the_recompilation_guard_counts_the_programs_replay_compiles(tmp_path):
    def branches_every_other_step(model, features, labels, mode, params):
        STEPS_SEEN.append(1)
        loss = F.cross_entropy(model(features), labels)
        return TPUEstimatorSpec(mode, loss=loss if len(STEPS_SEEN) % 2 else loss.exp().log())

    STEPS_SEEN.clear()
    with pytest.raises(RecompilationError, match="max_graphs_per_mode"):
        train(tmp_path / "model", True, fn=branches_every_other_step, optimizer_fn=adam_step_lr,
              max_graphs={"train": 2})


def reads_the_device(model, features, labels, mode, params):
    loss = F.cross_entropy(model(features), labels)
    if loss.item() > 100:  # never true, but read every step
        loss = loss * 0
    return TPUEstimatorSpec(mode, loss=loss)


def runs_its_update(model, features, labels, mode, params, update):
    loss = F.cross_entropy(model(features), labels)
    update.step(loss)
    return TPUEstimatorSpec(mode, loss=loss.detach())


STEPS_SEEN = []


def scales_by_a_python_number(model, features, labels, mode, params):
    STEPS_SEEN.append(1)
    return TPUEstimatorSpec(mode, loss=F.cross_entropy(model(features), labels)
                            * (1 + 0.01 * len(STEPS_SEEN)))


def sets_the_learning_rate(model, features, labels, mode, params, update):
    STEPS_SEEN.append(1)
    update.optimizers["default"].param_groups[0]["lr"] = 0.1 / len(STEPS_SEEN)
    return TPUEstimatorSpec(mode, loss=F.cross_entropy(model(features), labels))


class CountsInPlace(BatchNormNet):
    """Keeps a plain tensor (no buffer) that forward changes in place and reads."""

    def __init__(self):
        super().__init__()
        self.count = None

    def forward(self, x):
        if self.count is None:
            self.count = torch.zeros((), device=x.device)
        self.count.add_(1)
        return super().forward(x) * (1 + 0.01 * self.count)


def rmsprop(model, params):
    return torch.optim.RMSprop(model.parameters(), lr=0.01)


@pytest.mark.parametrize("options, reason", [
    (dict(fn=reads_the_device), "model_fn reads the device while it is traced (.item()"),
    (dict(fn=runs_its_update), "model_fn runs the update itself"),
    (dict(fn=scales_by_a_python_number),
     "two training steps read different values besides their batch"),
    (dict(optimizer_fn=rmsprop), "optimizer 'default': RMSprop is not one of SGD, Adam, AdamW"),
    (dict(fn=sets_the_learning_rate, optimizer_fn=sgd),
     "model_fn changes the optimizer's options (a learning rate it computes)"),
    (dict(model_init_fn=lambda params: CountsInPlace()),
     "two training steps read different values besides their batch"),
], ids=["host_read", "model_fn_update", "python_number", "optimizer", "model_fn_sets_lr",
        "tensor_changed_in_place"])
def test_what_replay_does_not_cover_is_refused_with_its_reason_and_traced(tmp_path, caplog,
                                                                         options, reason):
    caplog.set_level(logging.INFO, logger="torch_tpu_estimator")
    options = {"optimizer_fn": adam_step_lr, "dropout": 0.3, **options}
    STEPS_SEEN.clear()
    refused, refused_losses = train(tmp_path / "refused", True, **options)
    assert f"{TRACING} {reason}" in caplog.text and REPLAYING not in caplog.text
    STEPS_SEEN.clear()
    traced, traced_losses = train(tmp_path / "traced", False, **torch_arithmetic(options))
    assert refused_losses == traced_losses
    assert same_values(refused["model"], traced["model"])


SPMD = """
import json, logging, sys, torch
from helpers import make_data, make_estimator
from torch_tpu_estimator import UpdateConfig
from test_train_replay import adam_step_lr, sgd_nesterov
sharding, optimizer, replay = sys.argv[1], sys.argv[2], sys.argv[3] == "on"
estimator = make_estimator(sys.argv[4], strategy="spmd", dropout=0.3, log_step_count_steps=None,
                           optimizer_fn={"adam": adam_step_lr, "sgd": sgd_nesterov}[optimizer],
                           tpu_config_extra={"replay_training": replay,
                                             "param_sharding": sharding},
                           update_config=UpdateConfig(flat_optimizer=False))
lines = []
handler = logging.Handler()
handler.emit = lambda record: lines.append(record.getMessage())
logging.getLogger("torch_tpu_estimator").addHandler(handler)
logging.getLogger("torch_tpu_estimator").setLevel(logging.INFO)
estimator.train(lambda params: make_data(200), max_steps=10)
print(json.dumps({"replayed": any("replaying the compiled" in line for line in lines),
                  "weights": {name: estimator.get_variable_value(name).tolist()
                              for name in estimator.get_variable_names()}}))
"""


@pytest.mark.parametrize("sharding, optimizer", [("replicated", "adam"), ("fsdp", "sgd")])
def test_replay_on_a_4_device_mesh_equals_a_traced_run(tmp_path, sharding, optimizer):
    replayed, traced = (run_fresh(SPMD, sharding, optimizer, replay, tmp_path / replay,
                                  CPU_NUM_DEVICES="4") for replay in ("on", "off"))
    assert replayed["replayed"] and not traced["replayed"]
    assert replayed["weights"] == traced["weights"]


def test_a_callers_pending_device_tensor_keeps_its_value_through_replayed_training(tmp_path,
                                                                                 caplog):
    import torch_xla

    caplog.set_level(logging.INFO, logger="torch_tpu_estimator")
    total = torch.arange(3.0, device=torch_xla.device()) * 10 + 1  # pending, never run
    train(tmp_path / "model", True, optimizer_fn=adam_step_lr)
    assert REPLAYING in caplog.text
    assert total.cpu().tolist() == [1.0, 11.0, 21.0]
