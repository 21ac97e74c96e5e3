"""Walking a folder or prefix for `list_inputs` (`pipeline.data.sources`): one directory listing
at a time, retried when the store fails for a moment, symbolic links followed only within INPUT,
and every folder that cannot be listed told, never skipped.

Faults. A listing that fails with a transient fault (a timeout, a reset, a 5xx that botocore and
s3fs gave up on, botocore's `EndpointConnectionError`, which is not an `OSError`; see
`pipeline.io.retry`) is tried `retry.ATTEMPTS` times with doubling pauses; a permanent one
(missing, denied) is not; any other storage error is caught too, never a bare traceback. A subfolder
that still cannot be listed becomes one `list` error row that says its images are missing, and
`stats['unlisted_folders']` counts it, so the run can say its listing was incomplete.

Symbolic links (local filesystems). A link is followed, file or folder; the input keeps the
link's own path and key. With `refuse_outside_links` (segment and pseudo-label, whose overlays
copy the image into OUTPUT) a link whose target resolves outside INPUT is a `list` error row
(SymlinkOutsideInput), counted in `stats['symlinks_refused']`, and never read: it could put files
from elsewhere into OUTPUT. Without it (train, evaluate, export, points: a split folder of links
into a shared store is a common dataset layout) such links are followed too. A folder link that
leads back to a folder above it (a loop) is an error row either way (SymlinkLoop); that folder is
listed once.

S3's doubled slash. Objects named `x//y.jpg` sit under the prefix `x//`, which s3fs lists as the
folder `x/` and no listing call reaches (it strips the trailing '/'): it becomes a `list` error row
(UnlistableFolder) counted in `stats['unlisted_folders']`, never silently left out.
"""

from __future__ import annotations

import logging
import os
import re
from fnmatch import fnmatchcase
from typing import Callable, Iterator

import pyarrow as pa
from fsspec.utils import glob_translate

from model.errors import DinosegError
from pipeline.data.claims import PROPOSAL, UNSAFE, claim_folder
from pipeline.data.keys import (
    IMAGE_EXTENSIONS,
    extension,
    is_image_name,
    is_local,
    key_from_parts,
    list_error_row,
    row_url,
    split_url,
)
from pipeline.data.registry import KeyRegistry
from pipeline.io import retry
from pipeline.io.retry import is_transient, with_retries

log = logging.getLogger(__name__)

GLOB_CHARS = re.compile(r"[*?\[]")  # a glob, unless a file or folder has that very name

PROPOSAL_BATCH = 65_536  # proposals gathered before a batch is made (a folder is never split)

_CLIENT_LIBRARIES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "google", "fsspec", "s3fs", "gcsfs")


def storage_fault(e: BaseException) -> str | None:
    """'transient' (worth another try, `pipeline.io.retry.is_transient`), 'permanent' (missing,
    denied, refused), or None when `e` is no storage fault at all (a bug: it is raised as it is)."""
    from_client = any(c.__module__.split(".")[0] in _CLIENT_LIBRARIES for c in type(e).__mro__)
    if not (isinstance(e, OSError) or from_client):
        return None
    return "transient" if is_transient(e) else "permanent"


def retrying(call: Callable, *args, what: str):
    """`call(*args)`, tried again after transient storage faults (`pipeline.io.retry`)."""
    return with_retries(lambda: call(*args), what, attempts=retry.ATTEMPTS, backoff_s=retry.BACKOFF_S)


def walk_rows(fs, walk_root: str, key_root: str, registry: KeyRegistry, stats: dict, **how) -> Iterator[dict]:
    """The rows of `walk_folders`, one by one, each folder's keys claimed in `registry`."""
    for item in walk_folders(fs, walk_root, key_root, stats, **how):
        if isinstance(item, dict):
            yield item
        else:
            yield from claim_folder(registry, item)


def walk_proposals(fs, walk_root: str, key_root: str, stats: dict, **how) -> Iterator[pa.RecordBatch]:
    """The rows of `walk_folders` as proposals (`pipeline.data.claims.PROPOSAL`), a folder's files
    in one batch, each folder its own group."""
    rows: dict[str, list] = {name: [] for name in PROPOSAL.names}
    for group, item in enumerate(walk_folders(fs, walk_root, key_root, stats, **how)):
        for url, rel, key, error_type, message in _proposed(item):
            for name, value in zip(
                PROPOSAL.names, (url, "/".join(rel), key, False, False, error_type, message, group), strict=True
            ):
                rows[name].append(value)
        if len(rows["path"]) >= PROPOSAL_BATCH:
            yield pa.RecordBatch.from_pydict(rows, schema=PROPOSAL)
            rows = {name: [] for name in PROPOSAL.names}
    if rows["path"]:
        yield pa.RecordBatch.from_pydict(rows, schema=PROPOSAL)


def _proposed(item) -> Iterator[tuple]:
    if isinstance(item, dict):  # a final error row (a folder that could not be listed, a refused link)
        yield item["path"], [], None, item["error_type"], item["error_message"]
        return
    for url, rel in item:
        try:
            yield url, rel, key_from_parts(rel, url), "", ""
        except DinosegError as e:
            yield url, rel, None, UNSAFE, str(e)


def walk_folders(
    fs,
    walk_root: str,
    key_root: str,
    stats: dict,
    dir_wanted: Callable[[str], bool] | None = None,
    file_wanted: Callable[[str], Callable[[str], bool]] | None = None,
    refuse_outside_links: bool = False,
) -> Iterator[list[tuple[str, list[str]]] | dict]:
    """Walk `walk_root`, keyed relative to `key_root`: a folder's files (sorted), then its
    subfolders (sorted, depth first). Yields, per folder, its image files as (URL, components
    relative to `key_root`), then its `list` error rows (refused links); a folder that cannot be
    listed is one error row. `dir_wanted(path)` prunes subfolders; `file_wanted(dirpath)` returns
    a predicate over a file's full path. Image names only (see `is_image_name`).
    `refuse_outside_links`: local links whose target is outside INPUT become error rows
    (SymlinkOutsideInput) instead of being followed (see the module docstring).

    Not `fs.walk`: it drops its `on_error` when it recurses, so an unreadable subfolder would
    vanish without a word; here it becomes a `list` error row."""
    _, root_parts = split_url(key_root)
    local = is_local(fs)
    root_real = os.path.realpath(walk_root) if local else ""
    stack: list[tuple[str, tuple[str, ...]]] = [(walk_root, (root_real,) if local else ())]
    while stack:
        folder, chain = stack.pop()
        try:
            listing = retrying(fs.ls, folder, True, what=f"listing {row_url(fs, folder)}")
        except Exception as e:
            if storage_fault(e) is None:
                raise
            if folder == walk_root:
                raise DinosegError(
                    f"cannot list '{row_url(fs, folder)}' ({type(e).__name__}: {e}): check the path, "
                    "the permissions and the storage options, then run again."
                ) from None
            stats["unlisted_folders"] = stats.get("unlisted_folders", 0) + 1
            yield list_error_row(row_url(fs, folder), _unlisted_message(fs, folder, e), type(e).__name__)
            continue
        fs.invalidate_cache(folder)  # s3fs would keep every listing: memory would grow with the bucket
        dirs, files, refused = [], [], []
        for info in listing:
            name = info["name"].rstrip("/")
            if name == folder and info["type"] != "directory":  # an object store's folder placeholder
                continue
            if name == folder:  # S3's prefix 'x//' lists as the folder 'x/': no listing call reaches it
                stats["unlisted_folders"] = stats.get("unlisted_folders", 0) + 1
                refused.append((f"{row_url(fs, folder)}//", "UnlistableFolder", _doubled_slash_message(fs, folder)))
                continue
            if local and info.get("islink"):
                _sort_link(name, root_real, chain, dirs, files, refused, refuse_outside_links)
            else:
                (dirs if info["type"] == "directory" else files).append(name)
        keep = file_wanted(folder) if file_wanted is not None else None
        paths = [p for p in sorted(files) if is_image_name(p) and (keep is None or keep(p))]
        if paths:
            yield [(row_url(fs, p), split_url(p)[1][len(root_parts) :]) for p in paths]
        for path, error_type, message in sorted(refused):
            if error_type == "SymlinkOutsideInput":
                stats["symlinks_refused"] = stats.get("symlinks_refused", 0) + 1
            yield list_error_row(path, message, error_type)
        for d in sorted(dirs, reverse=True):
            if dir_wanted is None or dir_wanted(d):
                stack.append((d, chain + (os.path.realpath(d),) if local else ()))


def glob_walk(fs, pattern: str, input: str, refuse_outside_links: bool) -> tuple[str, dict]:
    """(the folder a glob's walk starts at and keys are relative to, the walk's settings)."""
    parts = pattern.split("/")
    first = next(i for i, c in enumerate(parts) if GLOB_CHARS.search(c))
    root = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else "")
    try:
        exists = bool(root) and retrying(fs.exists, root, what=f"looking at {root}")
    except Exception as e:
        if storage_fault(e) is None:
            raise
        raise DinosegError(f"cannot look at '{root}' ({type(e).__name__}: {e}): check the storage options.") from None
    if not exists:
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

    return root, {"dir_wanted": dir_wanted, "file_wanted": file_wanted, "refuse_outside_links": refuse_outside_links}


def _unlisted_message(fs, folder: str, e: BaseException) -> str:
    where = row_url(fs, folder)
    tried = f" after {retry.ATTEMPTS} tries" if storage_fault(e) == "transient" else ""
    return (
        f"the folder '{where}' could not be listed{tried} ({type(e).__name__}: {e}): its images are missing "
        "from this run; check its permissions and run again to list it."
    )


def _doubled_slash_message(fs, folder: str) -> str:
    where = row_url(fs, folder)
    return (
        f"the objects under '{where}//' (a doubled '/') cannot be listed, so their images are missing from "
        "this run: copy them to names without the doubled '/'."
    )


def _sort_link(
    name: str, root_real: str, chain: tuple[str, ...], dirs: list, files: list, refused: list, refuse_outside: bool
) -> None:
    """Put the local symbolic link `name` among the folders or files to list, or among the refused."""
    target = os.path.realpath(name)
    is_dir = os.path.isdir(target)
    outside = target != root_real and not target.startswith(root_real.rstrip(os.sep) + os.sep)
    if outside and refuse_outside:
        if is_dir or extension(name) in IMAGE_EXTENSIONS:
            what = "folder" if is_dir else "file"
            refused.append(
                (
                    name,
                    "SymlinkOutsideInput",
                    f"'{name}' is a symbolic link to the {what} '{target}', outside INPUT, so it is not read: "
                    "copy it into INPUT, or give INPUT a folder that holds it.",
                )
            )
    elif is_dir and target in chain:
        refused.append(
            (
                name,
                "SymlinkLoop",
                f"'{name}' is a symbolic link to '{target}', a folder above it (a loop): its images are "
                "listed there, once; remove the link to drop this row.",
            )
        )
    else:
        (dirs if is_dir else files).append(name)
