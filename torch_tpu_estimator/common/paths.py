"""Names read from disk, turned into paths that stay inside their folder.

Every name that comes from a file (a checkpoint index entry, an export's batch sizes, its
assets list) is untrusted: `../x` or `/abs/x` would make a reader touch, rename or delete a
file outside the folder it is reading. These checks run before any such name becomes a path.
"""

from __future__ import annotations

import os
import stat


def is_url(path: str) -> bool:
    """Whether `path` names an object store (`<protocol>://...`, e.g. `gs://bucket/run`)
    rather than a local path (a `file://` URL is a local path)."""
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> str:
    """A local path given as such or as a `file://` URL."""
    return path[len("file://"):] if path.startswith("file://") else path


def checked_url(path: str, argument: str) -> str:
    """A URL whose protocol fsspec can reach here (its package installed), without a trailing
    slash; else a ValueError naming `argument` and the package to install."""
    protocol = path.split("://", 1)[0]
    try:
        import fsspec

        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as error:
        raise ValueError(f"{argument} {path!r} is on a store this machine cannot reach: "
                         f"{error}. Install fsspec and the package for {protocol}:// (pip "
                         "install 'torch_tpu_estimator[buckets]' gives s3fs and gcsfs)") from None
    return path.rstrip("/")


def plain_name(name: object, what: str) -> str:
    """`name` when it is a plain file name (no separator, not `.`/`..`, not absolute, no NUL);
    else a ValueError naming it and `what` it came from."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name
            or "\\" in name or "\0" in name or os.path.isabs(name)):
        raise ValueError(f"{what} names {name!r}, which is not a plain file name inside its "
                         "folder (no path separator, '..' or absolute path): refused, nothing "
                         "was touched")
    return name


def relative_inside(name: object, what: str) -> str:
    """`name` normalized when it is a relative path that stays inside its folder (it may hold
    subfolders); else a ValueError naming it."""
    if isinstance(name, str) and name and "\0" not in name:
        normalized = os.path.normpath(name)
        if not os.path.isabs(normalized) and normalized != "." and \
                normalized.split(os.sep)[0] != "..":
            return normalized
    raise ValueError(f"{what} names {name!r}: it must be a relative file path inside its folder")


def child(folder: str, name: object, what: str) -> str:
    """The path of plain file `name` inside `folder`."""
    return os.path.join(folder, plain_name(name, what))


def regular_file(folder: str, name: object, what: str) -> str:
    """The path of `name` inside `folder` when it is a regular file there: not a symbolic link
    (which could lead anywhere), not a folder; else a ValueError naming it."""
    path = child(folder, name, what)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise ValueError(f"{what} names {name!r}, which is missing from {folder}") from None
    if not stat.S_ISREG(mode):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
        raise ValueError(f"{what} names {name!r}, which is {kind}: refused (a file it reads "
                         "must lie inside its folder)")
    return path


def is_number_name(name: str) -> bool:
    """Whether a name read from disk is a decimal number in ASCII digits: str.isdigit also
    accepts '²' or '٣', which int() refuses or reads as another number."""
    return name.isascii() and name.isdigit()
