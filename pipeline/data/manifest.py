"""Manifests: the inputs listed in a .txt (one path or URL a line), .csv or .parquet (a `path`
column) file, as rows in the manifest's order (`list_inputs` in `pipeline.data.sources` says what a
manifest may hold; `pipeline.data.keys` the key and collision rules).

The manifest is read twice, streaming, so that its paths are never held twice in memory: once for
the common folder of all entries and 8-byte hashes of each entry's URL and folded stem key, to
find the entries whose stems collide (they keep their extension); once to yield the rows, whose
keys the listing's `KeyRegistry` makes unique (the same URL twice is a DuplicateInput row).
Keys depend on the common folder, so a new entry elsewhere would change them: what makes them
stable across runs is the earlier run's record (`recorded_keys`), which the registry keeps (by
URL without credentials, or by the name relative to the common folder when the entries moved).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from array import array
from typing import Iterator

import numpy as np
from fsspec.core import split_protocol

from model.errors import DinosegError
from pipeline.data.keys import (
    KeyRegistry,
    canonical_protocol,
    extension,
    fold_key,
    is_local,
    key_from_parts,
    list_error_row,
    split_url,
)
from pipeline.data.walk import storage_fault

MANIFEST_EXTENSIONS = ("txt", "csv", "parquet")


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")


def _manifest_lines(fs, path: str, input: str) -> Iterator[str]:
    ext = extension(path)
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
                batches = (
                    pf.iter_batches(columns=["path"], batch_size=65536) if "path" in pf.schema_arrow.names else None
                )
            if batches is None:
                raise DinosegError(
                    f"the manifest '{input}' has no 'path' column: name the column of image paths 'path'."
                )
            for batch in batches:
                for value in batch.column(0).to_pylist():
                    if value and value.strip():
                        yield value.strip()
    except (OSError, ValueError, KeyError) as e:  # pyarrow's errors are ValueErrors and KeyErrors
        raise DinosegError(
            f"cannot read the manifest '{input}' ({type(e).__name__}: {e}): check that it is a valid .{ext} file."
        ) from None
    except Exception as e:  # botocore's EndpointConnectionError and kin are no OSError
        if storage_fault(e) is None:
            raise
        raise DinosegError(
            f"cannot read the manifest '{input}' ({type(e).__name__}: {e}): check the endpoint, then run again."
        ) from None


def _resolve(entry: str, fs, folder: str) -> tuple[str, str, list[str]]:
    """A manifest entry -> (URL to read, canonical protocol, path components)."""
    protocol, rest = split_protocol(entry)
    if protocol is None and is_local(fs):  # relative to the manifest's folder, like a link in a page
        url = os.path.normpath(os.path.join(folder, entry))
    elif protocol is None:  # ... and '/x' is relative to the manifest's filesystem: its bucket list
        joined = fs.root_marker + entry.lstrip("/") if entry.startswith("/") else posixpath.join(folder, entry)
        url = fs.unstrip_protocol(posixpath.normpath(joined))
    elif canonical_protocol(protocol) == "file":
        url = os.path.abspath(rest)  # the OS resolves '..' in local paths anyway
    else:
        url = entry  # kept literally: on an object store 'a/../b' is a name, not a path
    protocol, parts = split_url(url)
    return url, protocol, parts


def manifest_rows(fs, path: str, input: str, registry: KeyRegistry | None = None) -> Iterator[dict]:
    """Rows for the manifest at `path` on `fs` (`input` as the user wrote it, for messages);
    keys are claimed in `registry` (unique over the listing, recorded keys kept)."""
    registry = KeyRegistry() if registry is None else registry
    folder = path.rsplit("/", 1)[0] if "/" in path else ""
    # pass 1: the common folder, and per distinct entry the hash of its folded stem key
    protocols: set[str] = set()
    prefix: list[str] | None = None
    stems, urls = array("Q"), array("Q")
    for entry in _manifest_lines(fs, path, input):
        url, protocol, parts = _resolve(entry, fs, folder)
        protocols.add(protocol)
        dirs = parts[:-1]
        if prefix is None:
            prefix = dirs
        else:
            n = 0
            while n < min(len(prefix), len(dirs)) and prefix[n] == dirs[n]:
                n += 1
            del prefix[n:]
        stems.append(_stem_hash(parts))
        urls.append(_hash(url))
    if prefix is None:
        return
    root = prefix if len(protocols) == 1 else []
    pairs = np.unique(np.stack([np.frombuffer(stems, np.uint64), np.frombuffer(urls, np.uint64)], axis=1), axis=0)
    del stems, urls
    sorted_stems = pairs[:, 0]  # sorted: np.unique sorts the rows; a URL listed twice counts once
    repeated = sorted_stems[1:][sorted_stems[1:] == sorted_stems[:-1]]
    colliding = {int(h) for h in np.unique(repeated)}

    def is_stem(h: int) -> bool:
        i = np.searchsorted(sorted_stems, np.uint64(h))
        return i < len(sorted_stems) and int(sorted_stems[i]) == h

    # pass 2: the rows
    for entry in _manifest_lines(fs, path, input):
        url, _, parts = _resolve(entry, fs, folder)
        rel = parts[len(root) :]
        # an earlier run's key, whatever the common folder is now; or the key of the entry with the
        # same name relative to it, when all entries moved (another bucket prefix, host or mount)
        kept = registry.recorded(url, rel)
        if kept is not None:
            yield registry.claim(url, kept, recorded=True)
            continue
        try:
            key = key_from_parts(rel, url)
        except DinosegError as e:
            yield list_error_row(url, str(e), "UnsafePath")
            continue
        if _stem_hash(parts) in colliding:
            key = key_from_parts(rel, url, keep_extension=True)
            h = _hash(fold_key("/".join(parts)))
            if is_stem(h) and h not in colliding and not registry.reserved(key):  # the plain key wins
                yield list_error_row(
                    url,
                    f"'{url}' would get the key '{key}', already used by another entry without extension: "
                    "rename one of them or list only one.",
                    "KeyCollision",
                )
                continue
        yield registry.claim(url, key)


def _stem_hash(parts: list[str]) -> int:
    """The hash of an entry's stem key, folded (`fold_key`): entries that share it keep their extension."""
    return _hash(fold_key("/".join(parts[:-1] + [os.path.splitext(parts[-1])[0]]))) if parts else 0
