"""Where rows come from: list the inputs under a URL, a glob or in a manifest, and read their
bytes (keys and collisions are `pipeline.data.keys`, manifests `pipeline.data.manifest`, decoding
`pipeline.data.decode`).

Listing runs on the driver and streams; `ReadBytes` is a numpy-batch callable
(`__init__(config)`, `__call__(batch) -> batch`) that runs as it is in a unit test and as a
`map_batches` class in Ray Data. A row that fails keeps flowing with its error fields set.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import Iterator

import fsspec
import numpy as np
from fsspec.core import split_protocol, url_to_fs
from fsspec.utils import glob_translate

from model.errors import DinosegError
from pipeline.data.keys import (
    canonical_protocol,
    extension,
    input_row,
    key_from_parts,
    list_error_row,
    make_key,
    row_url,
    split_url,
)
from pipeline.data.manifest import MANIFEST_EXTENSIONS, manifest_rows
from pipeline.data.schema import failed, object_array, set_error, with_error_columns

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")  # matched case-insensitively
_GLOB_CHARS = re.compile(r"[*?\[]")


def is_image_name(name: str) -> bool:
    return extension(name) in IMAGE_EXTENSIONS


def _extensions() -> str:
    return ", ".join(IMAGE_EXTENSIONS)


# ---- listing ---------------------------------------------------------------------------------


def list_inputs(input: str, storage_options: dict | None = None) -> Iterator[dict]:
    """Yield one row {path, key, error_stage, error_type, error_message} per input, lazily.

    INPUT is a folder or prefix (local, or any fsspec URL), a glob (`*`, `?`, `[`; only when
    no file or folder has that literal name), a manifest (.txt: one path or URL a line, blank
    lines and '#' comments skipped; .csv or .parquet: a `path` column), or one image file.
    Folders are walked recursively, one directory at a time, files sorted within each
    directory and subdirectories visited in sorted order; only names with an extension in
    IMAGE_EXTENSIONS (any case) are kept. A glob's key root is its folder before the first
    wildcard; a folder that matches the glob is taken whole.

    Manifests keep their order and are not filtered (what is listed is an input, and a file
    that is missing or not an image becomes a read or decode error). An entry without a
    protocol is relative to the manifest's folder. Keys are relative to the longest common
    folder of all entries (a one-line manifest gives the file's stem); entries on different
    filesystems have none, so their key is the path without its scheme. The manifest is read
    twice, to find that folder and the collisions without holding its paths in memory.

    Rows hold full URLs that fsspec opens with the same storage_options ('s3://b/x.jpg';
    local files as absolute local paths). Raises DinosegError (when iteration starts) if
    INPUT does not exist, and (at the end) if it holds no images. Unsafe or colliding paths
    come out as rows with error_stage 'list' (see `pipeline.data.keys`).
    """
    options = dict(storage_options or {})
    try:
        fs, path = url_to_fs(input, **options)
    except (ImportError, ValueError) as e:
        raise DinosegError(f"cannot open '{input}': {e}: check the URL, its scheme and the storage options.") from None
    path = path.rstrip("/") or fs.root_marker or "/"
    kind = _input_kind(fs, path, input)
    if kind == "dir":
        rows = _walk_rows(fs, path, path)
        nothing = f"'{input}' holds no images with extensions {_extensions()}: check the prefix."
    elif kind == "glob":
        rows = _glob_rows(fs, path, input)
        nothing = f"'{input}' matches no images with extensions {_extensions()}: check the pattern."
    elif kind == "manifest":
        rows = manifest_rows(fs, path, input)
        nothing = f"the manifest '{input}' lists no paths: check the file."
    else:
        rows = iter([input_row(row_url(fs, path), make_key(path, path))])
        nothing = ""
    n = 0
    for row in rows:
        n += 1
        yield row
    if n == 0:
        raise DinosegError(nothing)


def _input_kind(fs, path: str, input: str) -> str:
    try:
        if fs.isdir(path):
            return "dir"
        if fs.isfile(path):
            ext = extension(path)
            if ext in MANIFEST_EXTENSIONS:
                return "manifest"
            if ext in IMAGE_EXTENSIONS:
                return "file"
            raise DinosegError(
                f"'{input}' is neither an image ({_extensions()}) nor a manifest (.txt, .csv, .parquet): "
                "pass a folder, a glob, a manifest or an image."
            )
    except PermissionError as e:
        raise DinosegError(
            f"access to '{input}' was denied ({e}): check the credentials and storage options."
        ) from None
    except (OSError, ValueError) as e:  # FileNotFoundError is an OSError: a missing bucket says so here
        if not isinstance(e, FileNotFoundError):
            raise DinosegError(f"cannot look at '{input}' ({e}): check the URL and the storage options.") from None
    if _GLOB_CHARS.search(path):
        return "glob"
    raise DinosegError(f"the input '{input}' does not exist: check the path.")


def _walk_rows(fs, walk_root: str, key_root: str, dir_wanted=None, file_wanted=None) -> Iterator[dict]:
    """Walk `walk_root` one directory listing at a time, keyed relative to `key_root`: a folder's
    files (sorted), then its subfolders (sorted, depth first). `dir_wanted(path)` prunes
    subfolders; `file_wanted(dirpath)` returns a predicate over a file's full path.

    Not `fs.walk`: it drops its `on_error` when it recurses, so an unreadable subfolder would
    vanish without a word; here it becomes a `list` error row."""
    _, root_parts = split_url(key_root)
    stack = [walk_root]
    while stack:
        folder = stack.pop()
        try:
            listing = fs.ls(folder, detail=True)
        except OSError as e:
            if folder == walk_root:
                raise DinosegError(
                    f"cannot list '{row_url(fs, folder)}' ({e}): check the path and the permissions."
                ) from None
            where = row_url(fs, folder)
            message = f"the folder '{where}' could not be listed ({e}): its images are missing from this run; check its permissions."
            yield list_error_row(where, message, type(e).__name__)
            continue
        fs.invalidate_cache(folder)  # s3fs would keep every listing: memory would grow with the bucket
        dirs, files = [], []
        for info in listing:
            name = info["name"].rstrip("/")
            if name != folder:  # an object store's folder placeholder lists itself
                (dirs if info["type"] == "directory" else files).append(name)
        keep = file_wanted(folder) if file_wanted is not None else None
        paths = [p for p in sorted(files) if is_image_name(p) and (keep is None or keep(p))]
        yield from _folder_rows(fs, paths, root_parts)
        stack.extend(d for d in sorted(dirs, reverse=True) if dir_wanted is None or dir_wanted(d))


def _folder_rows(fs, paths: list[str], root_parts: list[str]) -> Iterator[dict]:
    """Rows for one folder's files, applying the collision rule within the folder."""
    items = []
    for p in paths:
        url, rel = row_url(fs, p), split_url(p)[1][len(root_parts) :]
        try:
            items.append((url, rel, key_from_parts(rel, url)))
        except DinosegError as e:
            items.append((url, rel, e))
    counts: dict[str, int] = {}
    for _, _, key in items:
        if isinstance(key, str):
            counts[key] = counts.get(key, 0) + 1
    plain = {k for k, n in counts.items() if n == 1}
    taken: set[str] = set()
    for url, rel, key in items:
        if isinstance(key, DinosegError):
            yield list_error_row(url, str(key), "UnsafePath")
            continue
        if counts[key] > 1:
            key = key_from_parts(rel, url, keep_extension=True)
            if key in plain or key in taken:
                yield list_error_row(
                    url,
                    f"its key '{key}' is already used by another file in its folder: rename one of them.",
                    "KeyCollision",
                )
                continue
        taken.add(key)
        yield input_row(url, key)


def _glob_rows(fs, pattern: str, input: str) -> Iterator[dict]:
    parts = pattern.split("/")
    first = next(i for i, c in enumerate(parts) if _GLOB_CHARS.search(c))
    root = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else "")
    if not root or not fs.exists(root):
        raise DinosegError(
            f"the input '{input}' does not exist: check the path (the part before the first wildcard must exist)."
        )
    wild = parts[first:]
    regex = re.compile(glob_translate(pattern))

    def dir_wanted(path: str) -> bool:  # could anything below `path` match?
        for i, c in enumerate(path.split("/")[first:]):
            if i >= len(wild) or wild[i] == "**":
                return True
            if not fnmatchcase(c, wild[i]):
                return False
        return True

    def file_wanted(dirpath: str):
        comps = dirpath.split("/")
        whole = any(regex.match("/".join(comps[:i])) for i in range(first + 1, len(comps) + 1))
        return (lambda p: True) if whole else (lambda p: regex.match(p) is not None)

    return _walk_rows(fs, root, root, dir_wanted, file_wanted)


# ---- reading ---------------------------------------------------------------------------------


class ReadBytes:
    """Batch {path, key, error_*} -> + `bytes` (b'' where the row failed); failures -> 'read'.

    Paths are grouped by filesystem and fetched with `cat_ranges`, concurrent on object
    stores (s3fs, gcsfs, http), with per-path exceptions instead of one failure for all.
    (`fs.cat` of a list would expand glob characters in file names, so it is not used.)
    """

    def __init__(self, storage_options: dict | None = None):
        self.storage_options = dict(storage_options or {})
        self._filesystems: dict[str, object] = {}

    def _fs(self, protocol: str):
        if protocol not in self._filesystems:
            options = {} if protocol == "file" else self.storage_options
            self._filesystems[protocol] = fsspec.filesystem(protocol, **options)
        return self._filesystems[protocol]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = with_error_columns(batch)
        n = len(out["path"])
        data: list[bytes] = [b""] * n
        bad = failed(out)
        groups: dict[str, list[int]] = {}
        for i in range(n):
            if not bad[i]:
                groups.setdefault(canonical_protocol(split_protocol(str(out["path"][i]))[0]), []).append(i)
        for protocol, rows in groups.items():
            paths = [str(out["path"][i]) for i in rows]
            try:
                results = self._fs(protocol).cat_ranges(paths, None, None, on_error="return")
            except Exception as e:  # the filesystem itself failed (bad options, no driver)
                results = [e] * len(rows)
            for i, path, result in zip(rows, paths, results, strict=True):
                if isinstance(result, BaseException):
                    set_error(out, i, "read", _read_message(path, result), type(result).__name__)
                else:
                    data[i] = bytes(result)
        out["bytes"] = object_array(data)
        return out


def _read_message(path: str, e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return f"cannot read '{path}': it does not exist (deleted or moved after listing?)."
    if isinstance(e, PermissionError):
        return f"cannot read '{path}': access denied ({e}); check the credentials and storage options."
    if isinstance(e, IsADirectoryError):
        return f"cannot read '{path}': it is a folder, not a file."
    return f"cannot read '{path}': {type(e).__name__}: {e}."
