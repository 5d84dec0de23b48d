"""One train / evaluate / predict job on a given runtime layout, run as a script by
test_replicas.py in a fresh process, so that each layout starts its own runtime (SPMD, gloo,
torchrun). Writes what a user would compare across layouts to a JSON file.

usage: replica_job.py CONFIG_JSON   (keys: runtime, replicas, per_host, shuffle, model_dir, out,
                                     fail_in, export)
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys

import torch
import torch.nn.functional as F
from helpers import Net, make_data
from torch.utils.data import DataLoader, TensorDataset

from torch_tpu_estimator import (
    DatasetConfig,
    LossHistory,
    ModeKeys,
    RunConfig,
    TPUConfig,
    TPUEstimator,
    TPUEstimatorSpec,
    metrics,
)

GLOBAL_BATCH = 8
TRAIN_SIZE, EVAL_SIZE, PREDICT_SIZE = 60, 21, 11  # 7.5 global batches a training pass


class InfoCounter(logging.Handler):
    """Counts the library's progress lines this process let through."""

    count = 0

    def emit(self, record):
        if record.levelno == logging.INFO:
            InfoCounter.count += 1


INFO_LOGS = InfoCounter()
logging.getLogger("torch_tpu_estimator").addHandler(INFO_LOGS)
logging.getLogger("torch_tpu_estimator").setLevel(logging.INFO)


def metric_fn(labels, logits):
    predictions = logits.argmax(-1)
    return {"accuracy": metrics.accuracy(labels, predictions),
            "recall": metrics.recall(labels, predictions),
            "auc": metrics.auc(labels, logits.softmax(-1)[:, 1])}


def make_model_fn(fail_in: str | None):
    def model_fn(model, features, labels, mode, params):
        context = params["context"]
        if fail_in == "model_fn" and context.replica_id == 1:
            raise ValueError("model_fn failed on replica 1 on purpose")
        record(f"model_fn/{mode}", [params["batch_size"], int(features.shape[0]),
                                     context.num_replicas])
        logits = model(features)
        if mode == ModeKeys.PREDICT:
            return TPUEstimatorSpec(mode, predictions={"logits": logits, "class": logits.argmax(-1)})
        if mode == ModeKeys.TRAIN:
            return TPUEstimatorSpec(mode, loss=F.cross_entropy(logits, labels))
        return TPUEstimatorSpec(mode, loss=F.cross_entropy(logits, labels, reduction="none"),
                                eval_metrics=(metric_fn, [labels, logits]))
    return model_fn


def record(key: str, value: list) -> None:
    """Appends what a replica saw to a file shared by every process of the job."""
    with open(CONFIG["out"] + ".seen", "a") as handle:
        handle.write(json.dumps([key, value]) + "\n")


def recorded(mode: str, input_fn):
    """input_fn, recording the batch and input pipeline each call was given."""
    def calls(params):
        context = params["context"]
        record(f"input_fn/{mode}", [params["batch_size"], context.input_pipeline_id,
                                    context.num_input_pipelines])
        return input_fn(params)
    return calls


def train_input_fn(params):
    """Per-host: the whole data set. Per-replica: this replica's rows of every global batch."""
    context, batch = params["context"], params["batch_size"]
    record("input_fn/train", [batch, context.input_pipeline_id, context.num_input_pipelines])
    if CONFIG.get("fail_in") == "input_fn" and context.replica_id == 1:
        raise RuntimeError("input_fn failed on replica 1 on purpose")
    data = make_data(TRAIN_SIZE)
    shards = context.num_input_pipelines
    if shards == 1:  # per-host: every row; the last, partial global batch is dropped
        return data
    whole = TRAIN_SIZE // (batch * shards) * batch * shards  # the rows one replica trains on
    rows = [i for i in range(whole)
            if (i % (batch * shards)) // batch == context.input_pipeline_id]
    return TensorDataset(*[tensor[rows] for tensor in data.tensors])


def run(config: dict) -> dict:
    runtime, replicas = config["runtime"], config["replicas"]
    tpu_config = TPUConfig(
        iterations_per_loop=config.get("iterations_per_loop", 3),
        per_host_input_for_training=config.get("per_host", True),
        strategy="spmd" if runtime == "spmd" else "mp",
        num_shards=replicas if runtime == "gloo" else None)
    estimator = TPUEstimator(
        model_fn=make_model_fn(config.get("fail_in")),
        model_init_fn=lambda params: Net(),
        optimizer_fn=lambda model, params: torch.optim.Adam(model.parameters(), lr=0.02),
        model_dir=config["model_dir"],
        use_tpu=runtime in ("xla", "spmd"),
        config=RunConfig(tpu_config=tpu_config, save_checkpoints_steps=4, save_summary_steps=2,
                         dataset_config=DatasetConfig(shuffle=config.get("shuffle", True))),
        train_batch_size=GLOBAL_BATCH, eval_batch_size=GLOBAL_BATCH,
        predict_batch_size=GLOBAL_BATCH)
    recorder = LossHistory()
    estimator.train(train_input_fn, steps=10, hooks=[recorder])
    evaluation = estimator.evaluate(recorded("eval", lambda params: make_data(EVAL_SIZE, seed=2)))
    predict_data = make_data(PREDICT_SIZE, seed=3)
    from_dataset = list(estimator.predict(recorded("predict", lambda params: predict_data)))
    from_loader = list(estimator.predict(
        lambda params: DataLoader(predict_data.tensors[0], batch_size=params["batch_size"])))
    weights = {name: estimator.get_variable_value(name).tolist()
               for name in estimator.get_variable_names()}
    export = estimator.export_saved_model(config["model_dir"] + "-exports", predict_data.tensors[0],
                                          batch_sizes=(4,)) if config.get("export") else None
    return {
        "export": export,
        "library_info_logs": INFO_LOGS.count,
        "train_losses": recorder.losses,
        "weights": weights,
        "evaluation": evaluation,
        "logits": [item["logits"].tolist() for item in from_dataset],
        "classes": [int(item["class"]) for item in from_dataset],
        "loader_logits": [item["logits"].tolist() for item in from_loader],
    }


def record_group_at_exit() -> None:
    """Records, after the library's own exit handlers, whether a process group is still up."""
    record("exit/process_group_initialized", [torch.distributed.is_initialized()])


if __name__ == "__main__":
    CONFIG = json.loads(sys.argv[1])
    atexit.register(record_group_at_exit)  # registered first, so it runs last
    result = run(CONFIG)
    rank = int(os.environ.get("RANK", "0"))
    with open(f"{CONFIG['out']}.{rank}", "w") as handle:
        json.dump(result, handle)
