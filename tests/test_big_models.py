"""Models bigger than one core, on 4 XLA CPU devices: FSDPv2 and 2x2 meshes train like one
device with each device holding its share of every parameter; sharded checkpoints survive
SIGKILL bit for bit and restore onto 2 devices, 1 device and plain PyTorch; bfloat16 autocast."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import make_data, make_estimator, run_fresh, same_values

from torch_tpu_estimator import ModeKeys, TPUEstimatorSpec
from torch_tpu_estimator.state.schema import Checkpoint

TRANSFORMER = r"""
import json, sys
import torch, torch.nn.functional as F
import torch_xla
import torch_xla.distributed.spmd as xs
from helpers import make_estimator
from torch_tpu_estimator import DatasetConfig, LossHistory, ModeKeys, TPUEstimatorSpec
from torch_tpu_estimator.runtime import xla_compat
from torch_tpu_estimator.state.schema import Checkpoint

class Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(16, 4)
    def forward(self, x):
        return self.head(self.encoder(x).mean(1))

built = []
def model_init_fn(params):
    model = Classifier()
    mesh = params["context"].mesh
    if layout == "manual":  # the user's own annotations: the feed-forward split over "model"
        model = model.to(torch_xla.device())
        for layer in model.encoder.layers:
            xs.mark_sharding(layer.linear1.weight, mesh, ("model", None))
            xs.mark_sharding(layer.linear2.weight, mesh, (None, "model"))
    built.append(model)
    return model

def model_fn(features, labels, mode, model):
    logits = model(features)
    if mode == ModeKeys.PREDICT:
        return TPUEstimatorSpec(mode, predictions=logits)
    return TPUEstimatorSpec(mode, loss=F.cross_entropy(logits, labels))

layout, model_dir = sys.argv[1], sys.argv[2]
tpu = {"one": {}, "fsdp4": {"param_sharding": "fsdp"},
       "fsdp2x2": {"param_sharding": "fsdp", "num_cores_per_replica": 2},
       "manual": {"param_sharding": "manual", "num_cores_per_replica": 2}}[layout]
generator = torch.Generator().manual_seed(0)
data = torch.utils.data.TensorDataset(torch.randn(64, 6, 16, generator=generator),
                                      torch.randint(0, 4, (64,), generator=generator))
estimator = make_estimator(model_dir, fn=model_fn, model_init_fn=model_init_fn,
                           strategy="spmd" if tpu else "mp", tpu_config_extra=tpu,
                           iterations_per_loop=3, save_checkpoints_steps=None,
                           dataset_config=DatasetConfig(shuffle=False))
history = LossHistory()
estimator.train(lambda params: data, steps=6, hooks=[history])
module = built[0]
print(json.dumps({
    "losses": history.losses,
    "weights": {name: value.tolist() for name, value in
                Checkpoint.load(estimator.latest_checkpoint()).part("model").items()},
    "shards": {name: xla_compat.local_shard_shapes(parameter)
               for name, parameter in module.named_parameters()}}))
"""


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    return run_fresh(TRANSFORMER, "one", tmp_path_factory.mktemp("one"))


@pytest.mark.parametrize("layout, share", [("fsdp4", 4), ("fsdp2x2", 2), ("manual", 2)])
def test_sharded_meshes_train_a_transformer_like_one_device(tmp_path, one_device, layout,
                                                            share):
    sharded = run_fresh(TRANSFORMER, layout, tmp_path, CPU_NUM_DEVICES="4")
    np.testing.assert_allclose(sharded["losses"], one_device["losses"], rtol=1e-4)
    for name, value in one_device["weights"].items():
        np.testing.assert_allclose(sharded["weights"][name], value, rtol=1e-4, atol=1e-5,
                                   err_msg=name)
    for name, shards in sharded["shards"].items():
        numel = int(np.prod(one_device["shards"][name][0]))
        held = {int(np.prod(shard)) for shard in shards}
        if layout == "manual" and not name.endswith(("linear1.weight", "linear2.weight")):
            # not annotated: GSPMD propagates a sharding from its neighbours, or replicates it
            assert len(shards) == 4 and held <= {numel, numel // share}, (name, shards)
        else:
            assert len(shards) == 4 and held == {numel // share}, (name, shards)


KILLED = r"""
import json, os, signal, sys
from helpers import adam_with_schedule, make_data, make_estimator, model_fn
from torch_tpu_estimator import UpdateConfig
model_dir, kill_at = sys.argv[1], int(sys.argv[2])
calls = [0]
def dying_model_fn(model, features, labels, mode, params):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return model_fn(model, features, labels, mode, params)
estimator = make_estimator(model_dir, fn=dying_model_fn, optimizer_fn=adam_with_schedule,
                           dropout=0.3, iterations_per_loop=3, save_checkpoints_steps=3,
                           keep_checkpoint_max=None, strategy="spmd",
                           tpu_config_extra={"param_sharding": "fsdp"},
                           update_config=UpdateConfig(ema_decay=0.9))
estimator.train(lambda params: make_data(60), max_steps=14)
print(json.dumps({"steps_run": calls[0]}))
"""


def _run(script, *args, devices="4"):
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES=devices,
               PYTHONPATH=os.path.dirname(__file__))
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)


def _state(path) -> dict:
    saved = Checkpoint.load(str(path))
    return {"model": saved.part("model"), **saved.part("update"), "step": saved.global_step}



@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("sharded")
    done = _run(KILLED, model_dir, 0)
    assert done.returncode == 0, done.stderr[-3000:]
    return model_dir


def test_a_sharded_checkpoint_is_a_directory_of_shards_and_json(sharded_run):
    latest = sharded_run / "model.ckpt-14"
    assert latest.is_dir()
    assert sorted(os.listdir(latest)) == ["__0_0.distcp", "state.pt", "tensors.json"]
    assert not [name for name in os.listdir(latest) if name.endswith(".metadata")]


def test_sigkill_on_the_mesh_then_restart_is_bit_for_bit(tmp_path, sharded_run):
    killed = _run(KILLED, tmp_path, 8)  # in step 8, after the checkpoint of step 6
    assert killed.returncode == -signal.SIGKILL
    restarted = _run(KILLED, tmp_path, 0)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert same_values(_state(tmp_path / "model.ckpt-14"), _state(sharded_run / "model.ckpt-14"))


EVALUATE = r"""
import json, sys
from helpers import make_data, make_estimator
from torch_tpu_estimator import UpdateConfig
layout, model_dir = sys.argv[1], sys.argv[2]
kwargs = {"spmd": {"strategy": "spmd", "tpu_config_extra": {"param_sharding": "fsdp"}},
          "xla": {}, "torch": {"use_tpu": False}}[layout]
estimator = make_estimator(model_dir, update_config=UpdateConfig(ema_decay=0.9), **kwargs)
print(json.dumps(estimator.evaluate(lambda params: make_data(21))))
"""


@pytest.fixture(scope="module")
def reference(sharded_run):
    """The sharded checkpoint evaluated on the mesh it was written from (4 devices)."""
    return run_fresh(EVALUATE, "spmd", sharded_run, CPU_NUM_DEVICES="4")


@pytest.mark.parametrize("layout, devices", [("spmd", "4"), ("spmd", "2"), ("xla", "1"),
                                             ("torch", "1")])
def test_a_sharded_checkpoint_restores_onto_any_mesh_and_plain_pytorch(sharded_run, reference,
                                                                       layout, devices):
    results = run_fresh(EVALUATE, layout, sharded_run, CPU_NUM_DEVICES=devices)
    assert results["global_step"] == reference["global_step"] == 14
    assert results["loss"] == pytest.approx(reference["loss"], rel=1e-5)


def test_a_damaged_shard_is_named_and_the_previous_checkpoint_used(sharded_run, tmp_path):
    import shutil
    model_dir = tmp_path / "model"
    shutil.copytree(sharded_run, model_dir)
    data = model_dir / "model.ckpt-14" / "__0_0.distcp"
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0xFF
    data.write_bytes(bytes(content))
    estimator = make_estimator(model_dir)
    assert estimator.latest_checkpoint() == str(model_dir / "model.ckpt-12")


def test_inspect_reads_a_sharded_checkpoint_without_its_data(sharded_run):
    inspected = subprocess.run([sys.executable, "-m", "torch_tpu_estimator", "inspect",
                                str(sharded_run)], capture_output=True, text=True, timeout=120)
    assert inspected.returncode == 0, inspected.stderr
    assert f"checkpoint: {sharded_run / 'model.ckpt-14'} (sharded)" in inspected.stdout
    assert "global_step: 14" in inspected.stdout and "EMA of the weights: yes" in inspected.stdout
    assert "layers.0.weight" in inspected.stdout and "[16, 8]" in inspected.stdout


@pytest.mark.parametrize("use_tpu", [True, False], ids=["xla", "torch"])
def test_bf16_runs_model_fn_in_bfloat16_with_float32_weights(tmp_path, use_tpu):
    seen = set()

    def model_fn(model, features, labels, mode, params):
        logits = model(features)
        seen.add((mode, logits.dtype, next(model.parameters()).dtype))
        if mode == ModeKeys.PREDICT:
            return TPUEstimatorSpec(mode, predictions=logits)
        return TPUEstimatorSpec(mode, loss=torch.nn.functional.cross_entropy(logits, labels))

    estimator = make_estimator(tmp_path, fn=model_fn, use_tpu=use_tpu,
                               tpu_config_extra={"precision": "bf16"})
    estimator.train(lambda params: make_data(32), steps=2)
    estimator.evaluate(lambda params: make_data(8))
    assert seen == {(mode, torch.bfloat16, torch.float32)
                    for mode in (ModeKeys.TRAIN, ModeKeys.EVAL)}


def _copy_with_damaged_shard(sharded_run, model_dir) -> str:
    """A copy of the run whose latest checkpoint's shard file is cut in half."""
    import shutil
    shutil.copytree(sharded_run, model_dir)
    data = model_dir / "model.ckpt-14" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    return str(model_dir / "model.ckpt-14")


USES = {
    "evaluate": lambda estimator, path: estimator.evaluate(lambda params: make_data(8),
                                                           checkpoint_path=path),
    "predict": lambda estimator, path: list(estimator.predict(lambda params: make_data(8),
                                                              checkpoint_path=path)),
    "export": lambda estimator, path: estimator.export_saved_model(
        os.path.dirname(path) + "-exports", torch.zeros(1, 8), checkpoint_path=path),
    "warm_start": lambda estimator, path: make_estimator(
        os.path.dirname(path) + "-warm", warm_start_from=path).train(
            lambda params: make_data(16), steps=1),
}


@pytest.mark.parametrize("use", sorted(USES))
def test_a_truncated_shard_given_by_path_is_a_value_error_naming_the_checkpoint(
        sharded_run, tmp_path, use):
    """Listed in its model_dir's index: the digest finds the damage before any read."""
    path = _copy_with_damaged_shard(sharded_run, tmp_path / "model")
    with pytest.raises(ValueError, match=rf"checkpoint '{path}' is damaged: its SHA-256 differs"):
        USES[use](make_estimator(tmp_path / "model"), path)


def test_a_truncated_shard_outside_any_model_dir_is_a_value_error(sharded_run, tmp_path):
    """No index to check it against: DCP's read fails (a CheckpointException, which derives
    from BaseException), and the error is a ValueError naming the checkpoint."""
    import shutil
    path = _copy_with_damaged_shard(sharded_run, tmp_path / "model")
    loose = tmp_path / "loose" / "model.ckpt-14"
    shutil.copytree(path, loose)
    with pytest.raises(ValueError, match=r"sharded checkpoint '.*loose/model.ckpt-14' cannot be "
                                         r"read"):
        USES["evaluate"](make_estimator(tmp_path / "model"), str(loose))


@pytest.mark.parametrize("name", ["__0_0.distcp", "state.pt"])
def test_a_file_of_a_sharded_checkpoint_that_is_a_symlink_is_refused(sharded_run, tmp_path,
                                                                     name):
    import shutil
    loose = tmp_path / "loose" / "model.ckpt-14"
    shutil.copytree(sharded_run / "model.ckpt-14", loose)
    outside = tmp_path / "elsewhere"
    os.replace(loose / name, outside)
    os.symlink(outside, loose / name)
    with pytest.raises(ValueError, match=rf"names '{name}', which is a symbolic link: refused"):
        USES["evaluate"](make_estimator(tmp_path / "model"), str(loose))


def test_a_sharded_checkpoint_in_a_bucket_equals_a_local_one_and_restores_onto_2_devices(
        sharded_run, reference, bucket):
    done = _run(KILLED, f"{bucket}/run", 0)
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_values(_state(f"{bucket}/run/model.ckpt-14"), _state(sharded_run / "model.ckpt-14"))
    results = run_fresh(EVALUATE, "spmd", f"{bucket}/run", CPU_NUM_DEVICES="2")
    assert results["global_step"] == 14
    assert results["loss"] == pytest.approx(reference["loss"], rel=1e-5)
