"""TPUEstimator against hand-written torch_xla loops and Lightning: train, evaluate, predict.

Each mode does the same work on the same model, data, batch size and device with every side:

- `estimator`: TPUEstimator (windows of 100 steps; training replays its compiled step after
  the first traced ones, TPUConfig.replay_training=True; evaluate and predict run 10 steps per
  XLA program, TPUConfig.inference_steps_per_execution=10, replayed without tracing after the
  first two groups, TPUConfig.replay_inference=True; the train run writes its final checkpoint).
- `hand`: the loop the torch_xla docs recommend: a DataLoader collating rows -> MpDeviceLoader,
  xm.optimizer_step, no per-step `.item()` (each step's outputs stay on the device and come
  back in one transfer at the end).
- `hand_indexed`: the same loop fetching each batch with one indexing op per tensor, which
  leaves only the estimator's own overhead (windows, checks, gathering, host metrics).
- `lightning`: PyTorch Lightning's XLA strategy on one device (when `lightning` is installed:
  the `bench` extra), fit / validate / predict.
- `estimator_accum4` (train only): TPUEstimator with UpdateConfig(accumulation_steps=4), the
  same global batch in 4 micro-batches inside one step: the cost of accumulation.
- `estimator_traced`: every step traced (replay_training=False; in evaluate and predict the
  same 10 steps per program, replay_inference=False): what replay gains.
- `estimator_1step` (eval and predict only): TPUEstimator's defaults, one traced step per
  program: what grouping and replay gain together.

Models: an MLP (64-256-256-10 on 64 features) and a small CNN (two 3x3 conv + ReLU + 2x2
max-pool layers, then a linear layer, on 3x16x16 images); random data, 10 classes, batch 64,
training with Adam (lr 1e-3) and with SGD with momentum 0.9 (lr 0.01) (`--optimizers`), on every
side.
Modes: train (`--steps` steps from a fresh model), evaluate (loss and accuracy over every
example, exactly, from a checkpoint), predict (the class of every example, in order).

Every run is a fresh process that warms up (compiles) and then times one steady-state run; the
sides alternate, round after round, and the summary gives each side's median rate with min-max
over `--repeats` rounds, the estimator's ratio to each other side (median of the per-round
ratios, >1 = the estimator is faster), the compilations of the warm-up, the device-to-host
transfers of the timed run (the timed runs compile nothing) and, in training, the wall time of
a step over the device's own time for it (torch_xla's ExecuteTime: 1.0 = the host keeps up).

    PJRT_DEVICE=CPU python benchmarks/estimator_vs_hand_loop.py [--repeats 5] [--steps 500]
        [--eval-examples 20000] [--predict-examples 20000] [--models mlp,cnn]
        [--modes train,eval,predict] [--optimizers adam,sgd]
        [--sides estimator,hand,hand_indexed,lightning,estimator_accum4,estimator_traced,
                 estimator_1step]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import statistics
import subprocess
import sys
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
from figure import Bar, ratio_chart
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from torch_tpu_estimator import (
    ModeKeys,
    RunConfig,
    TPUConfig,
    TPUEstimator,
    TPUEstimatorSpec,
    UpdateConfig,
    metrics,
)

BATCH = 64
TRAIN_EXAMPLES = 8192
CHECKPOINT_STEPS = 20
MODES = ("train", "eval", "predict")
SIDES = ("estimator", "hand", "hand_indexed", "lightning", "estimator_accum4", "estimator_traced",
         "estimator_1step")
TRAIN_ONLY, INFERENCE_ONLY = ("estimator_accum4",), ("estimator_1step",)
OPTIMIZERS = ("adam", "sgd")
OPTIMIZER = "adam"  # set from --optimizer
STEPS_PER_PROGRAM = 10
Build = Callable[[], nn.Module]


def make_mlp() -> nn.Module:
    """64-256-256-10 with ReLUs."""
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def make_cnn() -> nn.Module:
    """Two conv + pooling layers and a linear layer, for 3x16x16 images."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


MODELS: dict[str, tuple[Build, tuple[int, ...]]] = {
    "mlp": (make_mlp, (64,)),
    "cnn": (make_cnn, (3, 16, 16)),
}


def make_dataset(shape: tuple[int, ...], size: int, seed: int) -> TensorDataset:
    """Random features of `shape`; the label is the argmax of a feature's first ten values."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(size, *shape, generator=generator)
    return TensorDataset(features, features.flatten(1)[:, :10].argmax(1))


INDEXED_FETCH = False  # the hand_indexed side: the hand loops index whole batches


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


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer every side trains with (--optimizer)."""
    if OPTIMIZER == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=1e-3)


def hand_train(build: Build, dataset: TensorDataset, steps: int) -> torch.Tensor:
    """`steps` optimizer steps from a new model; returns the per-step losses, read once at
    the end."""
    device = torch_xla.device()
    torch.manual_seed(0)
    model = build().to(device)
    optimizer = make_optimizer(model)
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


def make_estimator(build: Build, model_dir: str, accumulation: int = 1,
                   steps_per_program: int = STEPS_PER_PROGRAM, replay: bool = True,
                   window: int = 100) -> TPUEstimator:
    """TPUEstimator with checkpoints, summaries and step logging off, windows of 100 steps,
    `steps_per_program` evaluate and predict steps per XLA program, replayed or not."""
    return TPUEstimator(
        model_fn=model_fn, model_init_fn=lambda params: build(),
        optimizer_fn=lambda model, params: make_optimizer(model),
        model_dir=model_dir, train_batch_size=BATCH, eval_batch_size=BATCH,
        predict_batch_size=BATCH,
        config=RunConfig(save_checkpoints_steps=None, log_step_count_steps=None,
                         save_summary_steps=None, tpu_config=TPUConfig(
                             iterations_per_loop=window,
                             inference_steps_per_execution=steps_per_program,
                             replay_inference=replay, replay_training=replay),
                         update_config=UpdateConfig(accumulation_steps=accumulation)))


def estimator_train(build: Build, dataset: TensorDataset, steps: int, scratch: str,
                    accumulation: int = 1, replay: bool = True) -> None:
    """`steps` steps of TPUEstimator.train in a new model_dir, final checkpoint included."""
    make_estimator(build, tempfile.mkdtemp(dir=scratch), accumulation, replay=replay).train(
        lambda params: dataset, steps=steps)


def estimator_predict(estimator: TPUEstimator, dataset: TensorDataset) -> torch.Tensor:
    """Every example's class in input order, from the whole predict generator."""
    batches = estimator.predict(lambda params: dataset, yield_single_examples=False)
    return torch.cat([batch["class"] for batch in batches])


def count(metric: str) -> int:
    """How many times torch_xla has recorded `metric` in this process."""
    data = met.metric_data(metric)
    return 0 if data is None else data[0]


def lightning_side(build: Build, mode: str, dataset: TensorDataset, steps: int,
                   checkpoint: str | None) -> Callable[[], Any]:
    """Lightning's XLA strategy on one device doing the same work (fit, validate, predict)."""
    import lightning as L
    from torch_xla._internal import tpu

    tpu.num_available_devices = lambda: 1  # Lightning refuses XLA:CPU otherwise

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = build() if checkpoint is None else restored(build, checkpoint).cpu()

        def training_step(self, batch, index):
            features, labels = batch
            return F.cross_entropy(self.model(features), labels)

        def validation_step(self, batch, index):
            features, labels = batch
            logits = self.model(features)
            self.log_dict({"loss": F.cross_entropy(logits, labels),
                           "accuracy": (logits.argmax(1) == labels).float().mean()})

        def predict_step(self, batch, index):
            return self.model(batch[0]).argmax(1)

        def configure_optimizers(self):
            return make_optimizer(self)

    def trainer() -> L.Trainer:
        return L.Trainer(accelerator="tpu", devices=1, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)

    def run() -> Any:
        torch.manual_seed(0)
        module = Module()
        if mode == "train":
            sampler = RandomSampler(dataset, num_samples=steps * BATCH)
            trainer().fit(module, batch_loader(dataset, sampler))
        elif mode == "eval":
            return trainer().validate(module, padded_loader(dataset), verbose=False)
        else:
            return trainer().predict(module, padded_loader(dataset))
    return run


def side_work(side: str, model: str, mode: str, args: argparse.Namespace, scratch: str,
              checkpoint: str | None) -> tuple[Callable[[], Any], int]:
    """The work one side does for one model and mode, and how many steps or examples it is."""
    build, shape = MODELS[model]
    if mode == "train":
        dataset, amount = make_dataset(shape, TRAIN_EXAMPLES, seed=0), args.steps
    else:
        amount = args.eval_examples if mode == "eval" else args.predict_examples
        dataset = make_dataset(shape, amount, seed=1 if mode == "eval" else 2)
        if mode == "predict":
            dataset = TensorDataset(dataset.tensors[0])
    global INDEXED_FETCH
    INDEXED_FETCH = side == "hand_indexed"
    if side == "lightning":
        return lightning_side(build, mode, dataset, args.steps, checkpoint), amount
    if side.startswith("hand"):
        work = {"train": lambda: hand_train(build, dataset, args.steps),
                "eval": lambda: hand_eval(build, checkpoint, dataset),
                "predict": lambda: hand_predict(build, checkpoint, dataset)}[mode]
        return work, amount
    if mode == "train":
        accumulation = 4 if side == "estimator_accum4" else 1
        return lambda: estimator_train(build, dataset, args.steps, scratch, accumulation,
                                       replay=side != "estimator_traced"), amount
    estimator = make_estimator(build, os.path.dirname(checkpoint),
                               steps_per_program=1 if side == "estimator_1step" else
                               STEPS_PER_PROGRAM, replay=side == "estimator")
    if mode == "eval":
        return lambda: estimator.evaluate(lambda params: dataset), amount
    return lambda: estimator_predict(estimator, dataset), amount


def one_run(side: str, model: str, mode: str, args: argparse.Namespace) -> dict:
    """In this (fresh) process: a warm-up run, then one timed run of one side."""
    with tempfile.TemporaryDirectory() as scratch:
        work, amount = side_work(side, model, mode, args, scratch, args.checkpoint)
        compiles = count("CompileTime")
        work()
        xm.wait_device_ops()
        warmup_compiles = count("CompileTime") - compiles
        compiles, transfers = count("CompileTime"), count("TransferFromDeviceTime")
        started = time.perf_counter()
        work()
        xm.wait_device_ops()
        seconds = time.perf_counter() - started
        timed_compiles = count("CompileTime") - compiles
        transfers = count("TransferFromDeviceTime") - transfers
    busy = None
    if mode == "train" and side in ("estimator", "estimator_traced", "hand"):
        build, shape = MODELS[model]
        busy = seconds / amount / device_seconds_per_step(side, build, make_dataset(shape, 512, 0))
    return {"rate": amount / seconds, "warmup_compiles": warmup_compiles,
            "timed_compiles": timed_compiles, "transfers": transfers, "wall_over_device": busy}


def device_seconds_per_step(side: str, build: Build, dataset: TensorDataset,
                            steps: int = 60) -> float:
    """The device's own time for one of `side`'s training steps: torch_xla's ExecuteTime, the
    median of the last steps of a run where each step runs alone (the host waits for it), so
    that no queueing behind another step is counted."""
    if side == "hand":
        device = torch_xla.device()
        model = build().to(device)
        optimizer = make_optimizer(model)
        features, labels = (tensor[:BATCH].to(device) for tensor in dataset.tensors)
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(model(features), labels).backward()
            optimizer.step()
            torch_xla.sync()
            xm.wait_device_ops()
    else:  # windows of one step: each step's loss is read before the next step starts
        with tempfile.TemporaryDirectory() as model_dir:
            make_estimator(build, model_dir, replay=side == "estimator", window=1).train(
                lambda params: dataset, steps=steps)
    samples = [value for _, value in met.metric_data("ExecuteTime")[2][-steps // 2:]]
    return statistics.median(samples) / 1e9


def fresh(args: argparse.Namespace, *options: str) -> dict:
    """Runs this script with `options` in a new interpreter; returns the JSON it prints."""
    command = [sys.executable, os.path.abspath(__file__), *options,
               "--steps", str(args.steps),
               "--eval-examples", str(args.eval_examples),
               "--predict-examples", str(args.predict_examples)]
    done = subprocess.run(command, env=dict(os.environ, PJRT_DEVICE="CPU"),
                          capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise RuntimeError(f"{' '.join(options)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare_checkpoint(model: str, directory: str) -> str:
    """A checkpoint trained CHECKPOINT_STEPS steps, which eval and predict read."""
    build, shape = MODELS[model]
    estimator = make_estimator(build, directory)
    train_set = make_dataset(shape, TRAIN_EXAMPLES, seed=0)
    estimator.train(lambda params: train_set, steps=CHECKPOINT_STEPS)
    return estimator.latest_checkpoint()


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def benchmark(args: argparse.Namespace, sides: list[str]) -> tuple[list[str], list[Bar]]:
    """Markdown rows: for each model and mode, every side's rate and the estimator's ratios;
    and the ratios to the hand loop, for the figure."""
    rows, bars = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for model in args.models:
            checkpoint = fresh(args, "--prepare", model, os.path.join(scratch, model))["path"]
            # training once per optimizer; evaluate and predict read the (Adam) checkpoint
            runs_of = [(mode, optimizer) for mode in args.modes
                       for optimizer in (args.optimizers if mode == "train" else ["adam"])]
            for mode, optimizer in runs_of:
                label = f"{mode} ({optimizer})" if mode == "train" else mode
                chosen = [side for side in sides
                          if side not in (INFERENCE_ONLY if mode == "train" else TRAIN_ONLY)]
                runs: dict[str, list[dict]] = {side: [] for side in chosen}
                for round_ in range(args.repeats):
                    for side in chosen:  # alternating, a fresh process each
                        runs[side].append(fresh(args, "--one", side, model, mode, "--checkpoint",
                                                checkpoint, "--optimizer", optimizer))
                    print(f"{model} {label} round {round_ + 1}: " + ", ".join(
                        f"{side} {runs[side][-1]['rate']:.1f}" for side in chosen), flush=True)
                unit = "steps/s" if mode == "train" else "examples/s"
                for side in chosen:
                    rates = [run["rate"] for run in runs[side]]
                    ratios = [estimator["rate"] / run["rate"] for estimator, run in
                              zip(runs["estimator"], runs[side], strict=True)]
                    if side == "hand":
                        bars.append((f"{model} {label}", statistics.median(ratios), min(ratios),
                                     max(ratios)))
                    last = runs[side][-1]
                    busy = [run["wall_over_device"] for run in runs[side]
                            if run["wall_over_device"]]
                    rows.append(f"| {model} | {label} | {side} | {summary(rates)} {unit} | "
                                f"{summary(ratios) if side != 'estimator' else ''} | "
                                f"{last['warmup_compiles']} | {last['transfers']} | "
                                f"{summary(busy) if busy and mode == 'train' else ''} |")
    return rows, bars


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
    """Parses the options; runs one side (--one), prepares a checkpoint (--prepare), or drives
    the whole comparison and prints its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive, default=500, help="train steps per run")
    parser.add_argument("--eval-examples", type=positive, default=20000)
    parser.add_argument("--predict-examples", type=positive, default=20000)
    parser.add_argument("--repeats", type=positive, default=5)
    parser.add_argument("--models", type=lambda text: names(text, tuple(MODELS)),
                        default=list(MODELS))
    parser.add_argument("--modes", type=lambda text: names(text, MODES), default=list(MODES))
    parser.add_argument("--sides", type=lambda text: names(text, SIDES), default=list(SIDES))
    parser.add_argument("--optimizers", type=lambda text: names(text, OPTIMIZERS),
                        default=list(OPTIMIZERS), help="the optimizers training runs with")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                        help=argparse.SUPPRESS)  # one run's (--one, --prepare)
    parser.add_argument("--figure", default=None,
                        help="write the ratios to the hand loop as an SVG bar chart here")
    parser.add_argument("--one", nargs=3, metavar=("SIDE", "MODEL", "MODE"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--prepare", nargs=2, metavar=("MODEL", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    global OPTIMIZER
    OPTIMIZER = args.optimizer
    if args.one:
        print(json.dumps(one_run(*args.one, args)))
        return
    if args.prepare:
        print(json.dumps({"path": prepare_checkpoint(*args.prepare)}))
        return
    sides = [side for side in args.sides
             if side != "lightning" or importlib.util.find_spec("lightning") is not None]
    if "estimator" not in sides:
        sides.insert(0, "estimator")
    print(f"device {xm.xla_device_hw(torch_xla.device())}, batch {BATCH}, {args.steps} train "
          f"steps ({', '.join(args.optimizers)}), {args.eval_examples} eval and {args.predict_examples} "
          "predict examples, "
          f"{args.repeats} rounds of fresh processes, sides {', '.join(sides)}")
    rows, bars = benchmark(args, sides)
    print("\n| model | mode | side | rate, median (min-max) | estimator / side, median "
          "(min-max) | compiles in warm-up | transfers per timed run | train: wall / device "
          "time |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    if args.figure and bars:
        with open(args.figure, "w") as handle:
            handle.write(ratio_chart(bars, "TPUEstimator over the hand-written torch_xla loop "
                                           "(median, min-max)"))
        print(f"\nfigure: {args.figure}")


if __name__ == "__main__":
    main()
