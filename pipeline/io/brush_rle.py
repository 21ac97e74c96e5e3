"""Label Studio's brush RLE (`value.rle` of a brushlabels result): thi.ng rle-pack bytes of the
mask as a flattened RGBA image, 255 in every channel where the class is.

Written from the format's description (the thi.ng rle-pack README and what Label Studio's
converter documents); the tests decode it with an independent decoder.
"""

from __future__ import annotations

import numpy as np

BRUSH_WORD_BITS = 8  # 8-bit RGBA words ...
BRUSH_RUN_BITS = (3, 4, 8, 16)  # ... and the repeat-count widths (runs of up to 8, 16, 256, 65536 words)


def runs(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, values) of the runs of equal values in a 1-D array."""
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    return np.concatenate(([0], change)), np.concatenate((change, [flat.size])), flat[np.concatenate(([0], change))]


def pack_rle(
    lengths: np.ndarray,
    values: np.ndarray,
    total: int,
    word_bits: int = BRUSH_WORD_BITS,
    run_bits: tuple[int, ...] = BRUSH_RUN_BITS,
) -> np.ndarray:
    """thi.ng rle-pack bytes (what Label Studio's brush `rle` holds) of runs of words.

    Layout, big-endian bits: 32 bits word count, 5 bits word size - 1, four 4-bit repeat widths
    - 1; then per chunk a 1 flag (a repeated value), 2 bits choosing the repeat width, the
    repeat count - 1 in that width, the value; zero bits pad the last byte. Runs longer than the
    widest count (65536 words) continue in further chunks. Single values use the same form
    (count 0), so the encoder never needs the format's literal (flag 0) chunks."""
    lengths, values = np.asarray(lengths, dtype=np.int64), np.asarray(values, dtype=np.int64)
    cap = 1 << run_bits[-1]
    reps = (lengths - 1) // cap + 1
    chunk = np.full(int(reps.sum()), cap, dtype=np.int64)
    chunk[np.cumsum(reps) - 1] = lengths - (reps - 1) * cap
    value = np.repeat(values, reps)
    widths = np.asarray(run_bits, dtype=np.int64)
    group = np.searchsorted(1 << widths, chunk)  # the narrowest width that holds the count
    bits = widths[group]
    code = ((((4 | group) << bits) | (chunk - 1)) << word_bits) | value
    size = 3 + bits + word_bits
    header = [(total >> (31 - i)) & 1 for i in range(32)] + [((word_bits - 1) >> (4 - i)) & 1 for i in range(5)]
    header += [((b - 1) >> (3 - i)) & 1 for b in run_bits for i in range(4)]
    shift = size[:, None] - 1 - np.arange(int(size.max(initial=1)))
    body = (code[:, None] >> np.maximum(shift, 0)) & 1
    return np.packbits(np.concatenate((np.asarray(header, dtype=np.uint8), body[shift >= 0].astype(np.uint8))))


def brush_from_runs(starts: np.ndarray, ends: np.ndarray, n: int) -> np.ndarray:
    """Brush RLE of an n-pixel mask that is on over [starts, ends): every pixel is four RGBA
    words, 255 where on, 0 elsewhere (as Label Studio's converter writes masks)."""
    lengths = np.empty(2 * starts.size + 1, dtype=np.int64)
    lengths[0:-1:2] = starts - np.concatenate(([0], ends[:-1]))
    lengths[1::2] = ends - starts
    lengths[-1] = n - (ends[-1] if ends.size else 0)
    values = np.zeros_like(lengths)
    values[1::2] = 255
    keep = lengths > 0  # the first gap is empty when the mask starts on
    return pack_rle(4 * lengths[keep], values[keep], 4 * n)


def brush_rle(binary_mask: np.ndarray) -> list[int]:
    """Label Studio's `value.rle` of a 2-D mask (nonzero = on)."""
    flat = np.asarray(binary_mask).ravel() != 0
    if flat.size == 0:
        return pack_rle(np.zeros(0), np.zeros(0), 0).tolist()
    starts, ends, on = runs(flat)
    return brush_from_runs(starts[on], ends[on], flat.size).tolist()


def unpack_rle(data, limit: int | None = None) -> np.ndarray:
    """The words of thi.ng rle-pack bytes (what `pack_rle` writes, and what Label Studio's
    frontend writes: repeat and literal chunks, any word size up to 32 bits). `limit` refuses
    a header that announces more words (a mask of the wrong size, or not an RLE at all) before
    any memory is taken. Raises ValueError for a stream that is cut short or inconsistent."""
    raw = np.asarray(data)
    if raw.ndim != 1 or raw.size < 7 or (raw.size and (raw.min() < 0 or raw.max() > 255)):
        raise ValueError("an RLE is a list of byte values 0..255 with a 7-byte header at least")
    bits = np.unpackbits(raw.astype(np.uint8))
    weights = 1 << np.arange(63, -1, -1, dtype=np.uint64)
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        if pos + n > bits.size:
            raise ValueError("the RLE ends in the middle of a chunk (cut short)")
        v = int(bits[pos : pos + n] @ weights[64 - n :]) if n else 0
        pos += n
        return v

    total, word = read(32), read(5) + 1
    widths = [read(4) + 1 for _ in range(4)]
    if limit is not None and total > limit:
        raise ValueError(f"the RLE holds {total} words where {limit} were expected")
    out = np.zeros(total, dtype=np.uint32)
    i = 0
    while i < total:
        repeat = read(1)
        count = read(widths[read(2)]) + 1
        if i + count > total:
            raise ValueError(f"an RLE chunk runs past the {total} words its header announces")
        if repeat:
            out[i : i + count] = read(word)
        else:
            if pos + count * word > bits.size:
                raise ValueError("the RLE ends in the middle of a chunk (cut short)")
            block = bits[pos : pos + count * word].reshape(count, word)
            out[i : i + count] = block @ weights[64 - word :]
            pos += count * word
        i += count
    return out


def brush_mask(rle, height: int, width: int) -> np.ndarray:
    """The (height, width) bool mask of a Label Studio brush RLE: the image is RGBA, and a pixel
    is on where its alpha is at least half (Label Studio's brush strokes have soft edges; its
    own converter reads the alpha channel too)."""
    words = unpack_rle(rle, limit=4 * height * width)
    if words.size != 4 * height * width:
        raise ValueError(f"the RLE holds {words.size} words, a {width}x{height} RGBA image needs {4 * height * width}")
    return words.reshape(height, width, 4)[..., 3] >= 128
