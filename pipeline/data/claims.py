"""Keys claimed for listed inputs: one entry or one folder at a time (`claim_entry`,
`claim_folder`: the rules of `pipeline.data.keys`, row by row in a `KeyRegistry`), or for a whole
listing at once (`ListingClaims`).

A listing source (a folder walk, a manifest) proposes rows (PROPOSAL): a path, its name relative to
INPUT (`rel`), its plain key (null when the path is unsafe, `error_message` saying why), whether
it keeps its extension (`shared`: a manifest entry whose stem another entry shares), whether a
plain key of another entry forbids that (`yields`), and its `group` (the folder it was listed in;
for a manifest each entry is its own). Rows with another `error_type` are final errors.

The whole-listing pass reads the proposals twice. The first pass gives every row the folds it
could claim: its recorded key's (when an earlier run recorded its path), else its plain key's and,
in a folder, its key with extension's (a manifest's row claims one of them, known beforehand). A
row none of whose folds another row could claim, that no recorded key may reserve, and that is no
`yields` row depends on no other row: its outcome is settled in Arrow (its recorded key, or its own
key). Every other row is claimed in a `KeyRegistry` by `claim_entry`/`claim_folder` in listing
order, the settled rows being absent from it, which changes nothing: none of them claims a fold
these rows could touch. So the rows and their order are exactly those of a listing claimed row by
row, and the Python work is only for collisions, aliases and renamed INPUTs.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model.errors import DinosegError
from pipeline.data.keys import fold_key, key_from_parts, list_error_row
from pipeline.data.recorded import RecordedKeys, identities
from pipeline.data.registry import KeyRegistry
from pipeline.data.strings import fold_keys, hashes

PROPOSAL = pa.schema(
    [
        ("path", pa.string()),
        ("rel", pa.string()),
        ("key", pa.string()),
        ("shared", pa.bool_()),
        ("yields", pa.bool_()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("group", pa.int64()),
    ]
)
ROW = pa.schema([(n, pa.string()) for n in ("path", "key", "error_stage", "error_type", "error_message")])
UNSAFE = "UnsafePath"


def parts_of(rel: str | None) -> list[str]:
    return rel.split("/") if rel else []


def claim_entry(registry: KeyRegistry, url: str, rel: list[str], shared: bool, yields: bool) -> dict:
    """The row of one manifest entry (see `pipeline.data.manifest`)."""
    # an earlier run's key, whatever the common folder is now; or the key of the entry with the
    # same name relative to it, when all entries moved (another bucket prefix, host or mount)
    kept = registry.recorded(url, rel)
    if kept is not None:
        return registry.claim(url, kept, recorded=True)
    try:
        key = key_from_parts(rel, url)
    except DinosegError as e:
        return list_error_row(url, str(e), UNSAFE)
    if shared:
        key = key_from_parts(rel, url, keep_extension=True)
        if yields and not registry.reserved(key):  # the plain key of another entry wins
            return list_error_row(
                url,
                f"'{url}' would get the key '{key}', already used by another entry without extension: "
                "rename one of them or list only one.",
                "KeyCollision",
            )
    return registry.claim(url, key)


def claim_folder(registry: KeyRegistry, entries: list[tuple[str, list[str]]]) -> list[dict]:
    """Rows for one folder's files (url, components relative to INPUT), in order: stems shared
    (under `fold_key`) within the folder keep their extension; plain keys are claimed before
    extension keys, so a plain key wins ('q.jpg' of q.jpg.png over q.jpg's beside a q.png); the
    registry settles the rest."""
    items = []
    for url, rel in entries:
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
            rows[i] = list_error_row(url, str(key), UNSAFE)
        elif recorded is not None:
            rows[i] = registry.claim(url, recorded, recorded=True)
        elif shared[i]:
            rows[i] = registry.claim(url, key_from_parts(rel, url, keep_extension=True))
        else:
            rows[i] = registry.claim(url, key)
    return rows


class ListingClaims:
    """The keys of a whole listing (see the module docstring): `count` each batch of proposals,
    then `rows` of each batch, in the same order. `folders`: the groups are folders of a walk,
    else entries of a manifest. `mark_done`: the rows get a `done` column, whether an earlier run
    finished their key (`RecordedKeys.done_mask`)."""

    def __init__(self, book: RecordedKeys, folders: bool, mark_done: bool = False):
        self.book, self.folders, self.mark_done = book, folders, mark_done
        self.registry = KeyRegistry(book)
        self._rows: list[np.ndarray] = []  # per batch: the recorded row whose key a proposal keeps, or -1
        self._alone: list[np.ndarray] = []  # per batch: not settled on its own (reservations, yields)
        self._folds: list[np.ndarray] = []  # per batch: the first fold each row may claim (`_short`)
        self._more: list[tuple[np.ndarray, np.ndarray]] = []  # (rows, hashes): the second ones
        self._has: list[np.ndarray] = []  # per batch: the rows that claim a fold at all
        self._offset = 0
        self._care: np.ndarray | None = None
        self.listed = 0  # proposals counted

    def count(self, batch: pa.RecordBatch) -> None:
        n, o = len(batch), self._offset
        claimable = pc.fill_null(pc.is_in(batch["error_type"], pa.array(["", UNSAFE])), False).to_numpy(False)
        rows = self.book.lookup(identities(batch["path"])) if len(self.book) else np.full(n, -1, np.int64)
        rows[~claimable] = -1
        present = rows >= 0
        recorded = present.copy()
        recorded[present] = self.book.safe[rows[present]]
        plain = claimable & ~recorded & batch["key"].is_valid().to_numpy(False)
        folds = np.zeros(n, np.int64)
        has = recorded | plain
        if recorded.any():
            folds[recorded] = self.book.fold_hashes(rows[recorded])
        alone = np.zeros(n, bool)
        if plain.any():
            idx = np.flatnonzero(plain)
            # a proposed key and name are made of a path's parts: nothing to fold but case
            f1 = hashes(fold_keys(batch["key"].take(pa.array(idx)), safe=True))
            f2 = hashes(fold_keys(batch["rel"].take(pa.array(idx)), safe=True))
            shared = batch["shared"].take(pa.array(idx)).to_numpy(False)
            own = np.where(shared, f2, f1)
            touchy = self.book.reserved_mask(own)
            if self.book.n_reserved:  # an unrecorded path may take a key recorded under another root
                touchy |= ~present[idx] & (self.book.reserved_mask(f1) | self.book.reserved_mask(f2))
            touchy |= batch["yields"].take(pa.array(idx)).to_numpy(False)
            alone[idx] = touchy
            both = touchy | self.folders  # may claim either fold
            folds[idx] = np.where(both, f1, own)
            second = both & (f1 != f2)
            self._more.append((idx[second] + o, _short(f2[second])))
        self._rows.append(np.where(recorded, rows, -1).astype(np.int32))  # the rows keeping a recorded key
        self._alone.append(alone)
        self._folds.append(_short(np.where(has, folds, 0)))
        self._has.append(has)
        self._offset += n
        self.listed += n

    def settle(self) -> None:
        """After the last `count`: which rows must be claimed one by one."""
        every = np.concatenate([f[h] for f, h in zip(self._folds, self._has, strict=True)] + [m for _, m in self._more])
        every.sort()  # in place: the listing's short hashes are held twice at most
        repeated = np.unique(every[1:][every[1:] == every[:-1]])
        del every
        care = [a | (h & _within(f, repeated)) for f, h, a in zip(self._folds, self._has, self._alone, strict=True)]
        self._care = _joined(care, bool)
        for rows, more in self._more:
            self._care[rows[_within(more, repeated)]] = True
        self._rows = [_joined(self._rows, np.int32)]
        self._folds = self._more = self._alone = self._has = None
        self._offset = 0

    def rows(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """ROW batch for `batch` (the proposals given to `count`, in the same order)."""
        n, o = len(batch), self._offset
        self._offset += n
        rows, care = self._rows[0][o : o + n], self._care[o : o + n]
        recorded = (rows >= 0) & ~care
        self.registry.kept_elsewhere(int(recorded.sum()))
        claimable = pc.fill_null(pc.is_in(batch["error_type"], pa.array(["", UNSAFE])), False).to_numpy(False)
        good = (recorded | (claimable & batch["key"].is_valid().to_numpy(False))) & ~care
        key = pc.if_else(batch["shared"], batch["rel"], batch["key"])
        if recorded.any():
            key = pc.replace_with_mask(key, pa.array(recorded), self.book.keys.take(rows[recorded]))
        good_mask = pa.array(good)
        columns = [
            batch["path"],
            pc.if_else(good_mask, key, ""),
            pc.if_else(good_mask, "", "list"),
            pc.if_else(good_mask, "", batch["error_type"]),
            pc.if_else(good_mask, "", batch["error_message"]),
        ]
        claimed = list(self._claimed(batch, np.flatnonzero(care)))
        if claimed:
            mask = pa.array(care)
            for c, name in enumerate(ROW.names):
                columns[c] = pc.replace_with_mask(
                    columns[c], mask, pa.array([r[name] for _, r in claimed], pa.string())
                )
        out = pa.RecordBatch.from_arrays([pc.cast(c, pa.string()) for c in columns], schema=ROW)
        if not self.mark_done:
            return out
        return out.append_column("done", pa.array(self._done(out, good, recorded, rows)))

    def _done(self, out: pa.RecordBatch, good: np.ndarray, recorded: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Whether each row's key is done: a kept recorded key of a predictions row is; any other
        key is looked up among the done keys (the rows claimed one by one included)."""
        done = np.zeros(len(out), bool)
        done[recorded] = self.book.is_done_row(rows[recorded])
        ask = (good & ~done) | (~good & pc.equal(out["error_stage"], "").to_numpy(False))
        if ask.any():
            keys = out["key"].filter(pa.array(ask))
            done[ask] = self.book.done_mask(keys, hashes(fold_keys(keys, safe=True)))
        return done

    def _claimed(self, batch: pa.RecordBatch, idx: np.ndarray):
        """(index, row) of the rows claimed one by one, folder by folder (or entry by entry)."""
        if not len(idx):
            return
        take = pa.array(idx)
        paths, rels = batch["path"].take(take).to_pylist(), batch["rel"].take(take).to_pylist()
        if not self.folders:
            shared, yields = batch["shared"].take(take).to_pylist(), batch["yields"].take(take).to_pylist()
            for j, i in enumerate(idx.tolist()):
                yield i, claim_entry(self.registry, paths[j], parts_of(rels[j]), shared[j], yields[j])
            return
        groups = batch["group"].take(take).to_numpy(False)
        starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
        for a, b in zip(starts, np.r_[starts[1:], len(idx)], strict=True):
            entries = [(paths[j], parts_of(rels[j])) for j in range(a, b)]
            yield from zip(idx[a:b].tolist(), claim_folder(self.registry, entries), strict=True)


def _short(fold_hashes: np.ndarray) -> np.ndarray:
    """32 bits of each fold hash: enough to find the folds no other row can claim (a fold whose
    short hash no other row has is surely alone; a false repeat only sends rows to the registry)."""
    return fold_hashes.astype(np.uint32)  # the low 32 bits


def _within(values: np.ndarray, ordered: np.ndarray) -> np.ndarray:
    """Whether each value is in `ordered` (sorted, distinct; a binary search: `np.isin` would sort
    a copy of `values` with it)."""
    if not len(ordered):
        return np.zeros(len(values), bool)
    pos = np.minimum(np.searchsorted(ordered, values), len(ordered) - 1)
    return ordered[pos] == values


def _joined(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype)
