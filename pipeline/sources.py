"""Where rows come from: list the inputs under a URL or in a manifest, and read their bytes
(decoding is `pipeline.decode`).

Listing runs on the driver and streams; `ReadBytes` is a numpy-batch callable
(`__init__(config)`, `__call__(batch) -> batch`) that run as they are in a unit test and as
`map_batches` classes in Ray Data. A row that fails keeps flowing with its error fields set.

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

import hashlib
import os
import posixpath
import re
from array import array
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Iterator

import fsspec
import numpy as np
from fsspec.core import split_protocol, url_to_fs
from fsspec.utils import glob_translate

from model.errors import DinosegError

from .schema import ERROR_FIELDS, failed, object_array, set_error, with_error_columns

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")  # matched case-insensitively
MANIFEST_EXTENSIONS = ("txt", "csv", "parquet")
_GLOB_CHARS = re.compile(r"[*?\[]")
_SEPARATORS = re.compile(r"[\\/]")


def _ext(name: str) -> str:
    return os.path.splitext(name)[1][1:].lower()


def is_image_name(name: str) -> bool:
    return _ext(name) in IMAGE_EXTENSIONS


def _extensions() -> str:
    return ", ".join(IMAGE_EXTENSIONS)


# ---- keys ------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _canonical_protocol(protocol: str | None) -> str:
    if protocol in (None, "", "file", "local"):
        return "file"
    try:
        p = fsspec.get_filesystem_class(protocol).protocol
        return p if isinstance(p, str) else p[0]
    except (ImportError, ValueError):
        return protocol


def _split(url: str) -> tuple[str, list[str]]:
    """(canonical protocol, path components): backslashes split, empty and '.' parts dropped."""
    protocol, path = split_protocol(url)
    return _canonical_protocol(protocol), [c for c in _SEPARATORS.split(path) if c not in ("", ".")]


def _key_from_parts(rel: list[str], path: str, keep_extension: bool = False) -> str:
    if not rel:
        raise DinosegError(f"'{path}' names no file: list image files, not folders.")
    for c in rel:
        if c == "..":
            raise DinosegError(f"'{path}' has a '..' component, so its mask could land outside OUTPUT: list it without '..'.")
        if "\x00" in c or "::" in c:
            raise DinosegError(f"'{path}' holds a NUL or '::', which cannot be part of an output name: rename the file.")
    last = rel[-1] if keep_extension else os.path.splitext(rel[-1])[0]
    return "/".join(rel[:-1] + [last])


def make_key(root: str, path: str, keep_extension: bool = False) -> str:
    """The key of `path` under the INPUT `root`: relative, '/'-separated, without extension.

    `make_key('s3://b/in', 's3://b/in/x/y.jpg') == 'x/y'`; a single file is its own root
    (`make_key('/p/a.jpg', '/p/a.jpg') == 'a'`). With `keep_extension` the extension stays
    (the collision rule, see the module docstring). Raises DinosegError when `path` is not
    under `root` or cannot be made safe (a '..' component, a NUL, a '::').
    """
    root_protocol, root_parts = _split(root)
    protocol, parts = _split(path)
    if protocol == root_protocol and parts == root_parts:
        rel = parts[-1:]
    elif protocol == root_protocol and parts[: len(root_parts)] == root_parts:
        rel = parts[len(root_parts):]
    else:
        raise DinosegError(f"'{path}' is not under the input root '{root}': list paths below it.")
    return _key_from_parts(rel, path, keep_extension)


def _row(path: str, key: str) -> dict:
    return {"path": path, "key": key, **{f: "" for f in ERROR_FIELDS}}


def _error_row(path: str, message: str, error_type: str) -> dict:
    return {"path": path, "key": "", "error_stage": "list", "error_type": error_type, "error_message": message}


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")


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
    come out as rows with error_stage 'list' (see the module docstring).
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
        rows = _manifest_rows(fs, path, input)
        nothing = f"the manifest '{input}' lists no paths: check the file."
    else:
        rows = iter([_row(_url(fs, path), make_key(path, path))])
        nothing = ""
    n = 0
    for row in rows:
        n += 1
        yield row
    if n == 0:
        raise DinosegError(nothing)


def _is_local(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols


def _url(fs, path: str) -> str:
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _input_kind(fs, path: str, input: str) -> str:
    try:
        if fs.isdir(path):
            return "dir"
        if fs.isfile(path):
            ext = _ext(path)
            if ext in MANIFEST_EXTENSIONS:
                return "manifest"
            if ext in IMAGE_EXTENSIONS:
                return "file"
            raise DinosegError(
                f"'{input}' is neither an image ({_extensions()}) nor a manifest (.txt, .csv, .parquet): "
                "pass a folder, a glob, a manifest or an image."
            )
    except PermissionError as e:
        raise DinosegError(f"access to '{input}' was denied ({e}): check the credentials and storage options.") from None
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
    _, root_parts = _split(key_root)
    stack = [walk_root]
    while stack:
        folder = stack.pop()
        try:
            listing = fs.ls(folder, detail=True)
        except OSError as e:
            if folder == walk_root:
                raise DinosegError(f"cannot list '{_url(fs, folder)}' ({e}): check the path and the permissions.") from None
            where = _url(fs, folder)
            message = f"the folder '{where}' could not be listed ({e}): its images are missing from this run; check its permissions."
            yield _error_row(where, message, type(e).__name__)
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
        url, rel = _url(fs, p), _split(p)[1][len(root_parts):]
        try:
            items.append((url, rel, _key_from_parts(rel, url)))
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
            yield _error_row(url, str(key), "UnsafePath")
            continue
        if counts[key] > 1:
            key = _key_from_parts(rel, url, keep_extension=True)
            if key in plain or key in taken:
                yield _error_row(url, f"its key '{key}' is already used by another file in its folder: rename one of them.", "KeyCollision")
                continue
        taken.add(key)
        yield _row(url, key)


def _glob_rows(fs, pattern: str, input: str) -> Iterator[dict]:
    parts = pattern.split("/")
    first = next(i for i, c in enumerate(parts) if _GLOB_CHARS.search(c))
    root = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else "")
    if not root or not fs.exists(root):
        raise DinosegError(f"the input '{input}' does not exist: check the path (the part before the first wildcard must exist).")
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


# ---- manifests -------------------------------------------------------------------------------


def _manifest_lines(fs, path: str, input: str) -> Iterator[str]:
    ext = _ext(path)
    try:
        if ext == "txt":
            with fs.open(path, "rt", encoding="utf-8-sig") as f:
                for line in f:
                    line = line.strip()
                    if line and not line.startswith("#"):
                        yield line
            return
        with fs.open(path, "rb") as f:
            if ext == "csv":
                import pyarrow as pa
                import pyarrow.csv as pacsv

                opts = pacsv.ConvertOptions(include_columns=["path"], column_types={"path": pa.string()})
                try:
                    batches = pacsv.open_csv(f, convert_options=opts)
                except (pa.ArrowInvalid, pa.ArrowKeyError) as e:
                    if "include_columns" not in str(e):
                        raise
                    batches = None
            else:
                import pyarrow.parquet as pq

                pf = pq.ParquetFile(f)
                batches = pf.iter_batches(columns=["path"], batch_size=65536) if "path" in pf.schema_arrow.names else None
            if batches is None:
                raise DinosegError(f"the manifest '{input}' has no 'path' column: name the column of image paths 'path'.")
            for batch in batches:
                for value in batch.column(0).to_pylist():
                    if value and value.strip():
                        yield value.strip()
    except (OSError, ValueError, KeyError) as e:  # pyarrow's errors are ValueErrors and KeyErrors
        raise DinosegError(f"cannot read the manifest '{input}' ({type(e).__name__}: {e}): check that it is a valid .{ext} file.") from None


def _resolve(entry: str, fs, folder: str) -> tuple[str, str, list[str]]:
    """A manifest entry -> (URL to read, canonical protocol, path components)."""
    protocol, rest = split_protocol(entry)
    if protocol is None and _is_local(fs):  # relative to the manifest's folder, like a link in a page
        url = os.path.normpath(os.path.join(folder, entry))
    elif protocol is None:  # ... and '/x' is relative to the manifest's filesystem: its bucket list
        joined = fs.root_marker + entry.lstrip("/") if entry.startswith("/") else posixpath.join(folder, entry)
        url = fs.unstrip_protocol(posixpath.normpath(joined))
    elif _canonical_protocol(protocol) == "file":
        url = os.path.abspath(rest)  # the OS resolves '..' in local paths anyway
    else:
        url = entry  # kept literally: on an object store 'a/../b' is a name, not a path
    protocol, parts = _split(url)
    return url, protocol, parts


def _manifest_rows(fs, path: str, input: str) -> Iterator[dict]:
    folder = path.rsplit("/", 1)[0] if "/" in path else ""
    # pass 1: the common folder and the stem-key hashes (8 bytes an entry), to find collisions
    protocols: set[str] = set()
    prefix: list[str] | None = None
    stems = array("Q")
    for entry in _manifest_lines(fs, path, input):
        _, protocol, parts = _resolve(entry, fs, folder)
        protocols.add(protocol)
        dirs = parts[:-1]
        if prefix is None:
            prefix = dirs
        else:
            n = 0
            while n < min(len(prefix), len(dirs)) and prefix[n] == dirs[n]:
                n += 1
            del prefix[n:]
        stems.append(_hash("/".join(dirs + [os.path.splitext(parts[-1])[0]])) if parts else 0)
    if prefix is None:
        return
    root = prefix if len(protocols) == 1 else []
    sorted_stems = np.sort(np.frombuffer(stems, dtype=np.uint64)) if len(stems) else np.zeros(0, np.uint64)
    repeated = sorted_stems[1:][sorted_stems[1:] == sorted_stems[:-1]]
    colliding = {int(h) for h in np.unique(repeated)}
    del stems

    def is_stem(h: int) -> bool:
        i = np.searchsorted(sorted_stems, np.uint64(h))
        return i < len(sorted_stems) and int(sorted_stems[i]) == h

    # pass 2: the rows; only colliding entries are remembered
    taken: dict[str, str] = {}
    seen: set[str] = set()
    for entry in _manifest_lines(fs, path, input):
        url, _, parts = _resolve(entry, fs, folder)
        rel = parts[len(root):]
        try:
            key = _key_from_parts(rel, url)
        except DinosegError as e:
            yield _error_row(url, str(e), "UnsafePath")
            continue
        if _hash("/".join(parts[:-1] + [os.path.splitext(parts[-1])[0]])) in colliding:
            if url in seen:
                message = f"'{url}' is listed more than once in the manifest: only its first line is processed."
                yield _error_row(url, message, "DuplicateInput")
                continue
            seen.add(url)
            key = _key_from_parts(rel, url, keep_extension=True)
            h = _hash("/".join(parts))
            other = taken.get(key)
            if other is not None or (is_stem(h) and h not in colliding):
                by = f"'{other}'" if other else "another entry"
                yield _error_row(url, f"its key '{key}' is already used by {by}: rename one of them or list only one.", "KeyCollision")
                continue
            taken[key] = url
        yield _row(url, key)


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
                groups.setdefault(_canonical_protocol(split_protocol(str(out["path"][i]))[0]), []).append(i)
        for protocol, rows in groups.items():
            paths = [str(out["path"][i]) for i in rows]
            try:
                results = self._fs(protocol).cat_ranges(paths, None, None, on_error="return")
            except Exception as e:  # the filesystem itself failed (bad options, no driver)
                results = [e] * len(rows)
            for i, path, result in zip(rows, paths, results):
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
