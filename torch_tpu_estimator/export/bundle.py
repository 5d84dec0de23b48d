"""Reading an export's StableHLO bundle without trusting it.

torch_xla 2.9's `StableHLOGraphModule.load` reads the bundle's arrays with
`np.load(allow_pickle=True)`, so a crafted export would run code as it loads. This reader
builds the same `StableHLOModelBundle` from plain `.npy` arrays only (never unpickling),
regular files only (a symlink could lead out of the folder), and names the file it refuses.
torch_xla is imported only to build the bundle, so `inspect` can read headers without it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from ..common.paths import is_number_name

if TYPE_CHECKING:
    from torch_xla import stablehlo

DATA_DIR, CONSTANTS_DIR, FUNCTIONS_DIR = "data", "constants", "functions"


def regular_files(directory: str) -> Iterator[tuple[str, str]]:
    """(name, path) of each file in `directory`, sorted; anything but a regular file (a
    symlink, a folder, a device) is a ValueError naming it. A missing folder holds nothing:
    git and object stores keep no empty folders, so an export copied through them lacks them."""
    if not os.path.lexists(directory):
        return
    for entry in sorted(os.scandir(directory), key=lambda entry: entry.name):
        if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
            raise ValueError(f"{entry.path} is not a regular file: an export holds plain files "
                             "only (refused, nothing was loaded)")
        yield entry.name, entry.path


def load_array(path: str) -> np.ndarray:
    """A `.npy` array read without unpickling: an object array or a pickle is a ValueError."""
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as error:
        raise ValueError(f"{path} holds pickled data (an object array): loading it could run "
                         f"code, so it is refused ({error})") from None
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{path} is not a single .npy array")
    return array


def read_array_header(path: str) -> tuple[str, tuple[int, ...]]:
    """The dtype and shape of a `.npy` file; its data is mapped, not read, and never unpickled."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as error:
        raise ValueError(f"{path} is not a plain .npy array (an object array or a pickle is "
                         f"refused): {error}") from None
    return str(array.dtype), tuple(array.shape)


def load_bundle(directory: str) -> stablehlo.StableHLOModelBundle:
    """The bundle torch_xla wrote to `directory` (StableHLOGraphModule.save), read safely."""
    from torch_xla import stablehlo

    state_dict = {name: load_array(path)
                  for name, path in regular_files(os.path.join(directory, DATA_DIR))}
    constants = []
    for name, path in regular_files(os.path.join(directory, CONSTANTS_DIR)):
        if not is_number_name(name):
            raise ValueError(f"{path}: constants are named by their position (digits only)")
        constants.append((int(name), load_array(path)))
    metas, bytecodes, texts = [], {}, {}
    for name, path in regular_files(os.path.join(directory, FUNCTIONS_DIR)):
        stem, extension = os.path.splitext(name)
        if extension == ".meta":
            with open(path) as handle:
                metas.append(json.load(handle, object_hook=stablehlo.stablehlo_obj_hook))
        elif extension == ".bytecode":
            with open(path, "rb") as handle:
                bytecodes[stem] = handle.read()
        elif extension == ".mlir":
            with open(path) as handle:
                texts[stem] = handle.read()
    if not metas:
        raise ValueError(f"{directory}: no exported function (functions/*.meta) was found")
    functions = []
    for meta in metas:
        if not isinstance(meta, stablehlo.StableHLOFunctionMeta) or meta.name not in bytecodes:
            raise ValueError(f"{directory}: a function's metadata has no matching bytecode")
        functions.append(stablehlo.StableHLOFunc(meta, bytecodes[meta.name], texts.get(meta.name)))
    return stablehlo.StableHLOModelBundle(
        state_dict=state_dict, additional_constants=[array for _, array in sorted(constants)],
        stablehlo_funcs=functions)
