"""COCO run-length encoding of binary masks, as pycocotools' compressed RLE strings.

The format (pycocotools' `rleToString` / `rleFrString`, the `counts` of COCO annotations):

- Flatten the mask column-major (Fortran order: down the first column, then the next) and
  write the lengths of its runs, alternating 0-runs and 1-runs and starting with a 0-run, which
  is 0 long when the first pixel is 1. The last run is whatever the mask ends with.
- Compress: from the fourth count on (index i > 2) store the difference to the count two places
  back (a run of the same kind); the first three are stored as they are.
- Write each value as a little-endian sequence of signed 5-bit groups, one character per group,
  chr(48 + group), with 0x20 set on every group but the last; the last group's 0x10 bit is the
  sign (two's complement, so -1 is one group, 0x1f).

Written from that description; the tests compare against strings that pycocotools produced.
"""

from __future__ import annotations

import numpy as np

__all__ = ["rle_encode", "rle_decode", "rle_encode_labels", "counts_to_string", "string_to_counts"]


def counts_to_string(counts) -> str:
    """Compress run lengths into pycocotools' string form (vectorised: masks have ~1e5 runs)."""
    c = np.asarray(counts, dtype=np.int64).ravel()
    x = c.copy()
    x[3:] -= c[1:-2]  # delta to the run two places back, from the fourth count on
    # groups per value: the fewest 5-bit groups holding x as a signed (two's complement) number
    k = np.ones(x.size, dtype=np.int64)
    for j in range(1, 13):
        lim = 1 << (5 * j - 1)
        k += (x < -lim) | (x >= lim)
    if x.size == 0:
        return ""
    j = np.arange(int(k.max()))
    groups = (x[:, None] >> (5 * j)) & 0x1F  # arithmetic shift keeps the sign
    more = j < k[:, None] - 1
    chars = groups | np.where(more, 0x20, 0)
    return (chars[j < k[:, None]] + 48).astype(np.uint8).tobytes().decode("ascii")


def string_to_counts(s: str | bytes) -> list[int]:
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts: list[int] = []
    i, n = 0, len(s)
    while i < n:
        x = shift = 0
        while True:
            if i >= n:
                raise ValueError(f"RLE string ends inside a value at position {i}")
            c = ord(s[i]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"RLE string has an invalid character {s[i]!r} at position {i}")
            i += 1
            x |= (c & 0x1F) << shift
            shift += 5
            if not c & 0x20:
                if c & 0x10:
                    x -= 1 << shift  # sign-extend the last group
                break
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _runs(flat: np.ndarray) -> np.ndarray:
    """Run lengths of a 1-D bool array, starting with a (maybe empty) run of False."""
    n = flat.size
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    lengths = np.diff(np.concatenate(([0], change, [n])))
    return np.concatenate(([0], lengths)) if flat[0] else lengths


def rle_encode(binary_mask: np.ndarray) -> dict:
    """{"size": [h, w], "counts": str} of a 2-D mask (nonzero = 1), as pycocotools.mask.encode
    gives for the same mask (its counts are bytes; here they are str, as in COCO JSON)."""
    m = np.asarray(binary_mask)
    if m.ndim != 2:
        raise ValueError(f"RLE needs a 2-D mask, got shape {m.shape}")
    h, w = m.shape
    return {"size": [int(h), int(w)], "counts": counts_to_string(_runs(m.ravel(order="F") != 0))}


def rle_decode(rle: dict) -> np.ndarray:
    """The (h, w) uint8 0/1 mask of an RLE dict; counts may be a compressed str/bytes or a list
    (COCO's uncompressed form)."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    counts = string_to_counts(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    if any(c < 0 for c in counts) or sum(counts) != h * w:
        raise ValueError(
            f"RLE counts sum to {sum(counts)} with negatives {any(c < 0 for c in counts)}; size {h}x{w} needs {h * w}"
        )
    values = np.arange(len(counts)) % 2
    flat = np.repeat(values.astype(np.uint8), counts)
    return flat.reshape((w, h)).T.copy()  # column-major back to (h, w), C-contiguous


def rle_encode_labels(mask: np.ndarray, class_ids=None) -> dict[int, str]:
    """Compressed RLE counts of `mask == c` for each class id c (default: every value present).

    One pass finds the runs of the label image; each class's runs are then picked from those,
    so the cost per class is the number of runs, not the number of pixels."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"RLE needs a 2-D mask, got shape {m.shape}")
    flat = m.ravel(order="F")
    n = flat.size
    if class_ids is None:  # bincount is ~3x faster than unique on uint8/uint16 masks
        class_ids = np.flatnonzero(np.bincount(flat)) if flat.dtype.kind in "ub" else np.unique(flat)
    if n == 0:
        return {int(c): counts_to_string([0]) for c in class_ids}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [n]))
    labels = flat[starts]
    out: dict[int, str] = {}
    for c in class_ids:
        sel = labels == c
        s, e = starts[sel], ends[sel]
        if s.size == 0:
            out[int(c)] = counts_to_string([n])
            continue
        counts = np.empty(2 * s.size, dtype=np.int64)
        counts[0::2] = s - np.concatenate(([0], e[:-1]))  # zeros before each run (the first may be 0)
        counts[1::2] = e - s
        if e[-1] < n:
            counts = np.append(counts, n - e[-1])
        out[int(c)] = counts_to_string(counts)
    return out
