"""What a listed path becomes: its key, the URL its row holds, and the row itself. Shared by
folder listing (`pipeline.data.walk`, `pipeline.data.sources`) and manifests
(`pipeline.data.manifest`).

Keys. An input's key is its path relative to the INPUT root, without extension, '/'-separated;
its mask is OUTPUT/masks/<key>.png. Only '/' separates (and '\\' in local paths on Windows, where
it cannot be part of a name). Empty and '.' components are dropped (S3's `x//y.jpg` and
`x/./y.jpg` are objects of their own: the aliases this makes are caught as below). A name with a
backslash (possible on POSIX and object stores) is refused rather than kept or split: a key
must name one file on every disk OUTPUT may be copied to, and on Windows, in zip exports and
on SMB mounts a backslash is a separator (the mask writer refuses such keys too). A '..'
component, a NUL or a '::' (fsspec's URL chaining) make a path unsafe as well: it becomes a
`list` error row (UnsafePath), never a key.

Collisions. Files whose keys differ only by extension (a.jpg, a.png in one folder) all keep
their extension in the key ('a.jpg', 'a.png'), whatever order they are listed in, so adding a
third later can never hand its key to a file that already has a mask. Beyond that, a key is
unique over the whole listing under `fold_key`: the form in which two keys name the same file
on the most forgiving output disk (case-insensitive as macOS and Windows are, Unicode-normalising
as macOS is). A key already taken in that sense (`X/b` for `x/b`, an NFD 'é' for an NFC one, a
key that S3's `x//b.jpg` shares with `x/b.jpg`, the same path listed twice) makes the newcomer a
`list` error row naming both paths: nothing is silently overwritten, nothing is lost.

Stability. A re-run hands the listing what the earlier run recorded (`recorded_keys`: path ->
key from predictions/ and errors/): a recorded path keeps its key whatever siblings appeared
since, and no newcomer can take a recorded key, even one whose image is gone (its mask is there,
and resume goes by key). A path is compared by its `identity`, the form rows store: without a
URL's user-info or presigned query, which change from run to run. In a folder, the same file
relative to INPUT keeps its key too when INPUT is reached by another path (renamed, remounted,
through a link, OUTPUT copied along); pointing OUTPUT at another folder with the same relative
names therefore resumes them (give another OUTPUT, or --overwrite).
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from array import array
from functools import lru_cache
from typing import Mapping

import fsspec
import numpy as np
from fsspec.core import split_protocol

from model.errors import DinosegError
from model.redact import redact_url
from pipeline.data.schema import ERROR_FIELDS

# a backslash separates only in local paths on Windows (checked when called: tests flip it)
WINDOWS_LOCAL = os.name == "nt"
_BACKSLASH_OR_SLASH = re.compile(r"[\\/]")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")  # matched case-insensitively


# ---- keys ------------------------------------------------------------------------------------


def extension(name: str) -> str:
    return os.path.splitext(name)[1][1:].lower()


def is_image_name(name: str) -> bool:
    return extension(name) in IMAGE_EXTENSIONS


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
    """(canonical protocol, path components): '/' splits (and '\\' in local paths on Windows);
    empty and '.' parts are dropped."""
    protocol, path = split_protocol(url)
    protocol = canonical_protocol(protocol)
    if protocol in ("http", "https"):  # user-info and a query are credentials (presigned URLs), not names
        host, _, rest = path.partition("/")
        path = f"{host.rsplit('@', 1)[-1]}/{rest.split('#', 1)[0].split('?', 1)[0]}"
    parts = _BACKSLASH_OR_SLASH.split(path) if protocol == "file" and WINDOWS_LOCAL else path.split("/")
    return protocol, [c for c in parts if c not in ("", ".")]


def key_from_parts(rel: list[str], path: str, keep_extension: bool = False) -> str:
    if not rel:
        raise DinosegError(f"'{path}' names no file: list image files, not folders.")
    if any("\x00" in c or "::" in c for c in rel):
        raise DinosegError(f"'{path}' holds a NUL or '::', which cannot be part of an output name: rename the file.")
    if any("\\" in c for c in rel):
        raise DinosegError(
            f"'{path}' has a backslash in its name, which Windows, zip files and some mounts read as a folder "
            "separator (its mask could land on another's): rename the file."
        )
    if ".." in rel:
        raise DinosegError(
            f"'{path}' has a '..' component, so its mask could land outside OUTPUT: list it without '..'."
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


def fold_key(key: str) -> str:
    """`key` as the most forgiving output disk sees it: two keys with one fold are one file there.

    Backslashes are separators (Windows: keys hold none, but a fold never lets one
    through), empty and '.' components vanish, and case and Unicode
    normalisation are folded by Unicode's canonical caseless match, NFC(casefold(NFD(key))):
    what macOS (case-insensitive and normalisation-insensitive) and Windows (case-insensitive)
    equate. Canonical (NFC), not compatibility (NFKC), equivalence: no filesystem takes a
    superscript '²' for '2' or a full-width 'Ａ' for 'A', so folding those would refuse inputs that
    every disk keeps apart. Full case folding errs the other way on a few pairs ('ß' and 'ss'):
    a false alarm costs an error row that names both files, a miss would cost a mask.
    """
    parts = [c for c in _BACKSLASH_OR_SLASH.split(key) if c not in ("", ".")]
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", "/".join(parts)).casefold())


def is_safe_key(key: str) -> bool:
    """A key that lands under OUTPUT/masks on any disk (for keys read back from earlier runs)."""
    if not key or key.startswith("/") or any(c in key for c in ("\\", "\x00", "::")):
        return False
    return not any(c in ("", ".", "..") for c in key.split("/"))


def identity(path: str) -> str:
    """`path` as OUTPUT's rows hold it, the identity resume compares: without the credentials a URL
    may carry (user-info, a presigned query: `model.redact`), so that one object reached through
    another signature is the same input (DuplicateInput within a listing)."""
    return redact_url(path) if "@" in path or "?" in path else path


def relative_name(path: str, key: str) -> str:
    """The name relative to INPUT of the file an earlier run listed at `path` with `key`: the
    key's folders and the file's own name (what stays when INPUT is renamed or remounted)."""
    _, parts = split_url(path)
    return "/".join(key.split("/")[:-1] + parts[-1:])


class KeyRegistry:
    """The keys given out in one listing, unique under `fold_key`, and the earlier run's.

    `recorded` maps a path's `identity` to the key an earlier run gave it (`recorded_keys`): that
    path keeps it, and so does the same file relative to INPUT reached through another root (INPUT
    renamed, remounted, through a link, OUTPUT copied: see `recorded`). Every recorded key's fold
    is reserved from the start, so a newcomer listed first cannot take it; the keys of recorded
    paths that are not listed now (gone, or under another INPUT) stay reserved too, since their
    masks and rows are in OUTPUT and resume goes by key (a newcomer given one would be taken as
    done with another image's mask). `unlisted()` counts them.

    Memory: `recorded` is used as given, not copied; the reservations are 8-byte hashes of their
    folds, in a sorted array; the keys taken in this run are one dict entry each (the fold string
    is the key itself where folding changes nothing). A reservation's owner is looked up only on a
    collision (an index built on the first one), which also makes a hash that merely collides
    harmless: a fold whose owner is not found is not reserved.
    """

    def __init__(self, recorded: Mapping[str, str] | None = None):
        self._recorded: Mapping[str, str] = recorded or {}
        hashes = array("Q", (_fold_hash(fold_key(k)) for k in self._recorded.values() if k and is_safe_key(k)))
        self._reserved = np.unique(np.frombuffer(hashes, np.uint64)) if hashes else np.zeros(0, np.uint64)
        del hashes
        self._taken: dict[str, str] = {}  # fold -> identity of the path listed in this run
        self._owners: dict[str, str] | None = None  # fold -> recorded identity, on the first collision
        self._kept = 0  # reservations taken by their own path

    def recorded(self, path: str, rel: list[str] | None = None) -> str | None:
        """The key an earlier run gave `path`, or None. With `rel` (its components relative to
        INPUT), also the key of the file with that relative name recorded under another root."""
        key = self._recorded.get(identity(path))
        if key is not None:
            return key if key and is_safe_key(key) else None
        if not rel or not len(self._reserved):
            return None
        name = "/".join(rel)
        for keep_extension in (False, True):
            try:
                f = fold_key(key_from_parts(rel, path, keep_extension))
            except DinosegError:
                return None
            owner = self._owner(f) if f not in self._taken and self._is_reserved(f) else None
            if owner is not None and relative_name(owner, self._recorded[owner]) == name:
                return self._recorded[owner]
        return None

    def reserved(self, key: str) -> bool:
        """Whether `key` (its fold) is taken, or reserved for a recorded path."""
        f = fold_key(key)
        return f in self._taken or self._is_reserved(f)

    def unlisted(self) -> int:
        """How many recorded keys no path of this listing has taken (their inputs are gone or
        elsewhere): they stay reserved."""
        return len(self._reserved) - self._kept

    def claim(self, path: str, key: str, recorded: bool = False) -> dict:
        """The row of `path`: its recorded key if it has one, else `key`; or a `list` error row
        when that key's fold is taken by another path (KeyCollision) or by this one, maybe through
        another presigned URL (DuplicateInput). `recorded`: `key` is what `recorded(path, rel)`
        returned, so it takes its reservation."""
        i = identity(path)
        if not recorded:
            kept = self._recorded.get(i)
            if kept and is_safe_key(kept):
                key, recorded = kept, True
        f = fold_key(key)
        if f == key:
            f = key  # one string for both: memory per input is the dict slot
        owner = self._taken.get(f)
        if owner is None:
            if self._is_reserved(f):
                if recorded:
                    self._kept += 1
                elif (owner := self._owner(f)) is not None:
                    return list_error_row(
                        path, _collision(path, key, owner, " (given by an earlier run)"), "KeyCollision"
                    )
            self._taken[f] = i
            return input_row(path, key)
        if owner == i:
            message = f"'{path}' is listed more than once: only its first listing is processed."
            return list_error_row(path, message, "DuplicateInput")
        return list_error_row(path, _collision(path, key, owner, ""), "KeyCollision")

    def _is_reserved(self, fold: str) -> bool:
        i = int(np.searchsorted(self._reserved, np.uint64(_fold_hash(fold))))
        return i < len(self._reserved) and int(self._reserved[i]) == _fold_hash(fold)

    def _owner(self, fold: str) -> str | None:
        """The recorded identity whose key has `fold` (the index is built on the first call)."""
        if self._owners is None:
            self._owners = {}
            for path, key in self._recorded.items():
                if key and is_safe_key(key):
                    self._owners.setdefault(fold_key(key), path)
        return self._owners.get(fold)


def _fold_hash(fold: str) -> int:
    return int.from_bytes(hashlib.blake2b(fold.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")


def _collision(path: str, key: str, owner: str, when: str) -> str:
    return (
        f"'{path}' would get the key '{key}', already used by '{owner}'{when} (keys that differ only by case "
        "or Unicode normalisation are one file on macOS and Windows disks): rename one of them."
    )


def recorded_keys(output: str, storage_options: dict | None = None) -> dict[str, str]:
    """`identity(path)` -> key of every row an earlier run left in OUTPUT's predictions/ and
    errors/ parts (the key a re-run keeps for that path); a predicted row's key wins over an error
    row's. Parts hold paths redacted already; rows of older versions may not be."""
    from pipeline.io.parts import read_parts

    out: dict[str, str] = {}
    for folder in ("errors", "predictions"):
        table = read_parts(f"{output.rstrip('/')}/{folder}", ["path", "key"], storage_options)
        if table is not None:
            for path, key in zip(table["path"].to_pylist(), table["key"].to_pylist(), strict=True):
                if path and key:
                    out[identity(path)] = key
    return out


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
