"""Where INPUT and OUTPUT are, compared: an OUTPUT inside INPUT (the next run would segment its
own masks), or an INPUT inside the folders a run writes, is refused before anything is written.

Locations are compared canonically: the protocol's one name (s3a is s3, gcs is gs, file is local)
and a path; local paths as real paths (symbolic links resolved, also for the part of OUTPUT that
does not exist yet). An object store's key is kept as it is written: S3 stores `in/../out/a.png`
under the prefix `in/`, so `.` and `..` are never resolved there, and a '..' in an object-store
INPUT or OUTPUT is refused (it names no parent folder). Other remote filesystems (sftp, hdfs...)
resolve them as a filesystem does. A manifest lists fixed paths, so it is not a folder to nest in;
a glob is its folder before the first wildcard."""

from __future__ import annotations

import os
import posixpath

import fsspec

from model.errors import DinosegError
from pipeline.io.files import ATOMIC_PUT_PROTOCOLS, is_local_url

_SAME_PROTOCOL = {"s3a": "s3", "gcs": "gs", "file": "local", "abfss": "abfs"}
MANIFEST_EXTENSIONS = (".txt", ".csv", ".parquet")  # as pipeline.data.manifest reads them
WRITTEN_FOLDERS = ("masks", "overlays", "confidence")  # the image folders a run writes


def canonical(url: str) -> tuple[str, str]:
    """(protocol, path) of a local path or fsspec URL as compared: a local real path, an object
    store's key as written, another filesystem's normalised path."""
    protocol = fsspec.utils.get_protocol(url)
    if is_local_url(url):
        path = url.split("://", 1)[1] if "://" in url else url
        return "local", os.path.realpath(os.path.expanduser(path))
    path = (url.split("://", 1)[1] if "://" in url else url).split("?", 1)[0]
    if protocol in ATOMIC_PUT_PROTOCOLS:  # keys are literal: "a/../b" is a key under "a/"
        return _SAME_PROTOCOL.get(protocol, protocol), path.strip("/")
    path = posixpath.normpath("/" + path).lstrip("/")
    return _SAME_PROTOCOL.get(protocol, protocol), path


def _refuse_dot_dot(url: str, what: str) -> None:
    """DinosegError for an object-store URL with a '..' component, which the store keeps literally."""
    if fsspec.utils.get_protocol(url) not in ATOMIC_PUT_PROTOCOLS:
        return
    path = (url.split("://", 1)[1] if "://" in url else url).split("?", 1)[0]
    if ".." in path.split("/"):
        raise DinosegError(
            f"{what} {url} has a '..' in its path, which an object store keeps as part of the key (it does not "
            "go up a folder): give the path without '..'."
        )


def _folder_of_input(url: str) -> str | None:
    """The folder INPUT's keys are relative to; None for a manifest."""
    if url.lower().rstrip("/").endswith(MANIFEST_EXTENSIONS):
        return None
    for i, ch in enumerate(url):
        if ch in "*?[":
            return url[:i].rsplit("/", 1)[0] or "/"
    return url


def _inside(path: tuple[str, str], folder: tuple[str, str]) -> bool:
    (p_proto, p), (f_proto, f) = path, folder
    if p_proto != f_proto:
        return False
    f = f.rstrip("/")
    return p == f or p.startswith(f + "/") or f == ""


def refuse_nesting(input: str, output: str) -> None:
    """DinosegError when OUTPUT lies inside INPUT, or INPUT inside what a run writes into OUTPUT."""
    _refuse_dot_dot(input, "INPUT")
    _refuse_dot_dot(output, "OUTPUT")
    folder = _folder_of_input(input)
    out = canonical(output.rstrip("/") or output)
    if folder is not None and _inside(out, canonical(folder)):
        raise DinosegError(
            f"OUTPUT {output} is inside INPUT {input}: the next run would segment its own masks; "
            "give an OUTPUT outside INPUT."
        )
    here = canonical(input)
    for name in WRITTEN_FOLDERS:
        written = (out[0], f"{out[1].rstrip('/')}/{name}")
        if _inside(here, written):
            raise DinosegError(
                f"INPUT {input} is inside OUTPUT's {name}/ folder, which this run writes: "
                "give an INPUT outside OUTPUT, or another OUTPUT."
            )
