"""What earlier runs recorded, held for a listing of millions of inputs: `RecordedKeys`.

The same content as `recorded_keys` (`pipeline.data.keys`), identity(path) -> key of every row in
OUTPUT's errors/ then predictions/ parts with a predicted row's key winning, and which keys are
done (a predictions row has them), kept as one Arrow array of keys and numpy indexes instead of
Python dicts and sets (about 70 bytes an input instead of 200-300):

- identities by two independent 64-bit hashes (128 bits: equal hashes are taken as equal paths;
  the paths themselves are not held, and an owner's path named in a message is read back from
  its part when one is needed);
- keys by the hash of their fold (`fold_key`), sorted, for the reservations (`KeyRegistry`'s
  rules: a hash says a fold may be reserved, the fold compared exactly says whose it is) and for
  the done keys (each candidate's key compared exactly).

It serves `KeyRegistry` as its book of recorded keys (`get`, `is_reserved`, `owner`,
`relative_key`, `n_reserved`), and the vectorised listing (`lookup`, `reserved_mask`,
`done_mask`, `fold_hashes`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.strings import Blocks, any_byte, as_array, fold_keys, hashes, safe_keys

# (paths, keys, done, read the paths again: None when `paths` is held)
Chunk = tuple[pa.Array, pa.Array, bool, Callable[[], pa.Array] | None]


def identities(paths) -> pa.Array:
    """`identity` of each path: the rows with user-info or a query redacted, one by one."""
    from pipeline.data.keys import identity

    paths = as_array(paths)
    if not any_byte(paths, b"@?"):
        return paths
    odd = pc.fill_null(pc.match_substring_regex(paths, "[@?]"), False)
    return pc.replace_with_mask(paths, odd, pa.array([identity(p) for p in paths.filter(odd).to_pylist()], paths.type))


class Column:
    """A numpy array appended to chunk by chunk, into blocks of BLOCK values allocated once each
    (a list of small arrays concatenated at the end would leave the heap in holes, which the
    process keeps: a few hundred MB for millions of rows)."""

    BLOCK = 1 << 20

    def __init__(self, dtype):
        self.dtype, self.blocks, self.filled = dtype, [], 0

    def append(self, values: np.ndarray) -> None:
        done = 0
        while done < len(values):
            if not self.blocks or self.filled == self.BLOCK:
                self.blocks.append(np.empty(self.BLOCK, self.dtype))
                self.filled = 0
            n = min(len(values) - done, self.BLOCK - self.filled)
            self.blocks[-1][self.filled : self.filled + n] = values[done : done + n]
            self.filled, done = self.filled + n, done + n

    def array(self) -> np.ndarray:
        """All values in one array (the blocks are let go)."""
        if not self.blocks:
            return np.zeros(0, self.dtype)
        self.blocks[-1] = self.blocks[-1][: self.filled]
        out = np.empty(sum(map(len, self.blocks)), self.dtype)
        at = 0
        while self.blocks:  # each block let go once copied: the values held once, and one block
            block = self.blocks.pop(0)
            out[at : at + len(block)] = block
            at += len(block)
            del block
        return out


class RecordedKeys:
    """identity -> key of earlier runs' rows, and their done keys (see the module docstring).
    Built by `from_chunks` (rows in the order `recorded_keys` reads them) or `from_mapping`;
    about 65 bytes a row: the key, three hashes, three row numbers, three flags."""

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str]) -> "RecordedKeys":
        """From identity -> key (as `recorded_keys` returns it); no key is done."""
        paths = pa.array(list(mapping), pa.string())
        return cls.from_chunks([(paths, pa.array(list(mapping.values()), pa.string()), False, None)], rows=True)

    @classmethod
    def from_chunks(cls, chunks: Iterable[Chunk], rows: bool = False) -> "RecordedKeys":
        """From (paths, keys, done, reread) chunks in reading order. `rows`: the paths are
        identities already and every row counts (a mapping's items), not only rows with a path
        and a key."""
        book = cls()
        book.keys, book._sources, starts = Blocks(), [], [0]
        types = {"h1": np.int64, "h2": np.int64, "valid": bool, "fold": np.int64, "safe": bool, "done": bool}
        columns = {name: Column(dtype) for name, dtype in types.items()}
        for paths, keys, done, reread in chunks:
            paths, keys = as_array(paths), as_array(keys)
            ids = paths if rows else identities(paths)
            named = pc.and_(pc.greater(pc.utf8_length(paths), 0), pc.greater(pc.utf8_length(keys), 0))
            columns["valid"].append(np.ones(len(keys), bool) if rows else pc.fill_null(named, False).to_numpy(False))
            columns["h1"].append(hashes(ids))
            columns["h2"].append(hashes(ids, lane=1))
            safe = safe_keys(keys)
            columns["fold"].append(hashes(fold_keys(keys, safe)))
            columns["safe"].append(safe)
            columns["done"].append(np.full(len(keys), done) & pc.is_valid(keys).to_numpy(False))
            book.keys.append(keys)
            book._sources.append(reread or ids)
            starts.append(starts[-1] + len(keys))
        book._starts = np.asarray(starts, np.int64)
        joined = {name: column.array() for name, column in columns.items()}  # one column at a time
        del columns
        book._index(joined.pop("h1"), joined.pop("h2"), joined.pop("valid").astype(bool))
        book.safe = joined.pop("safe").astype(bool)  # per row: whether its key is safe (`is_safe_key`)
        book._fold_index(joined.pop("fold"), book.safe, joined.pop("done").astype(bool))
        book._fetched = {}  # the paths of the last chunk an owner was read back from
        return book

    def _index(self, h1: np.ndarray, h2: np.ndarray, valid: np.ndarray) -> None:
        """The identity index: per distinct identity, sorted by (h1, h2), its winner (last) row,
        and (`_first`, for `_fold_index`) its first row: where `recorded_keys`' dict has it."""
        rows = None if valid.all() else np.flatnonzero(valid)
        if rows is not None:
            h1, h2 = h1[rows], h2[rows]
        order = np.argsort(h1, kind="stable")  # rows in order within equal hashes
        h1 = h1[order]
        h2 = h2[order]
        rows = (order if rows is None else rows[order]).astype(np.int32)
        del order
        _sort_runs(h1, [h2, rows])  # equal h1 of different identities (2^-64 a pair): by (h2, row)
        new = np.ones(len(rows), bool)
        new[1:] = (h1[1:] != h1[:-1]) | (h2[1:] != h2[:-1])
        if new.all():
            self._h1, self._h2, self._winner, self._first = h1, h2, rows, None
            return
        first = np.flatnonzero(new)
        last = np.append(first[1:], len(rows)) - 1
        self._h1, self._h2 = h1[first], h2[first]
        self._winner, self._first = rows[last], rows[first]

    def _fold_index(self, fold: np.ndarray, safe: np.ndarray, done: np.ndarray) -> None:
        """Fold hashes of the winners with safe keys (reservations: within equal hashes in the order
        of `recorded_keys`' dict, so the first one whose fold matches is the owner) and of the done
        rows, sorted; `n_reserved` distinct reserved hashes."""
        n = len(fold)
        winner = np.zeros(n, bool)
        winner[self._winner] = safe[self._winner]
        entries = winner | done
        if entries.all():
            self._rows = np.argsort(fold, kind="stable").astype(np.int32)
        else:
            rows = np.flatnonzero(entries)
            self._rows = rows[np.argsort(fold[rows], kind="stable")].astype(np.int32)
            del rows
        self._fold = fold[self._rows]
        del fold  # held once: the index is its sorted copy
        self._is_winner = winner[self._rows]
        self._done = done

        groups = []  # row -> its identity's place in the identity index, made on the first tie

        def rank(rows: np.ndarray) -> np.ndarray:  # winners by their first row, then the others
            out = rows.astype(np.int64) + n
            mine = winner[rows]
            if self._first is None:  # every identity once: its first row is its winner
                out[mine] = rows[mine]
                return out
            if not groups:
                groups.append(np.full(n, -1, np.int32))
                groups[0][self._winner] = np.arange(len(self._winner), dtype=np.int32)
            out[mine] = self._first[groups[0][rows[mine]]]
            return out

        _sort_runs(self._fold, [self._rows, self._is_winner], by=rank)
        self._first = None
        self._at = np.full(n, -1, np.int32)  # where each row is in the index
        self._at[self._rows] = np.arange(len(self._rows), dtype=np.int32)
        reserved = self._fold[self._is_winner]  # sorted: distinct values are where it changes
        self.n_reserved = int(len(reserved) and 1 + np.count_nonzero(reserved[1:] != reserved[:-1]))

    def __len__(self) -> int:
        return len(self.keys)

    # ---- vectorised ------------------------------------------------------------------------

    def lookup(self, ids) -> np.ndarray:
        """The row holding each identity's recorded key, or -1."""
        ids = as_array(ids)
        out = np.full(len(ids), -1, np.int64)
        if not len(self._h1):
            return out
        q1, q2 = hashes(ids), hashes(ids, lane=1)
        pos, hit = _search(self._h1, q1)
        while hit.any():
            match = hit & (self._h2[np.minimum(pos, len(self._h2) - 1)] == q2)
            out[match] = self._winner[pos[match]]
            pos = pos + 1
            hit = hit & ~match & (pos < len(self._h1))
            hit[hit] = self._h1[pos[hit]] == q1[hit]
        return out

    def fold_hashes(self, rows: np.ndarray) -> np.ndarray:
        """The fold hash of the key of each row (rows of winners with safe keys, or done)."""
        return self._fold[self._at[rows]]

    def is_done_row(self, rows: np.ndarray) -> np.ndarray:
        """Whether each row (>= 0) is a predictions row: its key is done."""
        return self._done[rows]

    def reserved_mask(self, fold_hashes: np.ndarray) -> np.ndarray:
        """Whether a recorded key's fold may have each hash (no: surely not reserved)."""
        pos, hit = _search(self._fold, fold_hashes)
        hit[hit] = self._is_winner[pos[hit]]
        return hit

    def done_mask(self, keys, fold_hashes: np.ndarray | None = None) -> np.ndarray:
        """Whether each key is a done key (a predictions row has exactly it); `fold_hashes`, when
        the caller has them, are those of the keys' folds."""
        keys = as_array(keys).cast(pa.string())
        if fold_hashes is None:
            fold_hashes = hashes(fold_keys(keys))
        out = np.zeros(len(keys), bool)
        pos, hit = _search(self._fold, fold_hashes)
        while hit.any():
            idx = np.flatnonzero(hit)
            rows = self._rows[pos[idx]]
            same = self._done[rows] & pc.equal(self.keys.take(rows), keys.take(pa.array(idx))).to_numpy(False)
            out[idx[same]] = True
            hit[idx[same]] = False
            pos = pos + 1
            hit &= pos < len(self._fold)
            hit[hit] = self._fold[pos[hit]] == fold_hashes[hit]
        return out

    # ---- KeyRegistry's book ------------------------------------------------------------------

    # one value at a time (rows claimed one by one): scalar searches, no arrays made

    def get(self, identity: str) -> str | None:
        h1, h2 = hash(identity), hash(identity + "\x00")
        i = int(np.searchsorted(self._h1, h1))
        while i < len(self._h1) and self._h1[i] == h1:
            if self._h2[i] == h2:
                return self.keys[int(self._winner[i])]
            i += 1
        return None

    def is_reserved(self, fold: str) -> bool:
        h = hash(fold)
        i = int(np.searchsorted(self._fold, h))
        return i < len(self._fold) and self._fold[i] == h and bool(self._is_winner[i])

    def _owner_row(self, fold: str) -> int | None:
        from pipeline.data.keys import fold_key

        h = hash(fold)
        i = int(np.searchsorted(self._fold, h))
        while i < len(self._fold) and self._fold[i] == h and self._is_winner[i]:
            if fold_key(self.keys[int(self._rows[i])]) == fold:
                return int(self._rows[i])
            i += 1
        return None

    def owner(self, fold: str) -> str | None:
        """The recorded identity whose key has `fold` (the first in `recorded_keys`' order)."""
        row = self._owner_row(fold)
        return None if row is None else self._path(row)

    def relative_key(self, fold: str, name: str) -> str | None:
        """The owner's key of `fold` when the owner's name relative to its INPUT is `name`."""
        from pipeline.data.keys import relative_name

        row = self._owner_row(fold)
        if row is None:
            return None
        key = self.keys[row]
        return key if relative_name(self._path(row), key) == name else None

    def _path(self, row: int) -> str:
        """The identity of `row` (read back from its part, which is kept for the next call)."""
        chunk = int(np.searchsorted(self._starts, row, side="right")) - 1
        if chunk not in self._fetched:
            source = self._sources[chunk]
            self._fetched = {chunk: source if isinstance(source, pa.Array) else identities(source())}
        return self._fetched[chunk][row - int(self._starts[chunk])].as_py()


def _sort_runs(values: np.ndarray, along: list[np.ndarray], by=None) -> None:
    """Within each run of equal `values` (sorted), reorder `along` in place: by `by(along[0])`
    when given, else by the arrays of `along` in turn. Runs are rare (hash collisions, a key
    recorded twice), so this is a loop over them."""
    same = np.flatnonzero(values[1:] == values[:-1])
    if not len(same):
        return
    starts = same[np.r_[True, same[1:] != same[:-1] + 1]]
    for a in starts.tolist():
        b = a + 1
        while b < len(values) and values[b] == values[a]:
            b += 1
        keys = [by(along[0][a:b])] if by is not None else [x[a:b] for x in reversed(along)]
        order = np.lexsort(keys)
        for x in along:
            x[a:b] = x[a:b][order]


def _search(sorted_values: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position of each query's first equal value, whether there is one); queries are searched
    in sorted order, which keeps the binary searches in cache."""
    order = np.argsort(queries, kind="stable")
    pos = np.empty(len(queries), np.int64)
    pos[order] = np.searchsorted(sorted_values, queries[order])
    hit = pos < len(sorted_values)
    hit[hit] = sorted_values[pos[hit]] == queries[hit]
    return pos, hit


def read_recorded(output: str, storage_options: dict | None = None, columns=(), each=None) -> RecordedKeys:
    """What `recorded_keys(output)` holds, as `RecordedKeys`, from one read of OUTPUT's errors/ and
    predictions/ parts: their path and key columns, one part at a time (and of each predictions
    part the `columns` too, handed to `each(url, table, read_again)` with its URL and a function
    reading other columns of it: the one read a resume makes)."""
    from pipeline.io.parts import iter_parts

    def chunks():
        for folder, done in (("errors", False), ("predictions", True)):
            wanted = ["path", "key", *columns] if done else ["path", "key"]
            for url, table, read_again in iter_parts(f"{output.rstrip('/')}/{folder}", wanted, storage_options):
                if done and each is not None:
                    each(url, table, read_again)
                yield table["path"], table["key"], done, lambda read=read_again: read(["path"])["path"]

    return RecordedKeys.from_chunks(chunks())
