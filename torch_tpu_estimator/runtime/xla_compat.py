"""Every private or patched torch_xla use, in one place, checked against the pinned release.

The estimator relies on a few torch_xla internals that have no public equivalent in 2.9: reading
an exporter's HLO as it lowers, running an HLO computation inside the lazy graph, converting
device trees to CPU in one transfer, compiling a traced graph and running it again on new
inputs, telling what read the device while a step was traced (replay.py), and, to replay
training (train_replay.py), matching a graph's inputs to tensors by buffer, giving a tensor a
program's result in place, and the device RNG seed. Each is wrapped
here, so that a new torch_xla release is checked and followed in this file only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch
import torch_xla
import torch_xla.core.xla_model as xm
import torch_xla.debug.metrics as met

logger = logging.getLogger("torch_tpu_estimator")

TESTED_RELEASE = "2.9"  # setup.py pins torch-xla==2.9.0

if not torch_xla.__version__.startswith(TESTED_RELEASE):
    logger.warning("torch_xla %s is installed; torch_tpu_estimator is tested with %s.x and uses "
                   "some of its internals (xla_compat.py): expect breakage",
                   torch_xla.__version__, TESTED_RELEASE)


def expected_tpu_devices() -> int:
    """TPU chips this host will drive, found without starting the XLA runtime."""
    from torch_xla._internal import tpu

    return tpu.num_expected_global_devices()


def to_cpu(tree: Any) -> Any:
    """Every XLA tensor of a nested structure copied to the host in one transfer."""
    return xm._maybe_convert_to_cpu(tree)


@contextlib.contextmanager
def capturing_hlo() -> Iterator[list[bytes]]:
    """While entered, each StableHLO lowering by torch_xla also appends the HLO module of the
    same traced graph to the yielded list (exported_program_to_stablehlo keeps its traced
    tensors to itself; the HLO is read from them as it asks for their StableHLO)."""
    captured: list[bytes] = []
    to_stablehlo = xm.get_stablehlo_bytecode

    def stablehlo_and_hlo(tensors: list[torch.Tensor]) -> bytes:
        captured.append(torch_xla._XLAC._get_xla_tensors_hlo_proto(tensors))
        return to_stablehlo(tensors)

    with mock.patch.object(xm, "get_stablehlo_bytecode", stablehlo_and_hlo):
        yield captured


def bundle_of(program: Any) -> Any:
    """The StableHLOModelBundle inside a StableHLOGraphModule."""
    return program._bundle


def run_computation(op_name: str, arguments: list[torch.Tensor], computation: Any
                    ) -> list[torch.Tensor]:
    """Runs an HLO computation on device tensors as one op of the lazy graph, so it is
    compiled once per shape and cached like any traced graph."""
    return list(torch_xla._XLAC._xla_user_computation(op_name, arguments, computation))


def tf_function_of(function: Any, bundle: Any) -> Any:
    """A StableHLO function as a TF function calling XlaCallModule (tf_saved_model_integration)."""
    from torch_xla.tf_saved_model_integration import _wrap_as_tf_func

    return _wrap_as_tf_func(function, bundle)


def tf_variable_name(name: str) -> str:
    """A weight's name as torch_xla's SavedModel writer names its TF variable."""
    from torch_xla.tf_saved_model_integration import _mangle_tf_root_scope_name

    return _mangle_tf_root_scope_name(name)


def sharding_of(tensor: torch.Tensor) -> str:
    """An XLA tensor's sharding annotation as torch_xla prints it ("" when it has none)."""
    return torch_xla._XLAC._get_xla_sharding_spec(tensor)


def local_shard_shapes(tensor: torch.Tensor) -> list[tuple[int, ...]]:
    """The shape of each device's shard of an XLA tensor (the whole shape on each device for
    one that is not sharded)."""
    if not sharding_of(tensor):
        return [tuple(tensor.shape)]
    return [tuple(shard.shape) for shard, _ in torch_xla._XLAC._get_local_shards([tensor])[0]]


def spmd_save_planner() -> Any:
    """torch_xla's SPMDSavePlanner, writing one copy of each shard. A parameter replicated
    over part of the mesh (FSDP on a data x fsdp mesh) has several devices holding the same
    shard; the planner lists them all, and DCP's dedup_tensors (torch 2.9) then drops every
    copy, leaving the tensor out of the checkpoint. Keeping the first copy here avoids that."""
    from torch_xla.experimental.distributed_checkpoint import SPMDSavePlanner

    class OneCopyPerShard(SPMDSavePlanner):
        def create_local_plan(self) -> Any:
            plan = super().create_local_plan()
            seen, items = set(), []
            for item in plan.items:
                key = (item.index.fqn, tuple(item.index.offset or ()))
                if key not in seen:
                    seen.add(key)
                    items.append(item)
            return dataclasses.replace(plan, items=items)

    return OneCopyPerShard()


def tensor_id(tensor: torch.Tensor) -> int:
    """The id torch_xla gives an XLA tensor, the one graph_inputs names device data by."""
    return torch_xla._XLAC._xla_get_tensor_id(tensor)


def pending(tensors: list[torch.Tensor]) -> list[bool]:
    """For each XLA tensor, whether it has traced operations not yet run (pending IR)."""
    return list(torch_xla._XLAC._check_tensor_need_materialization(tensors))


def materialize(tensors: list[torch.Tensor]) -> None:
    """Runs the pending operations of `tensors` alone; unlike torch_xla.sync() it ends no step,
    so the device RNG seed does not advance."""
    torch_xla._XLAC._xla_sync_multi(tensors, devices=[], wait=True, sync_xla_data=True)


def graph_inputs(outputs: list[torch.Tensor]) -> tuple[list[int], list[torch.Tensor]]:
    """The device data the pending graph of `outputs` reads, in its parameter order: each
    one's tensor id and the data itself."""
    ids, values = torch_xla._XLAC._get_tensors_xla_device_data_node(outputs)
    return list(ids), list(values)


def data_handles(tensors: list[torch.Tensor]) -> list[int]:
    """The device buffer each XLA tensor (not pending) holds, as an opaque handle: a graph that
    reads the tensor reads the same buffer (graph_inputs' values), whatever ids say (on an SPMD
    mesh a graph names a tensor's data by an id of its own). Waits for the device first: a
    buffer still being computed has no handle yet (asking crashed the process on a mesh)."""
    xm.wait_device_ops()
    return list(torch_xla._XLAC._get_tensors_handle(tensors))


def assign(tensor: torch.Tensor, value: torch.Tensor) -> None:
    """Makes `value`'s device data `tensor`'s, with no pending operation: the tensor object
    stays (modules and optimizers hold it), and its views (functionalization's) follow it.
    (torch_xla's `_replace_xla_tensor` left a view such as `weight.t()` reading the old value;
    `copy_` leaves pending work, which an SPMD program refuses as its input.)"""
    torch._functionalize_replace(tensor, torch._from_functional_tensor(value))
    torch._functionalize_commit_update(tensor)


def rng_seed_tensor(device: torch.device) -> torch.Tensor:
    """The device RNG seed a graph traced now would read, as a device tensor."""
    return torch_xla._XLAC._get_base_seed_as_tensor(str(device))


def next_rng_seed(seed: int) -> int:
    """The device RNG seed after a graph cut (mark_step) from `seed`: torch's lazy graph
    executor's formula, which torch_xla's dynamo bridge repeats."""
    return (1012031 + seed * 7012063) % 2**64


def rng_seed_id() -> int:
    """The tensor id of the device RNG seed when a graph reads it (random draws)."""
    return torch_xla._XLAC._get_seed_info_id()


def compile_graph(outputs: list[torch.Tensor]) -> str:
    """Compiles the pending graph of `outputs` into torch_xla's cache without running it and
    returns the graph's hash for run_compiled. Unlike torch_xla's dynamo bridge it leaves every
    tensor's pending operations in place: a tensor the caller or model_fn still holds keeps
    its value (the next graph cut runs it), and the traced outputs, once dropped, cost nothing."""
    graph_hash = torch_xla._XLAC._get_graph_hash(outputs)
    torch_xla._XLAC._xla_warm_up_cache(outputs, [])
    return graph_hash


_TRANSFERS = "device-to-host transfers"


def host_reads() -> dict[str, int]:
    """How often this process has read the device so far: device-to-host transfers, and each
    op torch_xla ran on the host because XLA cannot (its `aten::<op>` counters), by name."""
    counts = {name: met.counter_value(name) for name in met.counter_names()
              if name.startswith("aten::")}
    counts[_TRANSFERS] = (met.metric_data("TransferFromDeviceTime") or (0,))[0]
    return counts


def host_reads_since(before: dict[str, int]) -> str | None:
    """What read the device since `before` (host_reads()), in words; None if nothing did."""
    grown = {name: count - before.get(name, 0) for name, count in host_reads().items()
             if count > before.get(name, 0)}
    if not grown:
        return None
    ops = [name for name in sorted(grown) if name != _TRANSFERS]
    words = [".item(), bool(), int() or float() of a tensor" if name == "aten::_local_scalar_dense"
             else f"{name} (run on the host)" for name in ops]
    if not ops:
        words = [".tolist(), .cpu(), .numpy() or printing a device tensor"]
    return f"{', '.join(words)}; {grown.get(_TRANSFERS, 0)} device-to-host transfer(s)"


def run_compiled(graph_hash: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Runs a graph compile_graph cached, on new inputs in its parameter order; its outputs
    come back as device tensors, without any tracing."""
    return list(torch_xla._XLAC._run_cached_graph(graph_hash, inputs))
