"""checkpoint.json: the list of a model_dir's kept checkpoints with their digests and times,
read with every name and value checked (a name from the file never leads outside model_dir),
and the retention rule that decides which of them to keep.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from ..common.paths import plain_name
from .stores import store_for

INDEX_NAME = "checkpoint.json"
CHECKPOINT_NAME = re.compile(r"^model\.ckpt-(\d+)(\.pt)?$")  # a file, or a sharded directory
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def checkpoint_name(global_step: int, sharded: bool = False) -> str:
    """`model.ckpt-<step>.pt` (one file), or `model.ckpt-<step>` (a sharded checkpoint's
    directory)."""
    return f"model.ckpt-{global_step}" + ("" if sharded else ".pt")


def step_of(path: str) -> int:
    """The global step a checkpoint file was written at, from its name."""
    match = CHECKPOINT_NAME.match(store_for(path).basename(path))
    if not match:
        raise ValueError(f"{path!r} is not a checkpoint file name (model.ckpt-<step>.pt)")
    return int(match.group(1))


@dataclasses.dataclass
class Index:
    """What checkpoint.json says of the kept checkpoints.

    digests: name -> SHA-256 recorded when written (None in an index older than digests),
      oldest first. written: name -> unix time it was written. preserved: the names kept for
      good by keep_checkpoint_every_n_hours (retention skips them). hours_anchor: the time the
      next such checkpoint is counted from.
    """

    digests: dict[str, str | None] = dataclasses.field(default_factory=dict)
    written: dict[str, float] = dataclasses.field(default_factory=dict)
    preserved: list[str] = dataclasses.field(default_factory=list)
    hours_anchor: float | None = None

    def to_json(self) -> str:
        names = list(self.digests)
        return json.dumps({"latest": names[-1] if names else None, "checkpoints": names,
                           "sha256": self.digests, "written": self.written,
                           "preserved": self.preserved, "hours_anchor": self.hours_anchor},
                          indent=1)

    def drop(self, name: str) -> None:
        del self.digests[name]
        self.written.pop(name, None)
        if name in self.preserved:
            self.preserved.remove(name)


def _checked_index(index: Any, index_path: str) -> Index:
    """The index after checking every name (a checkpoint file name inside model_dir, never a
    path that leads elsewhere), every digest (a SHA-256 hex string or none) and every time."""
    if not isinstance(index, dict) or not isinstance(index.get("checkpoints"), list):
        raise ValueError(f"{index_path} is not a checkpoint index: no list 'checkpoints'")
    digests = index.get("sha256", {})
    written = index.get("written", {})
    preserved = index.get("preserved", [])
    anchor = index.get("hours_anchor")
    if not isinstance(digests, dict) or not isinstance(written, dict) or \
            not isinstance(preserved, list) or not (anchor is None or _is_time(anchor)):
        raise ValueError(f"{index_path} is not a checkpoint index: 'sha256', 'written', "
                         "'preserved' or 'hours_anchor' has the wrong type")
    checked = Index(hours_anchor=anchor)
    for name in index["checkpoints"]:
        plain_name(name, f"checkpoint index {index_path}")
        if not CHECKPOINT_NAME.match(name):
            raise ValueError(f"checkpoint index {index_path} names {name!r}, which is not a "
                             "checkpoint file name (model.ckpt-<step>.pt): refused, nothing "
                             "was touched")
        digest = digests.get(name)
        if digest is not None and not (isinstance(digest, str) and _SHA256.match(digest)):
            raise ValueError(f"checkpoint index {index_path} gives {name!r} the digest "
                             f"{digest!r}, which is not a SHA-256")
        checked.digests[name] = digest
        if _is_time(written.get(name)):
            checked.written[name] = written[name]
    checked.preserved = [name for name in preserved if name in checked.digests]
    return checked


def _is_time(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def read_index(model_dir: str) -> Index | None:
    """The index of the checkpoints of model_dir that still exist; None without an index."""
    store = store_for(model_dir)
    index_path = store.join(model_dir, INDEX_NAME)
    try:
        index = _checked_index(json.loads(store.read_bytes(index_path)), index_path)
    except FileNotFoundError:
        return None
    except ValueError as error:
        if "checkpoint index" in str(error):
            raise
        raise ValueError(f"{index_path} is not a checkpoint index: {error}") from error
    present = set(store.listdir(model_dir))
    for name in [name for name in index.digests if name not in present]:
        index.drop(name)
    return index


def retain(index: Index, keep_max: int | None, every_n_hours: float | None) -> list[str]:
    """Applies retention to `index` (newest last); returns the names to delete. The newest
    `keep_max` are kept (None: all); of the older ones, each written at least `every_n_hours`
    after the last one kept that way is kept for good, as TF's Saver does."""
    candidates = [name for name in index.digests if name not in index.preserved]
    surplus = candidates[: max(0, len(candidates) - keep_max)] if keep_max else []
    deleted = []
    for name in surplus:
        written = index.written.get(name)
        if every_n_hours is not None and written is not None and \
                written - (index.hours_anchor or 0.0) >= every_n_hours * 3600:
            index.preserved.append(name)
            index.hours_anchor = written
            continue
        deleted.append(name)
        index.drop(name)
    return deleted
