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
from typing import Callable, Iterator

from model.errors import DinosegError
from pipeline.data.keys import (
    IMAGE_EXTENSIONS,
    KeyRegistry,
    extension,
    fold_key,
    is_image_name,
    is_local,
    key_from_parts,
    list_error_row,
    row_url,
    split_url,
)
from pipeline.io import retry
from pipeline.io.retry import is_transient, with_retries

log = logging.getLogger(__name__)

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


def walk_rows(
    fs,
    walk_root: str,
    key_root: str,
    registry: KeyRegistry,
    stats: dict,
    dir_wanted: Callable[[str], bool] | None = None,
    file_wanted: Callable[[str], Callable[[str], bool]] | None = None,
    refuse_outside_links: bool = False,
) -> Iterator[dict]:
    """Walk `walk_root`, keyed relative to `key_root`: a folder's files (sorted), then its
    subfolders (sorted, depth first). `dir_wanted(path)` prunes subfolders; `file_wanted(dirpath)`
    returns a predicate over a file's full path. Image names only (see `is_image_name`).
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
        yield from _folder_rows(fs, paths, root_parts, registry)
        for path, error_type, message in sorted(refused):
            if error_type == "SymlinkOutsideInput":
                stats["symlinks_refused"] = stats.get("symlinks_refused", 0) + 1
            yield list_error_row(path, message, error_type)
        for d in sorted(dirs, reverse=True):
            if dir_wanted is None or dir_wanted(d):
                stack.append((d, chain + (os.path.realpath(d),) if local else ()))


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


def _folder_rows(fs, paths: list[str], root_parts: list[str], registry: KeyRegistry) -> Iterator[dict]:
    """Rows for one folder's files, in order: stems shared (under `fold_key`) within the folder
    keep their extension; plain keys are claimed before extension keys, so a plain key wins
    ('q.jpg' of q.jpg.png over q.jpg's beside a q.png); the registry settles the rest."""
    items = []
    for p in paths:
        url, rel = row_url(fs, p), split_url(p)[1][len(root_parts) :]
        recorded = registry.recorded(url, rel)  # also the same file under a renamed INPUT
        try:
            items.append((url, rel, recorded, recorded or key_from_parts(rel, url)))
        except DinosegError as e:
            items.append((url, rel, None, e))
    folds = [fold_key(key) if isinstance(key, str) else None for *_, key in items]
    counts: dict[str, int] = {}
    for f in folds:
        if f is not None:
            counts[f] = counts.get(f, 0) + 1
    rows: list[dict] = [{}] * len(items)
    shared = [f is not None and counts[f] > 1 for f in folds]
    # plain keys (and recorded paths, which keep theirs) first; then the keys with extension
    for i in sorted(range(len(items)), key=lambda i: shared[i] and items[i][2] is None):
        url, rel, recorded, key = items[i]
        if isinstance(key, DinosegError):
            rows[i] = list_error_row(url, str(key), "UnsafePath")
        elif recorded is not None:
            rows[i] = registry.claim(url, recorded, recorded=True)
        elif shared[i]:
            rows[i] = registry.claim(url, key_from_parts(rel, url, keep_extension=True))
        else:
            rows[i] = registry.claim(url, key)
    yield from rows
