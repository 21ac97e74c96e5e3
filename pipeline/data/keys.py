"""What a listed path becomes: its key, the URL its row holds, and the row itself. Shared by
folder listing (`pipeline.data.sources`) and manifests (`pipeline.data.manifest`).

Keys. An input's key is its path relative to the INPUT root, without extension, '/'-separated;
its mask is OUTPUT/masks/<key>.png. Backslashes count as separators (Windows-style manifests),
empty and '.' components are dropped; a '..' component, a NUL or a '::' (fsspec's URL chaining)
make the path unsafe: it becomes a `list` error row, never a key.

Collisions. Files whose keys differ only by extension (a.jpg, a.png in one folder) all keep
their extension in the key ('a.jpg', 'a.png'), whatever order they are listed in, so adding a
third later can never hand its key to a file that already has a mask. If a key is still taken
(a manifest that lists the same path twice; 'a.jpg' next to a file named 'a.jpg.png'; the same
path under two buckets in one manifest), the plain key wins, else the first listed, and the
other input becomes a `list` error row: nothing is silently overwritten, nothing is lost.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache

import fsspec
from fsspec.core import split_protocol

from model.errors import DinosegError
from pipeline.data.schema import ERROR_FIELDS

_SEPARATORS = re.compile(r"[\\/]")


# ---- keys ------------------------------------------------------------------------------------


def extension(name: str) -> str:
    return os.path.splitext(name)[1][1:].lower()


@lru_cache(maxsize=64)
def canonical_protocol(protocol: str | None) -> str:
    if protocol in (None, "", "file", "local"):
        return "file"
    try:
        p = fsspec.get_filesystem_class(protocol).protocol
        return p if isinstance(p, str) else p[0]
    except (ImportError, ValueError):
        return protocol


def split_url(url: str) -> tuple[str, list[str]]:
    """(canonical protocol, path components): backslashes split, empty and '.' parts dropped."""
    protocol, path = split_protocol(url)
    return canonical_protocol(protocol), [c for c in _SEPARATORS.split(path) if c not in ("", ".")]


def key_from_parts(rel: list[str], path: str, keep_extension: bool = False) -> str:
    if not rel:
        raise DinosegError(f"'{path}' names no file: list image files, not folders.")
    for c in rel:
        if c == "..":
            raise DinosegError(
                f"'{path}' has a '..' component, so its mask could land outside OUTPUT: list it without '..'."
            )
        if "\x00" in c or "::" in c:
            raise DinosegError(
                f"'{path}' holds a NUL or '::', which cannot be part of an output name: rename the file."
            )
    last = rel[-1] if keep_extension else os.path.splitext(rel[-1])[0]
    return "/".join(rel[:-1] + [last])


def make_key(root: str, path: str, keep_extension: bool = False) -> str:
    """The key of `path` under the INPUT `root`: relative, '/'-separated, without extension.

    `make_key('s3://b/in', 's3://b/in/x/y.jpg') == 'x/y'`; a single file is its own root
    (`make_key('/p/a.jpg', '/p/a.jpg') == 'a'`). With `keep_extension` the extension stays
    (the collision rule, see the module docstring). Raises DinosegError when `path` is not
    under `root` or cannot be made safe (a '..' component, a NUL, a '::').
    """
    root_protocol, root_parts = split_url(root)
    protocol, parts = split_url(path)
    if protocol == root_protocol and parts == root_parts:
        rel = parts[-1:]
    elif protocol == root_protocol and parts[: len(root_parts)] == root_parts:
        rel = parts[len(root_parts) :]
    else:
        raise DinosegError(f"'{path}' is not under the input root '{root}': list paths below it.")
    return key_from_parts(rel, path, keep_extension)


# ---- rows ------------------------------------------------------------------------------------


def input_row(path: str, key: str) -> dict:
    return {"path": path, "key": key, **dict.fromkeys(ERROR_FIELDS, "")}


def list_error_row(path: str, message: str, error_type: str) -> dict:
    return {"path": path, "key": "", "error_stage": "list", "error_type": error_type, "error_message": message}


def is_local(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols


def row_url(fs, path: str) -> str:
    """`path` as rows hold it: a URL fsspec opens with the same storage_options; local files as
    absolute local paths."""
    return path if is_local(fs) else fs.unstrip_protocol(path)
