"""Big models on a 4-device SPMD mesh (XLA:CPU): step time of FSDPv2 against a replicated model,
and checkpoint save / restore time and host memory, sharded (DCP) against one full file.

Every measurement runs in a fresh process, the variants alternating, and the summary gives
medians with min-max:

  - step: a small transformer (`--width`, 4 layers) trained with Adam on the mesh, replicated
    (param_sharding="replicated") or fully sharded (param_sharding="fsdp"); steps/s after the
    compiles.
  - checkpoint: a ~100M-parameter MLP (`--params-millions`), replicated (full-model checkpoint:
    model.ckpt-<n>.pt, the whole state brought to the host, then written) or FSDPv2 (sharded
    checkpoint directory, each device's shards written as they come). One Adam step, then a
    timed save (the capture from the device and the write) and a timed restore + step + save
    (a second train() call). Host memory: the peak resident set size *above* the level before
    the save, sampled every 5 ms during it (on XLA:CPU the devices' memory is host memory too,
    so the absolute peak counts the model itself).

    PJRT_DEVICE=CPU python benchmarks/big_models.py [--repeats 5] [--params-millions 100]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time

from fresh_runs import run_fresh, summary

HERE = os.path.dirname(os.path.abspath(__file__))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """The highest resident set size seen while entered, sampled in a thread."""

    def __enter__(self) -> PeakRss:
        self.start = self.peak = _rss_bytes()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _estimator(model_dir: str, sharding: str, model_init_fn, batch: int):
    import torch
    import torch.nn.functional as F

    from torch_tpu_estimator import ModeKeys, RunConfig, TPUConfig, TPUEstimator, TPUEstimatorSpec

    def model_fn(features, labels, mode, model):
        logits = model(features)
        if mode == ModeKeys.PREDICT:
            return TPUEstimatorSpec(mode, predictions=logits)
        return TPUEstimatorSpec(mode, loss=F.cross_entropy(logits, labels))

    return TPUEstimator(
        model_fn=model_fn, model_init_fn=model_init_fn,
        optimizer_fn=lambda model, params: torch.optim.Adam(model.parameters(), lr=1e-4),
        model_dir=model_dir, train_batch_size=batch,
        config=RunConfig(save_checkpoints_steps=None, log_step_count_steps=None,
                         save_summary_steps=None,
                         tpu_config=TPUConfig(strategy="spmd", param_sharding=sharding,
                                              iterations_per_loop=50)))


def measure_step(sharding: str, width: int, steps: int) -> dict:
    """Steps/s of a transformer classifier after its compiles (one process)."""
    import torch
    from torch.utils.data import TensorDataset

    class Transformer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            layer = torch.nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0,
                                                     batch_first=True)
            self.encoder = torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
            self.head = torch.nn.Linear(width, 8)

        def forward(self, x):
            return self.head(self.encoder(x).mean(1))

    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(512, 16, width, generator=generator),
                         torch.randint(0, 8, (512,), generator=generator))
    with tempfile.TemporaryDirectory() as model_dir:
        estimator = _estimator(model_dir, sharding, lambda params: Transformer(), 32)
        estimator.train(lambda params: data, steps=10)  # compiles
        started = time.perf_counter()
        estimator.train(lambda params: data, steps=steps)
        seconds = time.perf_counter() - started
    return {"steps_per_sec": steps / seconds}


def measure_checkpoint(sharding: str, millions: int) -> dict:
    """Save and restore time, and the host memory a save adds, for a ~`millions`M model."""
    import torch
    from torch.utils.data import TensorDataset

    from torch_tpu_estimator.modes.train import TrainProgram
    from torch_tpu_estimator.state.schema import Checkpoint

    width = 2048
    layers = max(1, round(millions * 1e6 / (width * width)))

    def big(params):
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)],
                                   torch.nn.Linear(width, 8))

    data = TensorDataset(torch.randn(16, width), torch.randint(0, 8, (16,)))
    with tempfile.TemporaryDirectory() as model_dir:
        estimator = _estimator(model_dir, sharding, big, 16)
        real_save = TrainProgram._save  # the capture (device -> host) and the write
        timing = {}

        def timed_save(program, hooks):
            started = time.perf_counter()
            with PeakRss() as rss:
                real_save(program, hooks)
            timing.update(save_seconds=time.perf_counter() - started,
                          save_extra_rss_mb=(rss.peak - rss.start) / 2**20)

        TrainProgram._save = timed_save
        estimator.train(lambda params: data, steps=1)
        TrainProgram._save = real_save
        saved = estimator.latest_checkpoint()
        parameters = sum(value.numel() for value in Checkpoint.load(saved).part("model").values())
        size = sum(os.path.getsize(os.path.join(saved, name)) for name in os.listdir(saved)) \
            if os.path.isdir(saved) else os.path.getsize(saved)
        started = time.perf_counter()
        estimator.train(lambda params: data, steps=1)  # restores, one step, saves
        timing["restore_step_save_seconds"] = time.perf_counter() - started
    return {**timing, "parameters_millions": parameters / 1e6, "checkpoint_mb": size / 2**20}


def _fresh(kind: str, sharding: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="4")
    return run_fresh(__file__, ["--one", kind, sharding, "--width", str(args.width),
                                "--steps", str(args.steps),
                                "--params-millions", str(args.params_millions)],
                     env, f"{kind}/{sharding}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--params-millions", type=int, default=100)
    parser.add_argument("--only", choices=("step", "checkpoint"), default=None)
    parser.add_argument("--one", nargs=2, metavar=("KIND", "SHARDING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, sharding = args.one
        result = measure_step(sharding, args.width, args.steps) if kind == "step" else \
            measure_checkpoint(sharding, args.params_millions)
        print(json.dumps(result))
        return
    for kind in ("step", "checkpoint"):
        if args.only not in (None, kind):
            continue
        runs: dict[str, list[dict]] = {"replicated": [], "fsdp": []}
        for _ in range(args.repeats):
            for sharding in runs:  # alternating, each run in a fresh process
                runs[sharding].append(_fresh(kind, sharding, args))
        print(f"\n{kind} (medians of {args.repeats} fresh-process runs, min-max)")
        for sharding, results in runs.items():
            line = ", ".join(f"{key} {summary([run[key] for run in results])}"
                             for key in results[0])
            print(f"  {sharding:10s} {line}")
        if kind == "step":
            ratios = [fsdp["steps_per_sec"] / replicated["steps_per_sec"]
                      for replicated, fsdp in zip(runs["replicated"], runs["fsdp"], strict=True)]
            print(f"  fsdp / replicated steps/s: {summary(ratios)}")


if __name__ == "__main__":
    main()
