"""Checkpoints in a bucket against a local model_dir, for a ~100M-parameter model: save and
restore time, and how much training slows while a checkpoint uploads in the background.

The bucket is an S3 server on localhost (moto's server mode, started by this script in its own
process): its bandwidth and CPU are this machine's, not a cloud store's, and it shares the two
cores with training, so the slowdown measured here is an upper bound of what a remote store
costs. Every measurement runs in a fresh process, local and bucket alternating; medians with
min-max.

  - save: TrainProgram._save, the call the training loop waits for (the capture from the device
    and the write: for the bucket, the write to a local staging file; the upload goes on in the
    background), and the time until the checkpoint is published (uploaded, index replaced).
  - restore: reading the latest checkpoint's model into host memory in a new process (for the
    bucket: the download, checked against the index's digest, then the read).
  - slowdown: the model trains with windows of one step and a checkpoint every `--every`
    steps; the mean step time of the steps that ran while an upload was in flight over that of
    the steps that ran with none, minus one.

    PJRT_DEVICE=CPU python benchmarks/bucket_storage.py [--repeats 5] [--params-millions 100]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from fresh_runs import run_fresh, summary

WIDTH = 2048


def measure(where: str, millions: int, steps: int, every: int) -> dict:
    """One process: train `steps` steps with a checkpoint every `every` steps into a local
    folder or the bucket; time the saves, the publication, the steps and a restore."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    from torch_tpu_estimator import Hook, RunConfig, TPUConfig, TPUEstimator, TPUEstimatorSpec
    from torch_tpu_estimator.modes.train import TrainProgram
    from torch_tpu_estimator.state import stores
    from torch_tpu_estimator.state.schema import Checkpoint
    from torch_tpu_estimator.state.uploads import BackgroundPublisher

    layers = max(1, round(millions * 1e6 / (WIDTH * WIDTH)))

    def big(params):
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)],
                                   torch.nn.Linear(WIDTH, 8))

    def model_fn(features, labels, mode, model):
        return TPUEstimatorSpec(mode, loss=F.cross_entropy(model(features), labels))

    saves, uploads, steps_at = [], [], []
    real_save, real_run = TrainProgram._save, BackgroundPublisher._run

    def timed_save(program, hooks):
        started = time.perf_counter()
        real_save(program, hooks)
        saves.append((started, time.perf_counter()))

    def timed_run(publisher, publish):
        started = time.perf_counter()
        real_run(publisher, publish)
        uploads.append((started, time.perf_counter()))

    class StepTimes(Hook):
        def after_window(self, context, window):
            steps_at.append(time.perf_counter())

    TrainProgram._save, BackgroundPublisher._run = timed_save, timed_run
    data = TensorDataset(torch.randn(16, WIDTH), torch.randint(0, 8, (16,)))
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = os.path.join(scratch, "run") if where == "local" else \
            f"s3://bench/run-{os.getpid()}"
        estimator = TPUEstimator(
            model_fn=model_fn, model_init_fn=big, model_dir=model_dir, train_batch_size=16,
            optimizer_fn=lambda model, params: torch.optim.SGD(model.parameters(), lr=1e-4),
            config=RunConfig(save_checkpoints_steps=every, log_step_count_steps=None,
                             save_summary_steps=None,
                             tpu_config=TPUConfig(iterations_per_loop=1)))
        estimator.train(lambda params: data, steps=2)  # compiles
        saves.clear()
        uploads.clear()
        started = time.perf_counter()
        estimator.train(lambda params: data, steps=steps, hooks=[StepTimes()])
        train_seconds = time.perf_counter() - started
        latest = estimator.latest_checkpoint()
        stores._OBJECT_STORES.clear()  # no local copy kept: a restore as in a new process
        started = time.perf_counter()
        model = {name: value.clone() for name, value in  # read, not only mapped
                 Checkpoint.load(latest).part("model").items()}
        restore_seconds = time.perf_counter() - started
    parameters = sum(value.numel() for value in model.values())
    steps_run = list(zip(steps_at, steps_at[1:], strict=False))  # (start, end) of each step

    def overlaps(step: tuple[float, float], intervals: list[tuple[float, float]]) -> bool:
        return any(start < step[1] and step[0] < stop for start, stop in intervals)

    timed = [step for step in steps_run if not overlaps(step, saves)]  # saves: timed apart
    uploading = [end - start for start, end in timed if overlaps((start, end), uploads)]
    idle = [end - start for start, end in timed if not overlaps((start, end), uploads)]
    return {"parameters_millions": parameters / 1e6,
            "save_seconds": statistics.median([stop - start for start, stop in saves]),
            "published_seconds": statistics.median([stop - start for start, stop in uploads])
            if uploads else None,
            "restore_seconds": restore_seconds, "train_seconds": train_seconds,
            "step_seconds_idle": statistics.mean(idle) if idle else None,
            "step_seconds_uploading": statistics.mean(uploading) if uploading else None,
            "steps_uploading": len(uploading)}


def _fresh(where: str, args: argparse.Namespace, endpoint: str) -> dict:
    env = dict(os.environ, PJRT_DEVICE="CPU", AWS_ENDPOINT_URL=endpoint,
               AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
               AWS_DEFAULT_REGION="us-east-1")
    return run_fresh(__file__, ["--one", where, "--params-millions", str(args.params_millions),
                                "--steps", str(args.steps), "--every", str(args.every)],
                     env, where)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--params-millions", type=int, default=100)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--one", choices=("local", "bucket"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.params_millions, args.steps, args.every)))
        return
    import logging

    import fsspec
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir("bench")
    runs: dict[str, list[dict]] = {"local": [], "bucket": []}
    try:
        for round_ in range(args.repeats):
            for where in runs:  # alternating, each run in a fresh process
                runs[where].append(_fresh(where, args, endpoint))
            print(f"round {round_ + 1}: " + ", ".join(
                f"{where} save {runs[where][-1]['save_seconds']:.2f} s" for where in runs),
                flush=True)
    finally:
        server.stop()
    print(f"\n{runs['local'][0]['parameters_millions']:.0f}M parameters (SGD), "
          f"{args.steps} steps, a checkpoint every {args.every}; medians of {args.repeats} "
          "fresh-process runs, min-max")
    for where, results in runs.items():
        keys = [key for key in results[0] if key != "parameters_millions"
                and all(run[key] is not None for run in results)]
        print(f"  {where:7s} " + ", ".join(f"{key} {summary([run[key] for run in results])}"
                                           for key in keys))
    slowdowns = [run["step_seconds_uploading"] / run["step_seconds_idle"] - 1
                 for run in runs["bucket"] if run["step_seconds_uploading"]]
    if slowdowns:
        print(f"  training slowdown while an upload is in flight: {summary(slowdowns)}")


if __name__ == "__main__":
    main()
