"""A small model, data and estimator factory shared by the tests, and an event-file reader."""

from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys

import torch
import torch.nn.functional as F
from tensorboardX.proto import event_pb2
from torch.utils.data import TensorDataset

from torch_tpu_estimator import ModeKeys, RunConfig, TPUConfig, TPUEstimator, TPUEstimatorSpec


def make_data(size: int = 100, seed: int = 0) -> TensorDataset:
    """A separable 2-class problem on 8 features."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(size, 8, generator=generator)
    labels = (features[:, :4].sum(1) > features[:, 4:].sum(1)).long()
    return TensorDataset(features, labels)


class Net(torch.nn.Module):
    def __init__(self, hidden: int = 16, dropout: float = 0.0):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden, 2))

    def forward(self, x):
        return self.layers(x)


def model_fn(model, features, labels, mode, params):
    logits = model(features)
    if mode == ModeKeys.PREDICT:
        return TPUEstimatorSpec(mode, predictions={"logits": logits})
    return TPUEstimatorSpec(mode, loss=F.cross_entropy(logits, labels))


def sgd(model, params):
    return torch.optim.SGD(model.parameters(), lr=params.get("lr", 0.1))


def adam_with_schedule(model, params):
    optimizer = torch.optim.Adam(model.parameters(), lr=params.get("lr", 0.01))
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)


def make_estimator(model_dir, use_tpu=True, iterations_per_loop=4, optimizer_fn=sgd,
                   dropout=0.0, params=None, train_batch_size=8, fn=model_fn, warm_start_from=None,
                   eval_on_tpu=True, num_shards=None, per_host_input_for_training=True,
                   strategy="mp", max_graphs=None, replica_timeout_secs=1800.0,
                   model_init_fn=None, tpu_config_extra=None, **config):
    config.setdefault("log_step_count_steps", 1)
    tpu_config = TPUConfig(iterations_per_loop=iterations_per_loop, num_shards=num_shards,
                           per_host_input_for_training=per_host_input_for_training,
                           strategy=strategy, max_graphs_per_mode=max_graphs,
                           replica_timeout_secs=replica_timeout_secs, **(tpu_config_extra or {}))
    return TPUEstimator(
        model_fn=fn,
        model_init_fn=model_init_fn or (lambda p: Net(dropout=dropout)),
        optimizer_fn=optimizer_fn,
        model_dir=str(model_dir),
        use_tpu=use_tpu,
        config=RunConfig(tpu_config=tpu_config, **config),
        params=dict(params or {}),
        train_batch_size=train_batch_size, eval_batch_size=8, predict_batch_size=8,
        warm_start_from=warm_start_from, eval_on_tpu=eval_on_tpu)


def checkpoint_weights(estimator) -> dict:
    return {name: estimator.get_variable_value(name) for name in estimator.get_variable_names()}


def same_values(a, b) -> bool:
    """Nested checkpoint values equal exactly: tensors bit for bit, containers item by item."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, torch.as_tensor(b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_values(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_values(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def read_scalars(directory: str) -> dict[str, dict[int, float]]:
    """All scalar summaries of the event files in `directory`: tag -> {step: value}."""
    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        with open(path, "rb") as handle:
            data = handle.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            record = data[offset + 12:offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def child_pids() -> list[int]:
    """This process's living children (from /proc; zombies excluded)."""
    children = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            children.append(int(entry))
    return children


def run_fresh(script: str, *args, **env_overrides) -> object:
    """Runs `script` in a new interpreter (empty compile cache, no runtime started, no autograd
    threads) and returns the JSON its last output line holds."""
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="1",
               PYTHONPATH=os.path.dirname(__file__))
    env.update(env_overrides)
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
