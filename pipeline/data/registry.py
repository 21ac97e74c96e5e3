"""`KeyRegistry`: the keys given out in one listing, by the rules of `pipeline.data.keys`
(collisions, recorded keys kept and reserved)."""

from __future__ import annotations

import hashlib
from array import array
from typing import Mapping

import numpy as np

from model.errors import DinosegError
from pipeline.data.keys import (
    fold_key,
    identity,
    input_row,
    is_safe_key,
    key_from_parts,
    list_error_row,
    relative_name,
)


class KeyRegistry:
    """The keys given out in one listing, unique under `fold_key`, and the earlier run's.

    `recorded` maps a path's `identity` to the key an earlier run gave it (`recorded_keys`, or the
    same held as a `pipeline.data.recorded.RecordedKeys`): that path keeps it, and so does the same
    file relative to INPUT reached through another root (INPUT renamed, remounted, through a link,
    OUTPUT copied: see `recorded`). Every recorded key's fold is reserved from the start, so a
    newcomer listed first cannot take it; the keys of recorded paths that are not listed now
    (gone, or under another INPUT) stay reserved too, since their masks and rows are in OUTPUT and
    resume goes by key (a newcomer given one would be taken as done with another image's mask).
    `unlisted()` counts them.

    Memory: a mapping is used as given, not copied; the reservations are 8-byte hashes of their
    folds, in a sorted array; the keys taken in this run are one dict entry each (the fold string
    is the key itself where folding changes nothing). A reservation's owner is looked up only on a
    collision (an index built on the first one), which also makes a hash that merely collides
    harmless: a fold whose owner is not found is not reserved.
    """

    def __init__(self, recorded=None):
        self._book = recorded if hasattr(recorded, "relative_key") else _DictBook(recorded or {})
        self._taken: dict[str, str] = {}  # fold -> identity of the path listed in this run
        self._kept = 0  # reservations taken by their own path

    def recorded(self, path: str, rel: list[str] | None = None) -> str | None:
        """The key an earlier run gave `path`, or None. With `rel` (its components relative to
        INPUT), also the key of the file with that relative name recorded under another root."""
        key = self._book.get(identity(path))
        if key is not None:
            return key if key and is_safe_key(key) else None
        if not rel or not self._book.n_reserved:
            return None
        name = "/".join(rel)
        for keep_extension in (False, True):
            try:
                f = fold_key(key_from_parts(rel, path, keep_extension))
            except DinosegError:
                return None
            kept = self._book.relative_key(f, name) if f not in self._taken and self._book.is_reserved(f) else None
            if kept is not None:
                return kept
        return None

    def reserved(self, key: str) -> bool:
        """Whether `key` (its fold) is taken, or reserved for a recorded path."""
        f = fold_key(key)
        return f in self._taken or self._book.is_reserved(f)

    def unlisted(self) -> int:
        """How many recorded keys no path of this listing has taken (their inputs are gone or
        elsewhere): they stay reserved."""
        return self._book.n_reserved - self._kept

    def kept_elsewhere(self, n: int) -> None:
        """`n` reservations were taken by their own paths outside this registry (the rows of a
        vectorised listing that no other row's key could touch: `pipeline.data.claims`)."""
        self._kept += n

    def claim(self, path: str, key: str, recorded: bool = False) -> dict:
        """The row of `path`: its recorded key if it has one, else `key`; or a `list` error row
        when that key's fold is taken by another path (KeyCollision) or by this one, maybe through
        another presigned URL (DuplicateInput). `recorded`: `key` is what `recorded(path, rel)`
        returned, so it takes its reservation."""
        i = identity(path)
        if not recorded:
            kept = self._book.get(i)
            if kept and is_safe_key(kept):
                key, recorded = kept, True
        f = fold_key(key)
        if f == key:
            f = key  # one string for both: memory per input is the dict slot
        owner = self._taken.get(f)
        if owner is None:
            if self._book.is_reserved(f):
                if recorded:
                    self._kept += 1
                elif (owner := self._book.owner(f)) is not None:
                    return list_error_row(
                        path, _collision(path, key, owner, " (given by an earlier run)"), "KeyCollision"
                    )
            self._taken[f] = i
            return input_row(path, key)
        if owner == i:
            message = f"'{path}' is listed more than once: only its first listing is processed."
            return list_error_row(path, message, "DuplicateInput")
        return list_error_row(path, _collision(path, key, owner, ""), "KeyCollision")


class _DictBook:
    """KeyRegistry's book of recorded keys over an identity -> key mapping (a `RecordedKeys` is
    the other one): `get`, `n_reserved`, `is_reserved`, `owner`, `relative_key`."""

    def __init__(self, recorded: Mapping[str, str]):
        self._recorded = recorded
        hashes = array("Q", (_fold_hash(fold_key(k)) for k in recorded.values() if k and is_safe_key(k)))
        self._reserved = np.unique(np.frombuffer(hashes, np.uint64)) if hashes else np.zeros(0, np.uint64)
        del hashes
        self.n_reserved = len(self._reserved)
        self._owners: dict[str, str] | None = None  # fold -> recorded identity, on the first collision

    def get(self, identity: str) -> str | None:
        return self._recorded.get(identity)

    def is_reserved(self, fold: str) -> bool:
        i = int(np.searchsorted(self._reserved, np.uint64(_fold_hash(fold))))
        return i < len(self._reserved) and int(self._reserved[i]) == _fold_hash(fold)

    def owner(self, fold: str) -> str | None:
        """The recorded identity whose key has `fold` (the index is built on the first call)."""
        if self._owners is None:
            self._owners = {}
            for path, key in self._recorded.items():
                if key and is_safe_key(key):
                    self._owners.setdefault(fold_key(key), path)
        return self._owners.get(fold)

    def relative_key(self, fold: str, name: str) -> str | None:
        """The owner's key of `fold` when the owner's name relative to its INPUT is `name`."""
        owner = self.owner(fold)
        return (
            self._recorded[owner] if owner is not None and relative_name(owner, self._recorded[owner]) == name else None
        )


def _fold_hash(fold: str) -> int:
    return int.from_bytes(hashlib.blake2b(fold.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")


def _collision(path: str, key: str, owner: str, when: str) -> str:
    return (
        f"'{path}' would get the key '{key}', already used by '{owner}'{when} (keys that differ only by case "
        "or Unicode normalisation are one file on macOS and Windows disks): rename one of them."
    )
