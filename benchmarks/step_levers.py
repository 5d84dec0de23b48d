"""Issue 16's speed levers, each measured alone on one steady-state Adam training step on XLA.

Every lever trains the same model (the MLP or the small CNN of estimator_vs_hand_loop.py, Adam
lr 1e-3, batch 64) on 20 batches already on the device, for `--steps` steps after a warm-up; the
clock stops after one transfer of every step's loss and the device is idle. Each run is a fresh
process; the levers alternate round after round (the order rotates), and the table gives each
lever's steps/s (median, min-max), its ratio to the plain loop (median of the per-round ratios),
its compilations (warm-up / timed) and how far its losses are from the plain loop's.

- plain: torch.optim.Adam, one torch_xla.sync() per step: the baseline.
- flat: the same torch Adam stepped by torch_tpu_estimator's FlatAdam (kept: the estimator's
  default, UpdateConfig.flat_optimizer).
- syncfree: torch_xla.amp.syncfree.Adam with a zero found_inf (dropped: not bit for bit).
- nofunc: XLA_DISABLE_FUNCTIONALIZATION=1 (dropped: process-wide, and it silently breaks
  parameters that are views, as the flat optimizer's are).
- compiled_forward / compiled_optimizer: torch.compile(backend="openxla") of forward + loss, or
  of optimizer.step (dropped: no gain, more graphs).
- grouped: 10 plain steps traced into one program, one sync per 10 steps (as evaluate and
  predict do with TPUConfig.inference_steps_per_execution; dropped for training: slower, and
  the losses round differently from one step per program).
- scan: a window of 20 steps as one XLA While loop (torch_xla.experimental.scan's core) of a
  functional step (dropped: convolutions in a While body run slower on XLA:CPU).
- replay: one functional step traced once, its compiled program replayed through private
  torch_xla._XLAC calls (left for when torch_xla offers it publicly).

    PJRT_DEVICE=CPU python benchmarks/step_levers.py [--rounds 5] [--models mlp,cnn]
        [--levers plain,flat,...] [--steps 300]
    PJRT_DEVICE=CPU python benchmarks/step_levers.py --one mlp flat [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

LEVERS = ("plain", "flat", "syncfree", "nofunc", "compiled_forward", "compiled_optimizer",
          "grouped", "scan", "replay")
BATCHES = 20
GROUPED_STEPS = 10
LR, BETA1, BETA2, EPS = 1e-3, 0.9, 0.999, 1e-8
Step = Callable[[int], Any]


def functional_adam(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list,
                    step: Any) -> tuple[list, list, list, Any]:
    """Adam out of place with the step count a device tensor (as capturable Adam computes it),
    so that one traced step serves every step."""
    step = step + 1
    step_size = LR / (1 - BETA1**step)
    bias_correction2_sqrt = (1 - BETA2**step).sqrt()
    new_exp_avgs = [m.lerp(g, 1 - BETA1) for m, g in zip(exp_avgs, grads, strict=True)]
    new_exp_avg_sqs = [v * BETA2 + (1 - BETA2) * g * g
                       for v, g in zip(exp_avg_sqs, grads, strict=True)]
    new_params = [p - step_size * m / (v.sqrt() / bias_correction2_sqrt + EPS)
                  for p, m, v in zip(params, new_exp_avgs, new_exp_avg_sqs, strict=True)]
    return new_params, new_exp_avgs, new_exp_avg_sqs, step


def optimizer_steps(lever: str, model: Any, features: list, labels: list) -> tuple[Step, int]:
    """A training step per call for the levers that keep torch's module and optimizer."""
    import torch
    import torch.nn.functional as F
    import torch_xla

    from torch_tpu_estimator.step.flat_update import FlatAdam

    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    optimizer_step = optimizer.step
    if lever == "flat":
        optimizer_step = FlatAdam(optimizer).step
    elif lever == "syncfree":
        from torch_xla.amp import syncfree

        optimizer = syncfree.Adam(model.parameters(), lr=LR)
        found_inf = torch.zeros((), device=torch_xla.device())
        optimizer_step = lambda: optimizer.step(found_inf=found_inf)  # noqa: E731
    elif lever == "compiled_optimizer":
        optimizer_step = torch.compile(optimizer.step, backend="openxla")

    def forward_loss(x: Any, y: Any) -> Any:
        return F.cross_entropy(model(x), y)

    if lever == "compiled_forward":
        forward_loss = torch.compile(forward_loss, backend="openxla")

    steps_per_sync = GROUPED_STEPS if lever == "grouped" else 1

    def step(index: int) -> Any:
        losses = []
        for batch in range(index, index + steps_per_sync):
            optimizer.zero_grad(set_to_none=True)
            loss = forward_loss(features[batch % BATCHES], labels[batch % BATCHES])
            loss.backward()
            optimizer_step()
            losses.append(loss.detach())
        losses = torch.stack(losses)
        torch_xla.sync()
        return losses

    return step, steps_per_sync


def functional_steps(lever: str, model: Any, features: list, labels: list) -> tuple[Step, int]:
    """The whole step as a function of (weights, moments, step count, batch): a window of them
    in one While loop (scan), or one traced step's program replayed (replay)."""
    import torch
    import torch.nn.functional as F
    import torch_xla

    names = [name for name, _ in model.named_parameters()]
    weights = [parameter.detach().clone() for parameter in model.parameters()]
    state = [*weights, *[torch.zeros_like(w) for w in weights],
             *[torch.zeros_like(w) for w in weights], torch.zeros((), device=torch_xla.device())]
    count = len(names)

    def train_step(carry: list, x: Any, y: Any) -> tuple[list, Any]:
        params, exp_avgs = carry[:count], carry[count:2 * count]
        exp_avg_sqs, step = carry[2 * count:3 * count], carry[3 * count]
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_() for p in params]
            logits = torch.func.functional_call(model, dict(zip(names, leaves, strict=True)), (x,))
            loss = F.cross_entropy(logits, y)
            grads = torch.autograd.grad(loss, leaves)
        new = functional_adam(params, list(grads), exp_avgs, exp_avg_sqs, step)
        return [*new[0], *new[1], *new[2], new[3]], loss.detach()

    if lever == "scan":
        from torch_xla.experimental.scan import _scan_impl_flat

        stacked = torch.stack(features), torch.stack(labels)
        torch_xla.sync()  # the stacked batches and the state become device data once

        def window(index: int) -> Any:
            def body(carry: list, batch: list) -> tuple[list, list]:
                carry, loss = train_step(carry, *batch)
                return carry, [loss]

            new_state, (losses,) = _scan_impl_flat(body, state, list(stacked))
            state[:] = new_state
            torch_xla.sync()
            return losses

        return window, BATCHES

    xlac = torch_xla._XLAC
    torch_xla.sync()
    carry, loss = train_step(state, features[0], labels[0])
    outputs = [*carry, loss]
    inputs = [*state, features[0], labels[0]]
    ids, values = xlac._get_tensors_xla_device_data_node(outputs)
    graph = xlac._get_graph_hash(outputs)
    xlac._xla_warm_up_cache(outputs, [])
    position = {xlac._xla_get_tensor_id(tensor): index for index, tensor in enumerate(inputs)}
    arguments = [(position.get(tensor_id), value) for tensor_id, value in zip(ids, values,
                                                                               strict=True)]
    xlac._clear_pending_irs(str(torch_xla.device()))

    def replayed(index: int) -> Any:
        current = [*state, features[index % BATCHES], labels[index % BATCHES]]
        results = xlac._run_cached_graph(graph, [current[at] if at is not None else value
                                                 for at, value in arguments])
        state[:] = results[:-1]
        return results[-1]

    return replayed, 1


def one_run(model_name: str, lever: str, steps: int, warmup: int, profile: bool) -> dict:
    """Times `steps` steady-state steps of one lever in this process."""
    if lever == "nofunc":
        os.environ["XLA_DISABLE_FUNCTIONALIZATION"] = "1"
    import torch
    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.debug.metrics as met
    from estimator_vs_hand_loop import make_cnn, make_mlp

    torch.manual_seed(0)
    model = (make_mlp() if model_name == "mlp" else make_cnn()).to(torch_xla.device())
    shape = (64,) if model_name == "mlp" else (3, 16, 16)
    generator = torch.Generator().manual_seed(0)
    host = torch.randn(BATCHES, 64, *shape, generator=generator)
    features = [batch.to(torch_xla.device()) for batch in host]
    labels = [batch.flatten(1)[:, :10].argmax(1).to(torch_xla.device()) for batch in host]
    build = functional_steps if lever in ("scan", "replay") else optimizer_steps
    step, per_call = build(lever, model, features, labels)

    def run(first: int, count: int) -> list:
        losses = [step(index) for index in range(first, first + count, per_call)]
        return [float(loss) for loss in torch.cat(
            [loss.reshape(-1) for loss in xm._maybe_convert_to_cpu(losses)])]

    warm_losses = run(0, warmup)
    xm.wait_device_ops()
    compiles_warmup = met.metric_data("CompileTime")[0]
    profiler = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    losses = run(warmup, steps)
    xm.wait_device_ops()
    seconds = time.perf_counter() - started
    if profiler:
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(20)
    return {"model": model_name, "lever": lever, "steps_per_sec": steps / seconds,
            "compiles": [compiles_warmup, met.metric_data("CompileTime")[0] - compiles_warmup],
            "losses": warm_losses + losses}


def campaign(args: argparse.Namespace) -> None:
    """Every (model, lever) once per round, each in a fresh process, the order rotating."""
    runs = [(model, lever) for model in args.models for lever in args.levers]
    results: dict[tuple[str, str], list[dict]] = {run: [] for run in runs}
    for round_index in range(args.rounds):
        shift = round_index % len(runs)
        for model, lever in runs[shift:] + runs[:shift]:
            done = subprocess.run(
                [sys.executable, __file__, "--one", model, lever, "--steps", str(args.steps)],
                env=dict(os.environ, PJRT_DEVICE="CPU"), capture_output=True, text=True,
                timeout=1800, check=False)
            if done.returncode:
                print(f"{model} {lever}: failed: {done.stderr[-400:]}", flush=True)
                continue
            result = json.loads(done.stdout.splitlines()[-1])
            result["round"] = round_index
            results[model, lever].append(result)
            print(f"round {round_index + 1}: {model} {lever} {result['steps_per_sec']:.1f} "
                  "steps/s", flush=True)
    print("\n| model | lever | steps/s, median (min-max) | / plain, median (min-max) | "
          "compiles warm-up / timed | largest loss difference from plain |")
    print("|---|---|---:|---:|---:|---:|")
    for model, lever in runs:
        mine, plain = results[model, lever], {
            result["round"]: result for result in results.get((model, "plain"), [])}
        if not mine:
            continue
        rates = [result["steps_per_sec"] for result in mine]
        ratios = [result["steps_per_sec"] / plain[result["round"]]["steps_per_sec"]
                  for result in mine if result["round"] in plain]
        differences = [max(abs(a - b) for a, b in zip(result["losses"],
                                                     plain[result["round"]]["losses"],
                                                     strict=True))
                       for result in mine if result["round"] in plain]
        ratio = (f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
                 if ratios else "-")
        difference = f"{max(differences):.1e}" if differences else "-"
        print(f"| {model} | {lever} | {statistics.median(rates):.1f} ({min(rates):.1f}-"
              f"{max(rates):.1f}) | {ratio} | {mine[0]['compiles'][0]} / "
              f"{mine[0]['compiles'][1]} | {difference} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--levers", default=",".join(LEVERS))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "LEVER"),
                        help="time one lever in this process and print its result as JSON")
    parser.add_argument("--profile", action="store_true", help="with --one: cProfile to stderr")
    args = parser.parse_args()
    args.models, args.levers = args.models.split(","), args.levers.split(",")
    for lever in args.levers + ([args.one[1]] if args.one else []):
        if lever not in LEVERS:
            parser.error(f"unknown lever {lever!r}; choose from {', '.join(LEVERS)}")
    if args.one:
        print(json.dumps(one_run(*args.one, args.steps, BATCHES, args.profile)))
    else:
        campaign(args)


if __name__ == "__main__":
    main()
