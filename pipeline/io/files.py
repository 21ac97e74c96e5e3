"""Files under any fsspec URL: absolute local paths for the workers, and atomic writes (a reader
sees the old file or all of the new one)."""

from __future__ import annotations

import contextlib
import os
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

from model.errors import DinosegError


def join_url(output: str, *parts: str) -> str:
    if not output:
        raise DinosegError("the output location is empty: give a folder or a URL such as s3://bucket/out.")
    return "/".join([output.rstrip("/"), *parts])


def is_local_url(url: str) -> bool:
    return fsspec.utils.get_protocol(url) in ("file", "local")


def absolute_output(output: str) -> str:
    """A local output as an absolute path (Ray workers run in another folder); URLs unchanged."""
    if not output:
        raise DinosegError("the output location is empty: give a folder or a URL such as s3://bucket/out.")
    if is_local_url(output) and "://" not in output:
        return os.path.abspath(os.path.expanduser(output))
    return output


def absolute_input(url: str | None) -> str | None:
    """A local file the workers will read (a head, weights) as an absolute path; URLs, None and
    the word 'random' unchanged."""
    if not url or url == "random" or "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def write_bytes_atomic(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write `data` to `url` so that readers see the old file, or all of the new one.

    Local: a temporary name in the same folder, then os.replace (no fsync: this guards against
    killed workers, not power loss, and an fsync per mask would dominate on network disks).
    Remote: one PUT (`pipe_file`), which object stores apply atomically."""
    if is_local_url(url):
        path = LocalFileSystem._strip_protocol(url)
        parent = os.path.dirname(path) or "."
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, unlike mkstemp's 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.pipe_file(path, data)  # no makedirs fallback: on s3fs that would create a missing bucket


def bounded_map(fn, items, threads: int, name: str = "dinoseg-io"):
    """fn over items in a thread pool (object-store GETs mostly wait on the network), results in
    order, with at most 2 x threads in flight: a full pool.map would queue a future per item, and
    finished results would wait in memory for the slowest."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads, thread_name_prefix=name) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def refuse_to_replace(url: str, overwrite: bool, storage_options: dict | None, option: str) -> None:
    """Nothing a user made is replaced silently: raise DinosegError naming `option` when `url`
    exists and `overwrite` is not set."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if fs.exists(path) and not overwrite:
        raise DinosegError(f"{url} exists already: pass --overwrite to replace it, or another {option}.")
