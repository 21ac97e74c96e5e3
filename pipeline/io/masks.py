"""Mask and confidence PNGs, and where they live under OUTPUT.

Layout under OUTPUT: masks/<key>.png, overlays/<key>.jpg, confidence/<key>.png. A mask is the
marker that an input is done: it is written last for its row, complete or not at all, and
`existing_keys` lists the masks for resume.
"""

from __future__ import annotations

import io

import fsspec
import numpy as np
from PIL import Image

from model.classes import ClassMap
from model.errors import DinosegError
from model.storage import options_for
from pipeline.io.files import join_url

# zlib level for mask PNGs. On a 1024x768 ADE20K-palette mask (AMD EPYC, Pillow 13, one core):
#   blocky regions: level 1 3.1 ms / 16 KiB, level 6 6.0 ms / 6 KiB;
#   smooth 20-class regions: level 1 4.6 ms / 64 KiB, level 6 13.5 ms / 36 KiB (level 9: 120 ms);
#   per-pixel noise (worst case): level 1 22 ms, level 6 26 ms, both 700 KiB.
# Encoding runs once per image on the hot path; the extra bytes cost far less than the time.
PNG_COMPRESS_LEVEL = 1


def encode_mask_png(mask: np.ndarray, classes: ClassMap) -> bytes:
    """PNG bytes of a class-index mask: mode 'P' with the class palette for <= 256 classes,
    16-bit grayscale ('I;16') beyond. Raises DinosegError for a mask that does not fit."""
    m = np.asarray(mask)
    if m.ndim != 2 or m.size == 0 or m.dtype.kind not in "uib":
        raise DinosegError(f"a mask must be a non-empty 2-D integer array, got {m.dtype} {m.shape}.")
    wide = len(classes) > 256
    top = 65535 if wide else 255
    if m.dtype.kind == "i" or m.dtype.itemsize > (2 if wide else 1):
        lo, hi = (int(m.min()), int(m.max()))
        if lo < 0 or hi > top:
            raise DinosegError(
                f"mask values {lo}..{hi} do not fit a {'16' if wide else '8'}-bit PNG for {len(classes)} classes."
            )
    if wide:
        image = Image.fromarray(np.ascontiguousarray(m, dtype="<u2"))  # mode I;16
    else:
        image = Image.fromarray(np.ascontiguousarray(m, dtype=np.uint8))  # mode L ...
        image.putpalette(classes.palette())  # ... becomes P
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


# The decompression-bomb limit, for images (`pipeline.data.decode`, --max-megapixels) and masks
# alike: a mask has its image's size, so a bigger one is refused from its header.
MAX_MEGAPIXELS = 100.0  # a 50 MP photo passes


def decode_mask_png(data: bytes, max_megapixels: float = MAX_MEGAPIXELS) -> np.ndarray:
    """The class-index mask of a mask PNG: (H, W) uint8 for 'P'/'L'/'1', uint16 for 16-bit.

    The one way masks are read (train, evaluate, export, pseudo-label, import): only PNG's
    decoder is reached, whatever the file holds (an EPS named .png never reaches Ghostscript);
    the size is checked from the header before a pixel is decoded, against this call's limit and
    no process-wide setting; 32-bit values are refused, never wrapped to 16 bits. Everything
    wrong ends in DinosegError with one sentence."""
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
    except Image.UnidentifiedImageError:
        raise DinosegError(f"the mask is not a PNG (it starts with {bytes(data[:8])!r}): save masks as PNGs.") from None
    except Exception as e:  # a truncated header; PIL's own bomb check where it is still on
        raise DinosegError(f"the mask PNG cannot be read ({type(e).__name__}: {e}).") from None
    with image:
        w, h = image.size
        if w * h > max_megapixels * 1e6:
            raise DinosegError(
                f"the mask is {w}x{h} ({w * h / 1e6:.1f} megapixels), over the limit of {max_megapixels:g}: "
                "raise --max-megapixels if the file is trusted."
            )
        mode = image.mode
        if mode in ("RGB", "RGBA", "LA", "PA"):
            raise DinosegError(
                f"the mask is an {mode} image, not an index mask: save class indices as a palette or grayscale PNG."
            )
        if mode not in ("P", "L", "1") and not mode.startswith("I"):
            raise DinosegError(f"a mask PNG must be palette or grayscale, this one is {mode}.")
        try:
            image.load()
            pixels = np.asarray(image)
        except Exception as e:  # truncated or corrupt pixel data
            raise DinosegError(f"the mask PNG is truncated or corrupt ({type(e).__name__}: {e}).") from None
    if mode in ("P", "L", "1"):
        return pixels.astype(np.uint8)  # '1' is bool: 0/1
    if pixels.dtype.itemsize > 2 and pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
        raise DinosegError(
            f"the mask holds values {int(pixels.min())}..{int(pixels.max())}, beyond 16 bits: class indices fit 0..65535."
        )
    return pixels.astype(np.uint16)


def check_key(key: str) -> str:
    """The key, if it names a file inside OUTPUT; DinosegError otherwise."""
    if not isinstance(key, str) or not key:
        raise DinosegError(f"empty key {key!r}: every input needs a path relative to INPUT.")
    parts = key.split("/")
    if key.startswith("/") or "\\" in key or "\x00" in key or any(p in ("", ".", "..") for p in parts):
        raise DinosegError(
            f"key {key!r} could write outside OUTPUT ('..', '.', empty or absolute parts, backslashes): rename the input."
        )
    return key


def mask_url(output: str, key: str) -> str:
    return join_url(output, "masks", check_key(key) + ".png")


def confidence_url(output: str, key: str) -> str:
    return join_url(output, "confidence", check_key(key) + ".png")


CONFIDENCE_SCALE = 65535  # a stored confidence q means q / 65535


def quantize_confidence(confidence: np.ndarray) -> np.ndarray:
    """A [0, 1] confidence map as uint16 (q = round(c * 65535), error <= 7.6e-6): half the bytes
    of float32 through the object store, and a 16-bit PNG holds it without further loss."""
    return np.rint(np.clip(confidence, 0.0, 1.0) * CONFIDENCE_SCALE).astype(np.uint16)


def encode_confidence_png(quantized: np.ndarray, bits: int) -> bytes:
    """PNG of a uint16 confidence map (q / 65535): 16-bit grayscale as it is, or 8-bit
    (round(c * 255)) for people who want a map to look at or to weight a loss with."""
    q = np.asarray(quantized)
    if q.dtype != np.uint16 or q.ndim != 2:
        raise DinosegError(f"a confidence map must be a 2-D uint16 array, got {q.dtype} {q.shape}.")
    if bits == 8:
        image = Image.fromarray(((q.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8))
    else:
        image = Image.fromarray(np.ascontiguousarray(q, dtype="<u2"))  # mode I;16
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def overlay_url(output: str, key: str) -> str:
    return join_url(output, "overlays", check_key(key) + ".jpg")


def existing_keys(output: str, storage_options: dict | None = None) -> set[str]:
    """Keys whose mask exists under OUTPUT/masks/ (temporary files excluded), for resume."""
    fs, root = fsspec.core.url_to_fs(
        join_url(output, "masks"), **options_for(join_url(output, "masks"), storage_options)
    )
    fs.invalidate_cache(root)
    prefix = root.rstrip("/") + "/"
    keys = set()
    for path in fs.find(root):
        if path.startswith(prefix) and path.endswith(".png"):
            keys.add(path[len(prefix) : -len(".png")])
    return keys
