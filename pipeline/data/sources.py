"""Where rows come from: list the inputs under a URL, a glob or in a manifest, and read their
bytes (keys and collisions are `pipeline.data.keys`, the folder walk `pipeline.data.walk`,
manifests `pipeline.data.manifest`, decoding `pipeline.data.decode`).

Listing runs on the driver and streams; `ReadBytes` is a numpy-batch callable
(`__init__(config)`, `__call__(batch) -> batch`) that runs as it is in a unit test and as a
`map_batches` class in Ray Data. A row that fails keeps flowing with its error fields set.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import fsspec
import numpy as np
import pyarrow as pa
from fsspec.core import split_protocol, url_to_fs

from model.errors import DinosegError
from model.storage import options_for, scope_of
from pipeline.data.claims import PROPOSAL, ROW, ListingClaims
from pipeline.data.keys import (
    IMAGE_EXTENSIONS,
    canonical_protocol,
    extension,
    is_image_name,
    make_key,
    row_url,
    split_url,
)
from pipeline.data.manifest import MANIFEST_EXTENSIONS, Manifest, manifest_rows
from pipeline.data.recorded import RecordedKeys
from pipeline.data.registry import KeyRegistry
from pipeline.data.schema import failed, object_array, set_error, with_error_columns
from pipeline.data.spool import Spool
from pipeline.data.walk import GLOB_CHARS, glob_walk, retrying, storage_fault, walk_proposals, walk_rows
from pipeline.io.retry import retry_each

__all__ = ["IMAGE_EXTENSIONS", "ReadBytes", "is_image_name", "list_input_batches", "list_inputs"]


def _extensions() -> str:
    return ", ".join(IMAGE_EXTENSIONS)


# ---- listing ---------------------------------------------------------------------------------


def list_inputs(
    input: str,
    storage_options: dict | None = None,
    recorded: Mapping[str, str] | None = None,
    stats: dict | None = None,
    refuse_outside_links: bool = False,
) -> Iterator[dict]:
    """Yield one row {path, key, error_stage, error_type, error_message} per input, lazily.

    INPUT is a folder or prefix (local, or any fsspec URL), a glob (`*`, `?`, `[`; only when
    no file or folder has that literal name), a manifest (.txt: one path or URL a line, blank
    lines and '#' comments skipped; .csv or .parquet: a `path` column), or one image file.
    Folders are walked recursively, one directory at a time, files sorted within each
    directory and subdirectories visited in sorted order; only names with an extension in
    IMAGE_EXTENSIONS (any case) are kept. A glob's key root is its folder before the first
    wildcard; a folder that matches the glob is taken whole. Symbolic links are followed (with
    `refuse_outside_links`, as segment and pseudo-label list, only within INPUT: the others are
    error rows), and failed folder listings retried (`pipeline.data.walk`).

    Manifests keep their order and are not filtered (what is listed is an input, and a file
    that is missing or not an image becomes a read or decode error). An entry without a
    protocol is relative to the manifest's folder. Keys are relative to the longest common
    folder of all entries (a one-line manifest gives the file's stem); entries on different
    filesystems have none, so their key is the path without its scheme. The manifest is read
    once, its entries spooled to find that folder and the collisions (`pipeline.data.manifest`).

    Keys are unique over the whole listing, also on case-insensitive disks (`pipeline.data.keys`).
    `recorded` (path -> key, from `recorded_keys(OUTPUT)`) is what an earlier run gave: those
    paths keep their keys (compared without credentials, and in folders relative to INPUT, so a
    renamed INPUT resumes), and no other input takes one. `stats`, when given, gets
    'unlisted_folders' (subfolders that could not be listed: their images are missing),
    'symlinks_refused' (links outside INPUT) and 'recorded_not_listed' (inputs of earlier runs not
    listed now, whose keys stay reserved), where there are any.

    Rows hold full URLs that fsspec opens with the same storage_options ('s3://b/x.jpg';
    local files as absolute local paths). Raises DinosegError (when iteration starts) if
    INPUT does not exist or cannot be looked at, and (at the end) if it holds no images. Unsafe,
    colliding or refused paths come out as rows with error_stage 'list'.
    """
    stats = {} if stats is None else stats
    registry = KeyRegistry(recorded)
    kind, fs, path, how, nothing = _source(input, storage_options, refuse_outside_links)
    if kind == "file":
        rows = iter([_file_row(fs, path, registry)])
    elif kind == "manifest":
        rows = manifest_rows(fs, path, input, registry)
    else:
        rows = walk_rows(fs, path, path, registry, stats, **how)
    n = 0
    for row in rows:
        n += 1
        yield row
    if n == 0:
        raise DinosegError(nothing)
    if registry.unlisted():
        stats["recorded_not_listed"] = registry.unlisted()


def list_input_batches(
    input: str,
    storage_options: dict | None = None,
    recorded: Mapping[str, str] | RecordedKeys | None = None,
    stats: dict | None = None,
    refuse_outside_links: bool = False,
    mark_done: bool = False,
) -> Iterator[pa.RecordBatch]:
    """The rows of `list_inputs`, the same ones in the same order, as Arrow record batches (path,
    key, error_stage, error_type, error_message), for listings of millions of inputs: the keys of
    the whole listing are claimed at once (`pipeline.data.claims.ListingClaims`: the rows no other
    row can touch in Arrow, the others one by one), and the listing is held in a spool on the local
    disk while it is (`pipeline.data.spool`), never in Python objects. Not lazy: the listing is
    complete (and its errors raised) before the first batch. `recorded` is best given as a
    `RecordedKeys`; with `mark_done`, each batch has a `done` column too: whether an earlier run
    finished the row's key (a predictions row has it, `RecordedKeys.done_mask`)."""
    stats = {} if stats is None else stats
    book = recorded if isinstance(recorded, RecordedKeys) else RecordedKeys.from_mapping(recorded or {})
    kind, fs, path, how, nothing = _source(input, storage_options, refuse_outside_links)
    if kind == "file":
        registry = KeyRegistry(book)
        batch = pa.RecordBatch.from_pylist([_file_row(fs, path, registry)], schema=ROW)
        if mark_done:
            failed = batch["error_stage"][0].as_py() != ""
            batch = batch.append_column("done", pa.array([not failed and bool(book.done_mask(batch["key"])[0])]))
        yield batch
        if registry.unlisted():
            stats["recorded_not_listed"] = registry.unlisted()
        return
    with contextlib.ExitStack() as stack:
        if kind == "manifest":
            proposals = stack.enter_context(Manifest(fs, path, input)).proposals
        else:
            spool = stack.enter_context(Spool(PROPOSAL))
            for batch in walk_proposals(fs, path, path, stats, **how):
                spool.append(batch)
            proposals = spool.__iter__
        claims = ListingClaims(book, folders=kind != "manifest", mark_done=mark_done)
        for batch in proposals():
            claims.count(batch)
        if not claims.listed:
            raise DinosegError(nothing)
        claims.settle()
        for batch in proposals():
            yield claims.rows(batch)
    if claims.registry.unlisted():
        stats["recorded_not_listed"] = claims.registry.unlisted()


def _source(input: str, storage_options: dict | None, refuse_outside_links: bool):
    """(kind: dir, glob, manifest or file; the filesystem; the path on it; how to walk it; what
    to say when it lists nothing)."""
    options = options_for(input, storage_options)
    try:
        fs, path = url_to_fs(input, **options)
    except (ImportError, ValueError) as e:
        raise DinosegError(f"cannot open '{input}': {e}: check the URL, its scheme and the storage options.") from None
    path = path.rstrip("/") or fs.root_marker or "/"
    kind = _input_kind(fs, path, input)
    how = {"refuse_outside_links": refuse_outside_links}
    if kind == "dir":
        return kind, fs, path, how, f"'{input}' holds no images with extensions {_extensions()}: check the prefix."
    if kind == "glob":
        root, how = glob_walk(fs, path, input, refuse_outside_links)
        return kind, fs, root, how, f"'{input}' matches no images with extensions {_extensions()}: check the pattern."
    if kind == "manifest":
        return kind, fs, path, how, f"the manifest '{input}' lists no paths: check the file."
    return kind, fs, path, how, ""


def _file_row(fs, path: str, registry: KeyRegistry) -> dict:
    url, name = row_url(fs, path), split_url(path)[1][-1:]
    kept = registry.recorded(url, name)  # also the same file moved to another folder
    return registry.claim(url, kept, recorded=True) if kept else registry.claim(url, make_key(path, path))


def _input_kind(fs, path: str, input: str) -> str:
    try:
        if retrying(fs.isdir, path, what=f"looking at {input}"):
            return "dir"
        if retrying(fs.isfile, path, what=f"looking at {input}"):
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
    except Exception as e:  # botocore's EndpointConnectionError and kin are no OSError
        if storage_fault(e) is None:
            raise
        raise DinosegError(
            f"cannot look at '{input}' ({type(e).__name__}: {e}): check the endpoint and the storage options, "
            "then run again."
        ) from None
    if GLOB_CHARS.search(path):
        return "glob"
    raise DinosegError(f"the input '{input}' does not exist: check the path.")


# ---- reading ---------------------------------------------------------------------------------


class ReadBytes:
    """Batch {path, key, error_*} -> + `bytes` (b'' where the row failed); failures -> 'read'.

    Paths are grouped by filesystem and fetched with `cat_ranges`, concurrent on object
    stores (s3fs, gcsfs, http), with per-path exceptions instead of one failure for all.
    (`fs.cat` of a list would expand glob characters in file names, so it is not used.)
    """

    def __init__(self, storage_options: dict | None = None):
        self.storage_options = dict(storage_options or {})
        self._filesystems: dict[tuple, object] = {}

    def _fs(self, group: tuple[str, str | None], url: str):
        """One filesystem per protocol and options scope: a manifest's hosts get only the options
        meant for them (`model.storage`), never another host's headers."""
        if group not in self._filesystems:
            self._filesystems[group] = fsspec.filesystem(group[0], **options_for(url, self.storage_options))
        return self._filesystems[group]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = with_error_columns(batch)
        n = len(out["path"])
        data: list[bytes] = [b""] * n
        bad = failed(out)
        groups: dict[tuple, list[int]] = {}
        for i in range(n):
            if not bad[i]:
                url = str(out["path"][i])
                group = (canonical_protocol(split_protocol(url)[0]), scope_of(url, self.storage_options))
                groups.setdefault(group, []).append(i)
        for group, rows in groups.items():
            paths = [str(out["path"][i]) for i in rows]
            # per-path exceptions; the filesystem failing as a whole (bad options, no driver) fails
            # each path; transient failures are read again with backoff (`pipeline.io.retry`)
            fs = lambda ps, g=group, u=paths[0]: self._fs(g, u).cat_ranges(ps, None, None, on_error="return")
            results = retry_each(fs, paths)
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
