"""Files under any fsspec URL: absolute local paths for the workers, and atomic writes (a reader
sees the old file or all of the new one).

A write that is not one atomic PUT goes through a temporary name of its own shape (`temp_name`:
hidden, short, ending in `.dinoseg-tmp`), which readers skip (`is_temp_name`) and the next run
removes (`sweep_temp_files`) when a kill left one behind."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re

import fsspec
from fsspec.implementations.local import LocalFileSystem

from model.errors import DinosegError
from model.storage import TEMP_SUFFIX, options_for, temp_name, write_local_atomic

log = logging.getLogger(__name__)


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


# Object stores whose single PUT (pipe_file) makes the object appear whole or not at all, a
# multipart upload included (the object exists only once the upload is completed). memory:// sets
# the whole value at once.
ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})
# Filesystems fsspec can read but not write: refused before any work, in one sentence.
READ_ONLY_PROTOCOLS = frozenset({"http", "https", "github", "zip", "tar", "libarchive"})

_TEMP_NAME = re.compile(r"\..*\.[0-9a-f]{8}" + re.escape(TEMP_SUFFIX), re.DOTALL)
# temp names of earlier versions (write_bytes_atomic's and the Parquet parts'), swept as well
_OLD_TEMP_NAME = re.compile(r"\.(?:.+\.[0-9a-f]{12}|part-[0-9a-f]{8}-\d{5}\.parquet)\.tmp", re.DOTALL)


def is_temp_name(name: str) -> bool:
    """Whether a file name (no folder) is one of dinoseg's temporary names, which readers ignore."""
    return bool(_TEMP_NAME.fullmatch(name) or _OLD_TEMP_NAME.fullmatch(name))


def check_writable(url: str) -> None:
    """DinosegError for a URL on a filesystem that cannot be written (http, zip...)."""
    protocol = fsspec.utils.get_protocol(url)
    if protocol in READ_ONLY_PROTOCOLS:
        raise DinosegError(
            f"{url} is on a read-only filesystem ({protocol}://): write to a local folder or an object store "
            "such as s3://bucket/out."
        )


def write_bytes_atomic(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write `data` to `url` so that readers see the old file, or all of the new one.

    Local: a temporary name (`temp_name`) in the same folder, then os.replace (no fsync: this
    guards against killed workers, not power loss, and an fsync per mask would dominate on network
    disks). Object stores (ATOMIC_PUT_PROTOCOLS): one PUT (`pipe_file`). Any other writable
    filesystem (sftp, ftp, webdav, smb, hdfs...), where a write streams into the name it is given:
    a temporary name, then `fs.mv`, a rename on those, so the final name never holds half a file;
    a kill leaves at most a temporary file, which readers ignore and the next run sweeps
    (`sweep_temp_files`). A name too long for the filesystem is one DinosegError."""
    check_writable(url)
    try:
        if is_local_url(url):
            write_local_atomic(LocalFileSystem._strip_protocol(url), data)
            return
        fs, path = fsspec.core.url_to_fs(url, **options_for(url, storage_options))
        if fsspec.utils.get_protocol(url) in ATOMIC_PUT_PROTOCOLS:
            fs.pipe_file(path, data)  # no makedirs fallback: on s3fs that would create a missing bucket
            return
        _write_then_move(fs, path, data)
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            raise
        longest = max(url.split("/"), key=lambda p: len(p.encode("utf-8", "surrogateescape")))
        raise DinosegError(
            f"{url} has a name of {len(longest.encode('utf-8', 'surrogateescape'))} bytes, too long for this "
            "filesystem (most allow 255 per name): shorten the input's name, or write OUTPUT to an object store."
        ) from None


def _write_then_move(fs, path: str, data: bytes) -> None:
    parent, _, name = path.rpartition("/")
    tmp = f"{parent}/{temp_name(name)}" if parent else temp_name(name)
    with contextlib.suppress(Exception):  # folders may be implicit; a real failure shows on the write
        fs.makedirs(parent, exist_ok=True)
    try:
        fs.pipe_file(tmp, data)
        try:
            fs.mv(tmp, path)
        except OSError:  # some servers refuse to rename onto an existing name: the old file goes first
            if not fs.exists(path):
                raise
            fs.rm(path)
            fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def sweep_temp_files(output: str, storage_options: dict | None = None) -> int:
    """Delete the temporary files (`is_temp_name`) that killed writes left under `output`;
    returns how many. Only dinoseg's own temp names, only under `output`, symlinked folders not
    followed. Call it once the run holds OUTPUT (nothing else writes there): a running writer's
    temp file would go too. Object stores (ATOMIC_PUT_PROTOCOLS) get no temp files, so are not
    listed."""
    if fsspec.utils.get_protocol(output) in ATOMIC_PUT_PROTOCOLS:
        return 0
    swept = 0
    if is_local_url(output):
        root = LocalFileSystem._strip_protocol(output)
        for folder, _dirs, files in os.walk(root):  # followlinks=False: never outside OUTPUT
            for name in files:
                if is_temp_name(name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(folder, name))
                        swept += 1
    else:
        fs, root = fsspec.core.url_to_fs(output, **options_for(output, storage_options))
        if not fs.exists(root):
            return 0
        for path in fs.find(root):
            if is_temp_name(path.rsplit("/", 1)[-1]):
                fs.rm(path)
                swept += 1
    if swept:
        log.info("removed %d temporary files that an interrupted run left under %s", swept, output)
    return swept


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
    fs, path = fsspec.core.url_to_fs(url, **options_for(url, storage_options))
    if fs.exists(path) and not overwrite:
        raise DinosegError(f"{url} exists already: pass --overwrite to replace it, or another {option}.")
