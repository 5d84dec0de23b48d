"""Steps/sec of TPUEstimator.train against a hand-written best-practice torch_xla loop.

Same model, data, batch size, optimizer and device, measured side by side in one process,
alternating, after both have compiled their graphs. The hand loop is what the torch_xla docs
recommend: DataLoader -> MpDeviceLoader, xm.optimizer_step, no per-step `.item()`.

    PJRT_DEVICE=CPU python benchmarks/train_throughput.py [--steps 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
import torch_xla
import torch_xla.core.xla_model as xm
import torch_xla.distributed.parallel_loader as pl
from torch.utils.data import DataLoader, TensorDataset

from torch_tpu_estimator import InputPipelineConfig, RunConfig, TPUConfig, TPUEstimator, TPUEstimatorSpec

BATCH = 128


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(),
        torch.nn.Linear(512, 10))


def make_dataset(size: int = 8192) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(size, 256, generator=generator)
    return TensorDataset(features, features[:, :10].argmax(1))


def hand_loop(dataset: TensorDataset, steps: int) -> float:
    """Seconds for `steps` steps of the best-practice loop, model built and data loaded inside."""
    started = time.perf_counter()
    device = torch_xla.device()
    torch.manual_seed(0)
    model = make_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True)
    device_loader = pl.MpDeviceLoader(loader, device)
    done = 0
    while done < steps:
        for features, labels in device_loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(features), labels)
            loss.backward()
            xm.optimizer_step(optimizer)
            done += 1
            if done == steps:
                break
    xm.wait_device_ops()
    loss.item()
    return time.perf_counter() - started


def model_fn(model, features, labels, mode, params):
    return TPUEstimatorSpec(mode, loss=F.cross_entropy(model(features), labels))


def estimator_run(dataset: TensorDataset, steps: int, iterations_per_loop: int) -> float:
    """Seconds for TPUEstimator.train(steps) in a fresh model_dir, final checkpoint included."""
    with tempfile.TemporaryDirectory() as model_dir:
        estimator = TPUEstimator(
            model_fn=model_fn, model_init_fn=lambda params: make_model(),
            optimizer_fn=lambda model, params: torch.optim.Adam(model.parameters(), lr=1e-3),
            model_dir=model_dir, train_batch_size=BATCH,
            config=RunConfig(save_checkpoints_steps=None, log_step_count_steps=None,
                             save_summary_steps=None, input_config=InputPipelineConfig(),
                             tpu_config=TPUConfig(iterations_per_loop=iterations_per_loop)))
        started = time.perf_counter()
        estimator.train(lambda params: dataset, steps=steps)
        xm.wait_device_ops()
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iterations-per-loop", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dataset = make_dataset()
    hand_loop(dataset, 20)  # compile both programs once, outside the timings
    estimator_run(dataset, 20, args.iterations_per_loop)

    ratios, hand_rates, estimator_rates = [], [], []
    for repeat in range(args.repeats):
        hand_rate = args.steps / hand_loop(dataset, args.steps)
        estimator_rate = args.steps / estimator_run(dataset, args.steps, args.iterations_per_loop)
        hand_rates.append(hand_rate)
        estimator_rates.append(estimator_rate)
        ratios.append(estimator_rate / hand_rate)
        print(f"run {repeat + 1}: hand loop {hand_rate:8.1f} steps/s   "
              f"TPUEstimator {estimator_rate:8.1f} steps/s   ratio {ratios[-1]:.3f}")
    print(f"median: hand loop {statistics.median(hand_rates):.1f} steps/s, TPUEstimator "
          f"{statistics.median(estimator_rates):.1f} steps/s, ratio {statistics.median(ratios):.3f} "
          f"(device {xm.xla_device_hw(torch_xla.device())}, batch {BATCH}, {args.steps} steps, "
          f"iterations_per_loop {args.iterations_per_loop})")


if __name__ == "__main__":
    main()
