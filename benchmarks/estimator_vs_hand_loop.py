"""TPUEstimator against the best hand-written torch_xla loop: train, evaluate and predict.

Each mode does the same work on the same model, data, batch size and device with TPUEstimator
and with the loop the torch_xla docs recommend (DataLoader -> MpDeviceLoader, xm.optimizer_step,
no per-step `.item()`: each step's outputs stay on the device and come to the host in one
transfer at the end, every step runs the same compiled graph), in one process, alternating,
after both sides have compiled. Models: an MLP (256-512-512-10) on 256 features and a small
CNN (two 3x3 conv + ReLU + 2x2 max-pool layers, then a linear layer) on 3x16x16 images; random
data, 10 classes, batch 128. Ratios above 1 mean the estimator is faster.

- train: `--steps` Adam steps from a fresh model, reshuffling the data every pass. The
  estimator's time includes writing its final checkpoint (it always does); the hand loop saves
  nothing.
- evaluate: loss and accuracy over every example, exactly, from one checkpoint trained once per
  model. Both sides build the model and load the checkpoint's weights. The estimator pads the
  last batch to the fixed shape and strips the padding on the host, where metrics.accuracy and a
  per-example loss are averaged. The hand loop pads the data set to whole batches (repeating the
  last example, as the estimator does, through the sampler), weighs each row (1 real, 0 padding)
  and keeps one pair of weighted sums (loss, correct predictions) per step on the device.
- predict: the argmax class of every example, on the host in input order. The estimator's
  `predict(..., yield_single_examples=False)` generator is consumed whole; the hand loop pads the
  same way, keeps each step's classes on the device and cuts the padding off on the host.

The eval and predict sizes need not divide by the batch: both sides pad. The warm-up run checks
that both give the same eval metrics and the same predictions. Beside the rates, the summary
gives the XLA compilations of each side's warm-up run (the hand loop warms up first; a graph it
compiled is not compiled again for the estimator) and the device-to-host transfers of one timed
run; timed runs compile nothing.

    PJRT_DEVICE=CPU python benchmarks/estimator_vs_hand_loop.py [--steps 300] [--repeats 5]
        [--eval-examples 50000] [--predict-examples 50000] [--models mlp,cnn]
        [--modes train,eval,predict] [--hand-fetch collate|indexed]

The estimator fetches a TensorDataset's batches with one indexing op per tensor; the hand loops
collate rows through a DataLoader by default, as the torch_xla examples do, or index whole
batches too with --hand-fetch indexed, which isolates the estimator's own overhead.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torch_xla
import torch_xla.core.xla_model as xm
import torch_xla.debug.metrics as met
import torch_xla.distributed.parallel_loader as pl
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from torch_tpu_estimator import (
    ModeKeys,
    RunConfig,
    TPUConfig,
    TPUEstimator,
    TPUEstimatorSpec,
    metrics,
)

BATCH = 128
TRAIN_EXAMPLES = 8192
CHECKPOINT_STEPS = 20
MODES = ("train", "eval", "predict")
Build = Callable[[], nn.Module]


def make_mlp() -> nn.Module:
    """256-512-512-10 with ReLUs."""
    return nn.Sequential(
        nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def make_cnn() -> nn.Module:
    """Two conv + pooling layers and a linear layer, for 3x16x16 images."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


MODELS: dict[str, tuple[Build, tuple[int, ...]]] = {
    "mlp": (make_mlp, (256,)),
    "cnn": (make_cnn, (3, 16, 16)),
}


def make_dataset(shape: tuple[int, ...], size: int, seed: int) -> TensorDataset:
    """Random features of `shape`; the label is the argmax of a feature's first ten values."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(size, *shape, generator=generator)
    return TensorDataset(features, features.flatten(1)[:, :10].argmax(1))


INDEXED_FETCH = False  # --hand-fetch indexed: the hand loops index whole batches too


def batch_loader(dataset: TensorDataset, sampler: Any) -> DataLoader:
    """Batches of BATCH examples in `sampler`'s order: collated row by row, as the torch_xla
    examples do, or (INDEXED_FETCH) fetched with one indexing op per tensor."""
    if INDEXED_FETCH:
        return DataLoader(dataset, batch_size=None,
                          sampler=BatchSampler(sampler, BATCH, drop_last=False))
    return DataLoader(dataset, batch_size=BATCH, sampler=sampler)


def padded_loader(dataset: TensorDataset) -> DataLoader:
    """Whole batches in input order, the last one filled up by repeating the last example."""
    size = len(dataset)
    return batch_loader(dataset, [*range(size), *[size - 1] * (-size % BATCH)])


def restored(build: Build, checkpoint: str) -> nn.Module:
    """A new module with the checkpoint's weights, on the XLA device, in eval mode."""
    model = build()
    model.load_state_dict(torch.load(checkpoint)["model"])
    return model.to(torch_xla.device()).eval()


def hand_train(build: Build, dataset: TensorDataset, steps: int) -> torch.Tensor:
    """`steps` Adam steps from a new model; returns the per-step losses, read once at the end."""
    device = torch_xla.device()
    torch.manual_seed(0)
    model = build().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sampler = RandomSampler(dataset, num_samples=steps * BATCH)  # reshuffled every pass
    loader = pl.MpDeviceLoader(batch_loader(dataset, sampler), device)
    losses = []
    for features, labels in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(features), labels)
        loss.backward()
        xm.optimizer_step(optimizer)
        losses.append(loss.detach())
    return torch.stack(xm._maybe_convert_to_cpu(losses))


def hand_eval(build: Build, checkpoint: str,
              dataset: TensorDataset) -> dict[str, float]:
    """Mean loss and accuracy over every example, from the checkpoint's weights."""
    device = torch_xla.device()
    model = restored(build, checkpoint)
    loader = padded_loader(dataset)
    # Row weights, 1 real and 0 padding, as device data: every step runs the same graph.
    real_in_last = len(dataset) - (len(loader) - 1) * BATCH
    full = torch.ones(BATCH).to(device)
    last = (torch.arange(BATCH) < real_in_last).float().to(device)
    sums = []
    with torch.no_grad():
        for step, (features, labels) in enumerate(pl.MpDeviceLoader(loader, device)):
            weights = last if step == len(loader) - 1 else full
            logits = model(features)
            losses = F.cross_entropy(logits, labels, reduction="none")
            correct = (logits.argmax(1) == labels).float()
            sums.append(torch.stack([(losses * weights).sum(), (correct * weights).sum()]))
    totals = torch.stack(xm._maybe_convert_to_cpu(sums)).double().sum(0) / len(dataset)
    return {"loss": float(totals[0]), "accuracy": float(totals[1])}


def hand_predict(build: Build, checkpoint: str,
                 dataset: TensorDataset) -> torch.Tensor:
    """The argmax class of every example in input order, from the checkpoint's weights."""
    model = restored(build, checkpoint)
    loader = pl.MpDeviceLoader(padded_loader(dataset), torch_xla.device())
    classes = []
    with torch.no_grad():
        for (features,) in loader:
            classes.append(model(features).argmax(1))
    return torch.cat(xm._maybe_convert_to_cpu(classes))[:len(dataset)]


def metric_fn(labels: torch.Tensor, predictions: torch.Tensor) -> dict[str, metrics.Metric]:
    """Accuracy of the predicted classes."""
    return {"accuracy": metrics.accuracy(labels=labels, predictions=predictions)}


def model_fn(model: nn.Module, features: torch.Tensor, labels: torch.Tensor | None, mode: str,
             params: dict) -> TPUEstimatorSpec:
    """Mean loss to train, per-example loss and accuracy to evaluate, classes to predict."""
    logits = model(features)
    if mode == ModeKeys.PREDICT:
        return TPUEstimatorSpec(mode, predictions={"class": logits.argmax(1)})
    if mode == ModeKeys.EVAL:
        return TPUEstimatorSpec(mode, loss=F.cross_entropy(logits, labels, reduction="none"),
                                eval_metrics=(metric_fn, [labels, logits.argmax(1)]))
    return TPUEstimatorSpec(mode, loss=F.cross_entropy(logits, labels))


def make_estimator(build: Build, model_dir: str) -> TPUEstimator:
    """TPUEstimator with checkpoints, summaries and step logging off, windows of 100 steps."""
    return TPUEstimator(
        model_fn=model_fn, model_init_fn=lambda params: build(),
        optimizer_fn=lambda model, params: torch.optim.Adam(model.parameters(), lr=1e-3),
        model_dir=model_dir, train_batch_size=BATCH, eval_batch_size=BATCH,
        predict_batch_size=BATCH,
        config=RunConfig(save_checkpoints_steps=None, log_step_count_steps=None,
                         save_summary_steps=None, tpu_config=TPUConfig(iterations_per_loop=100)))


def estimator_train(build: Build, dataset: TensorDataset, steps: int,
                    scratch: str) -> None:
    """`steps` steps of TPUEstimator.train in a new model_dir, final checkpoint included."""
    make_estimator(build, tempfile.mkdtemp(dir=scratch)).train(lambda params: dataset, steps=steps)


def estimator_predict(estimator: TPUEstimator, dataset: TensorDataset) -> torch.Tensor:
    """Every example's class in input order, from the whole predict generator."""
    batches = estimator.predict(lambda params: dataset, yield_single_examples=False)
    return torch.cat([batch["class"] for batch in batches])


def count(metric: str) -> int:
    """How many times torch_xla has recorded `metric` in this process."""
    data = met.metric_data(metric)
    return 0 if data is None else data[0]


@dataclasses.dataclass
class Run:
    """One run of one side: wall time, XLA compilations, device-to-host transfers, result."""

    seconds: float
    compiles: int
    transfers: int
    result: Any


def measure(work: Callable[[], Any]) -> Run:
    """Runs `work` once, until the device is idle."""
    compiles, transfers = count("CompileTime"), count("TransferFromDeviceTime")
    started = time.perf_counter()
    result = work()
    xm.wait_device_ops()
    seconds = time.perf_counter() - started
    return Run(seconds, count("CompileTime") - compiles,
               count("TransferFromDeviceTime") - transfers, result)


def check_agreement(mode: str, hand: Any, estimator: Any) -> None:
    """Raises unless both sides gave the same eval metrics or the same predictions."""
    if mode == "train":  # the two sides shuffle differently: nothing to compare
        return
    if mode == "eval":
        same = all(math.isclose(hand[key], estimator[key], rel_tol=1e-5) for key in hand)
    else:
        same = torch.equal(hand, estimator)
    if not same:
        raise RuntimeError(f"{mode}: the hand loop gave {hand}, TPUEstimator {estimator}")


@dataclasses.dataclass
class Row:
    """The summary of one model and mode."""

    model: str
    mode: str
    unit: str
    hand_rate: float
    estimator_rate: float
    ratio: float
    hand: Run
    estimator: Run
    warmup_compiles: tuple[int, int]  # (hand, estimator): a timed run compiles nothing more


def compare(model: str, mode: str, hand: Callable[[], Any], estimator: Callable[[], Any],
            amount: int, repeats: int) -> Row:
    """Warms both sides up (checking that they agree, and counting what they compile), then
    times alternating runs of each."""
    hand_warmup, estimator_warmup = measure(hand), measure(estimator)
    check_agreement(mode, hand_warmup.result, estimator_warmup.result)
    unit = "steps/s" if mode == "train" else "examples/s"
    hand_rates, estimator_rates, ratios = [], [], []
    for repeat in range(repeats):
        hand_run, estimator_run = measure(hand), measure(estimator)
        hand_rates.append(amount / hand_run.seconds)
        estimator_rates.append(amount / estimator_run.seconds)
        ratios.append(estimator_rates[-1] / hand_rates[-1])
        print(f"{model:3} {mode:7} run {repeat + 1}: hand loop {hand_rates[-1]:9.1f} {unit:10}  "
              f"TPUEstimator {estimator_rates[-1]:9.1f} {unit:10}  ratio {ratios[-1]:.3f}",
              flush=True)
    return Row(model, mode, unit, statistics.median(hand_rates),
               statistics.median(estimator_rates), statistics.median(ratios), hand_run,
               estimator_run, (hand_warmup.compiles, estimator_warmup.compiles))


def benchmark_model(name: str, args: argparse.Namespace) -> list[Row]:
    """Every requested mode of one model; eval and predict share one trained checkpoint."""
    build, shape = MODELS[name]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        estimator = make_estimator(build, f"{scratch}/trained")
        train_set = make_dataset(shape, TRAIN_EXAMPLES, seed=0)
        if "train" in args.modes:
            rows.append(compare(
                name, "train", lambda: hand_train(build, train_set, args.steps),
                lambda: estimator_train(build, train_set, args.steps, scratch), args.steps,
                args.repeats))
        if "eval" in args.modes or "predict" in args.modes:
            estimator.train(lambda params: train_set, steps=CHECKPOINT_STEPS)
            checkpoint = estimator.latest_checkpoint()
        if "eval" in args.modes:
            eval_set = make_dataset(shape, args.eval_examples, seed=1)
            rows.append(compare(
                name, "eval", lambda: hand_eval(build, checkpoint, eval_set),
                lambda: estimator.evaluate(lambda params: eval_set), args.eval_examples,
                args.repeats))
        if "predict" in args.modes:
            features = make_dataset(shape, args.predict_examples, seed=2).tensors[0]
            predict_set = TensorDataset(features)
            rows.append(compare(
                name, "predict", lambda: hand_predict(build, checkpoint, predict_set),
                lambda: estimator_predict(estimator, predict_set), args.predict_examples,
                args.repeats))
    return rows


def print_tables(rows: list[Row]) -> None:
    """The medians as an aligned table, then as a Markdown table."""
    print("\nmedians; compiles of the warm-up run and transfers of one timed run "
          "(hand / estimator)")
    print(f"{'model':5} {'mode':7} {'unit':10} {'hand loop':>10} {'estimator':>10} {'ratio':>6} "
          f"{'compiles':>9} {'transfers':>10}")
    for row in rows:
        print(f"{row.model:5} {row.mode:7} {row.unit:10} {row.hand_rate:10.1f} "
              f"{row.estimator_rate:10.1f} {row.ratio:6.3f} "
              f"{f'{row.warmup_compiles[0]} / {row.warmup_compiles[1]}':>9} "
              f"{f'{row.hand.transfers} / {row.estimator.transfers}':>10}")
    print("\n| model | mode | hand loop | TPUEstimator | ratio | compiles in warm-up (hand / "
          "est.) | transfers per run (hand / est.) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row.model} | {row.mode} | {row.hand_rate:.1f} {row.unit} "
              f"| {row.estimator_rate:.1f} {row.unit} | {row.ratio:.3f} "
              f"| {row.warmup_compiles[0]} / {row.warmup_compiles[1]} "
              f"| {row.hand.transfers} / {row.estimator.transfers} |")


def names(text: str, allowed: tuple[str, ...]) -> list[str]:
    """A comma-separated list of names, each one of `allowed`."""
    chosen = [name for name in text.split(",") if name]
    unknown = sorted(set(chosen) - set(allowed))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {','.join(allowed)}")
    return chosen


def positive(text: str) -> int:
    """An integer option that must be at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> None:
    """Parses the options, compares every chosen model and mode, prints the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive, default=300, help="train steps per run")
    parser.add_argument("--eval-examples", type=positive, default=50000)
    parser.add_argument("--predict-examples", type=positive, default=50000)
    parser.add_argument("--repeats", type=positive, default=5)
    parser.add_argument("--models", type=lambda text: names(text, tuple(MODELS)),
                        default=list(MODELS))
    parser.add_argument("--modes", type=lambda text: names(text, MODES), default=list(MODES))
    parser.add_argument("--hand-fetch", choices=("collate", "indexed"), default="collate",
                        help="how the hand loops batch a TensorDataset: a DataLoader collating "
                             "rows (the torch_xla examples), or one index op per batch")
    args = parser.parse_args()
    global INDEXED_FETCH
    INDEXED_FETCH = args.hand_fetch == "indexed"
    logging.basicConfig(level=logging.WARNING)
    print(f"device {xm.xla_device_hw(torch_xla.device())}, batch {BATCH}, {args.steps} train "
          f"steps, {args.eval_examples} eval and {args.predict_examples} predict examples, "
          f"{args.repeats} runs each, hand loops fetch by {args.hand_fetch}")
    rows = [row for name in args.models for row in benchmark_model(name, args)]
    print_tables(rows)


if __name__ == "__main__":
    main()
