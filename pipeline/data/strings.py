"""Vectorised forms of the key helpers (`pipeline.data.keys`) over Arrow string arrays, for
listings of millions of inputs: each gives exactly what the per-string function gives.

Rows are handled in Arrow (RE2 regexes, ASCII lower-casing) or on the UTF-8 bytes with numpy
('/' and '.' never occur inside a multi-byte UTF-8 sequence, so byte positions of them are exact);
rows outside what that covers (non-ASCII keys to fold, unusual URLs) fall back to the
per-string function, row by row. Hashes are Python's own string hash (SipHash with a per-process
key): good, fast, and only ever compared within the process that made them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_SLASH, _DOT = ord("/"), ord(".")
# one regex a check (RE2 scans a string once; a substring search per pattern costs as much each)
_UNSAFE_KEY = r"^$|^/|/$|//|\\|\x00|::|(^|/)\.\.?(/|$)"  # is_safe_key's refusals
_FOLD_SPECIAL = r"\\|//|^/|/$|(^|/)\.(/|$)"  # what fold_key changes beyond ASCII case
_UNPLAIN = r"^$|^/|/$|//|(^|/)\.(/|$)"  # what split_url would change: empty or '.' parts
_UNPLAIN_DOTS = r"^$|^/|/$|//|(^|/)\.\.?(/|$)"  # ... and what normpath would: '..' parts


def as_array(values) -> pa.Array:
    """One string array (a chunked one combined; large_string kept)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if not isinstance(values, pa.Array):
        values = pa.array(values, pa.string())
    if pa.types.is_null(values.type):
        values = values.cast(pa.string())
    return values


def any_byte(values, chars: bytes) -> bool:
    """Whether any of `chars` occurs anywhere in the strings (one scan of the bytes: most listings
    hold none of the characters that need a row-by-row look)."""
    b = Bytes(values)
    data = b.data[b.lo : b.hi]
    return any(bool((data == c).any()) for c in chars)


def matches(values, pattern: str, null: bool = False) -> np.ndarray:
    """Boolean numpy array: where the regex `pattern` matches (nulls: `null`)."""
    return pc.fill_null(pc.match_substring_regex(as_array(values), pattern), null).to_numpy(zero_copy_only=False)


def unplain(values, dots: bool = False) -> np.ndarray:
    """Whether each path is not plain: empty, or with a leading, trailing or doubled '/', or a '.'
    part (with `dots`, a '..' part too): what split_url (and normpath) would change."""
    return matches(values, _UNPLAIN_DOTS if dots else _UNPLAIN, null=True)


def hashes(values, lane: int = 0) -> np.ndarray:
    """int64 hash of each string (nulls hash alike). Lane 1 is a second, independent hash (of the
    string with a NUL appended), for identities compared by 128 bits."""
    values = as_array(values)
    if lane:  # the NUL appended in Arrow (a null stays null)
        values = pc.binary_join_element_wise(values, "\x00", "")
    return np.fromiter(map(hash, values.to_pylist()), np.int64, len(values))


def safe_keys(keys) -> np.ndarray:
    """`is_safe_key` of each key (null: not safe)."""
    return ~matches(keys, _UNSAFE_KEY, null=True)


def fold_keys(keys, safe=None) -> pa.Array:
    """`fold_key` of each key (null stays null): ASCII keys without separators to fold are
    lower-cased in Arrow (for ASCII, casefold is lower-casing and NFD/NFC change nothing), the
    others folded one by one. `safe` (True, or a mask): keys known safe (`is_safe_key`), which
    have no separator to fold."""
    from pipeline.data.keys import fold_key

    keys = as_array(keys)
    plain = pc.string_is_ascii(keys)
    if safe is not True:
        special = pc.match_substring_regex(keys, _FOLD_SPECIAL)
        if safe is not None:
            special = pc.and_(special, pa.array(~np.asarray(safe, bool)))
        plain = pc.and_(plain, pc.invert(special))
    folded = pc.ascii_lower(keys)
    odd = pc.and_(pc.is_valid(keys), pc.invert(pc.fill_null(plain, True)))
    if not pc.any(odd).as_py():
        return folded
    slow = [fold_key(k) for k in keys.filter(odd).to_pylist()]
    return pc.replace_with_mask(folded, odd, pa.array(slow, folded.type))


class Bytes:
    """The UTF-8 bytes of a string array with each row's [start, end) in them (nulls are empty)."""

    def __init__(self, values):
        values = as_array(values)
        self.values, n = values, len(values)
        wide = pa.types.is_large_string(values.type)
        offset_type = np.int64 if wide else np.int32
        buffers = values.buffers()
        offsets = np.frombuffer(buffers[1], offset_type, n + 1, values.offset * offset_type().itemsize)
        self.starts, self.ends = offsets[:-1].astype(np.int64), offsets[1:].astype(np.int64)
        self.data = np.frombuffer(buffers[2], np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
        self.lo = int(self.starts[0]) if n else 0
        self.hi = int(self.ends[-1]) if n else 0
        self.dt = np.int64 if wide else np.int32  # positions: 4 bytes a byte where they fit
        self.filled = self.ends > self.starts
        self._pos = None

    @property
    def pos(self) -> np.ndarray:
        if self._pos is None:
            self._pos = np.arange(self.lo, self.hi, dtype=self.dt)
        return self._pos

    def _per_byte(self, per_row: np.ndarray) -> np.ndarray:
        return np.repeat(per_row.astype(self.dt, copy=False), self.ends - self.starts)

    def _reduce(self, ufunc, values: np.ndarray, empty) -> np.ndarray:
        out = np.full(len(self.starts), empty, np.int64)
        if self.filled.any():
            out[self.filled] = ufunc.reduceat(values, self.starts[self.filled] - self.lo)
        return out

    def last(self, byte: int, at_or_after: np.ndarray | None = None) -> np.ndarray:
        """Per row, the position of the last `byte` (at or after the row's `at_or_after`), or -1."""
        hit = self.data[self.lo : self.hi] == byte
        if at_or_after is not None:
            hit &= self.pos >= self._per_byte(at_or_after)
        return self._reduce(np.maximum, np.where(hit, self.pos, self.dt(-1)), -1)

    def first_not(self, byte: int, at_or_after: np.ndarray) -> np.ndarray:
        """Per row, the position of the first byte other than `byte` at or after `at_or_after`,
        or the row's end."""
        hit = (self.data[self.lo : self.hi] != byte) & (self.pos >= self._per_byte(at_or_after))
        return np.minimum(self._reduce(np.minimum, np.where(hit, self.pos, self.dt(self.hi)), self.hi), self.ends)

    def slice(self, begin: np.ndarray, end: np.ndarray) -> pa.Array:
        """Row i's bytes from position begin[i] to end[i] (positions in `data`, as `last` gives
        them), as a string array; nulls stay null."""
        keep = (self.pos >= self._per_byte(begin)) & (self.pos < self._per_byte(end))
        offsets = np.zeros(len(begin) + 1, np.int64)
        np.cumsum(end - begin, out=offsets[1:])
        wide = offsets[-1] >= 2**31
        data = pa.py_buffer(np.ascontiguousarray(self.data[self.lo : self.hi][keep]))
        out = (pa.LargeStringArray if wide else pa.StringArray).from_buffers(
            len(begin), pa.py_buffer(offsets if wide else offsets.astype(np.int32)), data
        )
        if self.values.null_count:
            out = pc.if_else(pc.is_valid(self.values), out, pa.scalar(None, out.type))
        return out


def byte_slice(values, start: int, stop: int | None = None) -> pa.Array:
    """Bytes start to stop (None: the end) of each string, cut between two characters (the
    caller knows it: ASCII prefixes), as strings."""
    values = as_array(values)
    binary = pa.large_binary() if pa.types.is_large_string(values.type) else pa.binary()
    # an explicit stop: pyarrow 26's default (the largest int64) overflows when a row ends at the start
    return pc.binary_slice(values.view(binary), start, 2**40 if stop is None else stop).view(values.type)


def strip_extensions(names) -> pa.Array:
    """Each '/'-separated name without the extension of its last part, as `os.path.splitext`
    strips it ('a/b.tar.jpg' -> 'a/b.tar'; '.hidden', '..jpg' and 'a/b' stay as they are)."""
    names = as_array(names)
    # a last part that starts with a dot needs splitext's rule for leading dots; the others lose
    # what follows their last dot
    dotted = pc.or_(pc.match_substring(names, "/."), pc.starts_with(names, "."))
    out = pc.replace_substring_regex(names, r"\.[^./]*$", "")
    if not pc.any(dotted).as_py():
        return out
    b = Bytes(names.filter(dotted))
    base = np.maximum(b.last(_SLASH) + 1, b.starts)
    dot = b.last(_DOT, base)
    named = b.first_not(_DOT, base)  # a dot before any other character starts the name, no extension
    stem_end = np.where((dot >= 0) & (named < dot), dot, b.ends)
    return pc.replace_with_mask(out, pc.fill_null(dotted, False), b.slice(b.starts, stem_end))


def cut_prefix(values, prefix: str) -> pa.Array:
    """Each string without its first len(prefix) bytes (every string starts with `prefix`)."""
    return byte_slice(values, len(prefix.encode()))


def stripped(lines: pa.Array) -> pa.Array:
    """`str.strip` of each string: one by one only where the first or last character may be
    whitespace (ASCII space or control, or not ASCII)."""
    lines = as_array(lines)
    b = Bytes(lines)
    edge = b.filled.copy()
    if b.filled.any():
        first, last = b.data[b.starts[b.filled]], b.data[b.ends[b.filled] - 1]
        edge[b.filled] = (first <= 0x20) | (first >= 0x7F) | (last <= 0x20) | (last >= 0x7F)
    if not edge.any():
        return lines
    odd = pa.array(edge)
    return pc.replace_with_mask(lines, odd, pa.array([v.strip() for v in lines.filter(odd).to_pylist()], pa.string()))


def split_last(values) -> tuple[pa.Array, pa.Array]:
    """(everything up to and with the last '/', what follows it) of each string."""
    b = Bytes(values)
    cut = np.maximum(b.last(_SLASH) + 1, b.starts)
    return b.slice(b.starts, cut), b.slice(cut, b.ends)


class Blocks:
    """Strings appended chunk by chunk and kept in blocks of about BLOCK_BYTES (never combined
    into one array, which would hold them twice for a moment); `take` and `[i]` read them back."""

    BLOCK_BYTES = 32 << 20

    def __init__(self):
        self._blocks: list[pa.Array] = []
        self._pending: list[pa.Array] = []
        self._starts = [0]
        self._n = 0

    def append(self, values: pa.Array) -> None:
        self._pending.append(values.cast(pa.string()))
        self._n += len(values)
        if sum(v.nbytes for v in self._pending) >= self.BLOCK_BYTES:
            self._seal()

    def _seal(self) -> None:
        if self._pending:
            self._blocks.append(pa.concat_arrays(self._pending))
            self._starts.append(self._starts[-1] + len(self._blocks[-1]))
            self._pending = []

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> str | None:
        self._seal()
        b = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._blocks[b][i - self._starts[b]].as_py()

    def take(self, rows: np.ndarray) -> pa.Array:
        """The strings at `rows`, in that order (a string array; null where a row is null)."""
        self._seal()
        if len(self._blocks) == 1:
            return self._blocks[0].take(pa.array(rows))
        block = np.searchsorted(self._starts, rows, side="right") - 1
        order = np.argsort(block, kind="stable")
        pieces = []
        for b in np.unique(block).tolist():
            mine = order[block[order] == b]
            pieces.append(self._blocks[b].take(pa.array(rows[mine] - self._starts[b])))
        if not pieces:
            return pa.array([], pa.string())
        back = np.empty(len(rows), np.int64)
        back[order] = np.arange(len(rows))
        return pa.concat_arrays(pieces).take(pa.array(back))
