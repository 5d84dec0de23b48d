"""The tensors of a sharded checkpoint, through torch.distributed.checkpoint (DCP).

A sharded checkpoint is a directory: DCP's data files, in which every device's shard of every
tensor is written from the device as it is (nothing gathers a whole parameter on the host),
and `tensors.json`, DCP's metadata. DCP writes its metadata with pickle and reads it back with
pickle.load, which would let a crafted checkpoint run code; here it is written and read as JSON
instead, every file name in it checked to stay inside the directory. Only tensors go through
DCP, so its only other reader is torch.load(weights_only=True).

Reading reshards: a checkpoint written on one mesh loads onto another (4 devices, 2, 1), onto
an XLA device without SPMD, or into CPU tensors (plain PyTorch, export, inspect).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from ..common.paths import plain_name, regular_file

METADATA_NAME = "tensors.json"
FORMAT = "torch_tpu_estimator.sharded/1"


def _dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype


def _sizes(values: Any) -> torch.Size:
    if not isinstance(values, list) or not all(
            isinstance(value, int) and not isinstance(value, bool) and value >= 0
            for value in values):
        raise ValueError(f"{values!r} is not a list of sizes")
    return torch.Size(values)


def metadata_to_json(metadata: Metadata) -> str:
    tensors = {}
    for name, stored in metadata.state_dict_metadata.items():
        if not isinstance(stored, TensorStorageMetadata):
            raise TypeError(f"{name!r} is not a tensor: sharded checkpoints hold tensors only")
        tensors[name] = {"dtype": str(stored.properties.dtype).removeprefix("torch."),
                         "size": list(stored.size),
                         "chunks": [{"offsets": list(chunk.offsets), "sizes": list(chunk.sizes)}
                                    for chunk in stored.chunks]}
    storage = [{"fqn": index.fqn, "offset": list(index.offset or []), "index": index.index,
                "file": info.relative_path, "start": info.offset, "length": info.length,
                "transforms": list(info.transform_descriptors or [])}
               for index, info in metadata.storage_data.items()]
    return json.dumps({"format": FORMAT, "version": metadata.version, "tensors": tensors,
                       "storage": storage})


def metadata_from_json(text: str, source: str) -> Metadata:
    """DCP's Metadata from tensors.json, every field checked."""
    try:
        fields = json.loads(text)
        if not isinstance(fields, dict) or fields.get("format") != FORMAT:
            raise ValueError("unknown format")
        state = {}
        for name, stored in fields["tensors"].items():
            chunks = [ChunkStorageMetadata(_sizes(chunk["offsets"]), _sizes(chunk["sizes"]))
                      for chunk in stored["chunks"]]
            state[name] = TensorStorageMetadata(TensorProperties(dtype=_dtype(stored["dtype"])),
                                                _sizes(stored["size"]), chunks)
        storage = {}
        for entry in fields["storage"]:
            index = MetadataIndex(entry["fqn"], _sizes(entry["offset"]), entry["index"])
            transforms = entry["transforms"]
            if not all(isinstance(value, int) and value >= 0
                       for value in (entry["start"], entry["length"])) or not isinstance(
                    transforms, list):
                raise ValueError(f"storage entry {entry!r} is malformed")
            storage[index] = _StorageInfo(plain_name(entry["file"], source), entry["start"],
                                          entry["length"], transforms or None)
        return Metadata(state_dict_metadata=state, planner_data={name: (name,) for name in state},
                        storage_data=storage, storage_meta=StorageMeta(),
                        version=fields.get("version"))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{source} is not a sharded checkpoint's metadata ({FORMAT}): "
                         f"{error}") from None


class _Writer(dcp.FileSystemWriter):
    """DCP's file writer, its metadata written as JSON."""

    def finish(self, metadata: Metadata, results: list[list[Any]]) -> None:
        metadata.storage_data = {result.index: result.storage_data
                                 for per_rank in results for result in per_rank}
        metadata.version = metadata.version or "1.0.0"
        with open(os.path.join(self.path, METADATA_NAME), "w") as handle:
            handle.write(metadata_to_json(metadata))
            handle.flush()
            os.fsync(handle.fileno())


class _Reader(dcp.FileSystemReader):
    """DCP's file reader, its metadata read from JSON (never unpickled), every file it names a
    regular file inside the checkpoint (a symbolic link could lead anywhere)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        what = f"sharded checkpoint {self.path}"
        path = regular_file(str(self.path), METADATA_NAME, what)
        with open(path) as handle:
            metadata = metadata_from_json(handle.read(), path)
        for info in metadata.storage_data.values():
            regular_file(str(self.path), info.relative_path, what)
        return metadata


def _planners(tensors: Mapping[str, torch.Tensor]) -> tuple[Any, Any]:
    """SPMD-aware planners when the tensors live on XLA devices, DCP's own otherwise."""
    if any(tensor.device.type == "xla" for tensor in tensors.values()):
        from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner

        from ..runtime import xla_compat

        return xla_compat.spmd_save_planner(), SPMDLoadPlanner()
    return dcp.DefaultSavePlanner(), dcp.DefaultLoadPlanner()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns that it runs without a process group (one process here, on purpose), and
    torch_xla's planners about deprecated storage calls: neither is the user's business."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        warnings.filterwarnings("ignore", message=".*set_up_planner has been updated.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="torch_xla.*")
        yield


def write(directory: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Writes `tensors` (names -> tensors, sharded or not, on any device) into `directory`:
    each device's shards straight from the device, one data file per process."""
    with _quiet():
        dcp.save(dict(tensors), storage_writer=_Writer(directory, sync_files=True),
                 planner=_planners(tensors)[0], no_dist=True)


def read_into(directory: str, targets: Mapping[str, torch.Tensor]) -> None:
    """Loads the checkpoint's tensors into `targets` in place, resharding to their layout
    (XLA sharded tensors load only their own shards). A file that cannot be read (truncated,
    damaged) or tensors that do not fit are a ValueError naming the checkpoint; DCP's own
    CheckpointException derives from BaseException and would pass `except Exception`."""
    try:
        with _quiet():
            dcp.load(dict(targets), storage_reader=_Reader(directory),
                     planner=_planners(targets)[1], no_dist=True)
    except CheckpointException as error:
        causes = "; ".join(str(getattr(failure, "exc", failure)).splitlines()[0]
                           for failure in error.failures.values())
        raise ValueError(f"sharded checkpoint {directory!r} cannot be read ({causes})") from None


def tensor_specs(directory: str) -> dict[str, tuple[torch.dtype, torch.Size]]:
    """Every tensor's dtype and full shape, from the metadata alone."""
    metadata = _Reader(directory).read_metadata()
    return {name: (stored.properties.dtype, stored.size)
            for name, stored in metadata.state_dict_metadata.items()}


def read_full(directory: str, prefix: str) -> dict[str, torch.Tensor]:
    """The whole tensors whose names start with `prefix`, in CPU memory, keyed without it."""
    targets = {name: torch.empty(size, dtype=dtype)
               for name, (dtype, size) in tensor_specs(directory).items()
               if name.startswith(prefix)}
    if targets:
        read_into(directory, targets)
    return {name[len(prefix):]: tensor for name, tensor in targets.items()}
