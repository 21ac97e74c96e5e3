"""Decode an input's bytes into an RGB image: the `Decode` step and its rules.

EXIF orientation applied; L, LA, P (with transparency), RGBA, CMYK, 16-bit, float and 1-bit
images become RGB (transparent pixels on white); the pixel count is checked against
`max_megapixels` from the header before any pixel is decoded; truncated files are errors; only
the image formats we list are opened. With `shrink_to`, large images are reduced (JPEG draft
first) so the short side is that size, and the original size travels in the row.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from model.errors import DinosegError
from pipeline.data.schema import failed, object_array, set_error, with_error_columns
from pipeline.io.masks import MAX_MEGAPIXELS  # the limit images and masks share

log = logging.getLogger(__name__)


def max_megapixels_option():
    """The --max-megapixels option of every job that decodes images."""
    from pipeline.options import option

    return option(MAX_MEGAPIXELS, "Decompression-bomb limit.")


class DecodeError(DinosegError):
    """An input's bytes are not an image we can decode; the message names the problem."""


@dataclass(frozen=True)
class DecodeConfig:
    max_megapixels: float = MAX_MEGAPIXELS
    shrink_to: int | None = None  # shrink so the short side is this (never upscale); None: keep

    def validate(self) -> "DecodeConfig":
        if not self.max_megapixels > 0:
            raise DinosegError(f"--max-megapixels {self.max_megapixels} must be positive, e.g. 100.")
        if self.shrink_to is not None and self.shrink_to < 1:
            raise DinosegError(f"shrink_to {self.shrink_to} must be a positive number of pixels, or None.")
        return self


PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")  # JPEG includes MPO; never EPS (runs Ghostscript)
BACKGROUND = (255, 255, 255)  # what transparent pixels become: white, as viewers and web pages show them
_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ORIENTATION = 0x0112
_TRANSPOSE = {  # EXIF orientation -> the transpose that displays it upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def check_pixels(width: int, height: int, max_megapixels: float) -> None:
    """Raise DecodeError if width x height is over the limit (1 megapixel = 10**6 pixels)."""
    if width * height > max_megapixels * 1e6:
        raise DecodeError(
            f"the image is {width}x{height} ({width * height / 1e6:.1f} megapixels), over the limit of "
            f"{max_megapixels:g} megapixels: raise --max-megapixels if the file is trusted."
        )


def _take_over_pil_bomb_check() -> None:
    # PIL's guard is one process-wide number checked inside Image.open (a warning above 89.5 MP,
    # an error above 179 MP), before we can compare the size with our per-call limit: it would
    # warn on or reject images our limit accepts. Setting it per call would race between threads,
    # so it is switched off once, never toggled back, and `check_pixels` does the job on every
    # call, after Image.open has parsed the header and before any pixel buffer exists.
    if Image.MAX_IMAGE_PIXELS is not None:
        Image.MAX_IMAGE_PIXELS = None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """A WebP canvas size from its header: PIL's WebP decoder allocates it inside Image.open."""
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def decode_image(data: bytes, config: DecodeConfig | None = None) -> tuple[np.ndarray, int, int]:
    """Bytes -> (RGB uint8 array (h, w, 3), width, height), or DecodeError with one sentence.

    width and height are the original size after EXIF orientation: the mask's size. The array
    is that size too, unless `config.shrink_to` shrank it (JPEGs first by DCT scaling in
    `draft`, then an antialiased resize to short side `shrink_to`). Conversions: EXIF
    orientation applied; transparency (RGBA, LA, PA, P or L/RGB with a transparent colour)
    composited on white; 16-bit (I;16*, and I taken as 16-bit, clipped to 0..65535) scaled by
    1/257 with rounding; F: values in [0, 1] times 255, anything else stretched from its
    min..max; 1, L, P, CMYK, YCbCr converted by PIL. Truncated files are errors, never a grey
    half (PIL's LOAD_TRUNCATED_IMAGES is left off). Only JPEG/MPO, PNG, WebP, BMP and TIFF
    are opened, whatever the name says.
    """
    config = config or DecodeConfig()
    if not data:
        raise DecodeError("the file is empty (0 bytes).")
    _take_over_pil_bomb_check()
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and (size := _webp_size(data)):
        check_pixels(*size, config.max_megapixels)
    try:
        img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except Exception as e:
        claimed = _signature(data)
        if isinstance(e, Image.UnidentifiedImageError) and not claimed:
            raise DecodeError(
                f"the file is not a JPEG, PNG, WebP, BMP or TIFF image (it starts with {bytes(data[:16])!r})."
            ) from None
        raise DecodeError(
            f"the {claimed or 'image'} header is truncated or corrupt ({type(e).__name__}: {e})."
        ) from None
    with img:
        w0, h0 = img.size
        check_pixels(w0, h0, config.max_megapixels)  # before load(): nothing is allocated yet
        try:
            target = config.shrink_to
            if target and min(w0, h0) >= 2 * target:  # JPEG: decode at 1/2, 1/4 or 1/8, never below target
                s = target / min(w0, h0)
                img.draft(img.mode, (math.ceil(w0 * s), math.ceil(h0 * s)))
            img.load()
            orientation = _orientation(img)
            out = img.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else img
            out = _shrink(_to_rgb(out), target)
            rgb = np.asarray(out)
        except DinosegError:
            raise
        except MemoryError:
            raise DecodeError(
                f"not enough memory to decode a {w0}x{h0} image: lower --max-megapixels or give the task more memory."
            ) from None
        except Exception as e:
            raise DecodeError(_corrupt_message(e)) from None
    width, height = (h0, w0) if orientation in (5, 6, 7, 8) else (w0, h0)
    return rgb, width, height


def _signature(data: bytes) -> str:
    """The format the first bytes claim, for a clearer message when PIL cannot open the file."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return "BMP" if data[:2] == b"BM" else ""


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_ORIENTATION, 1)
        return value if isinstance(value, int) else 1
    except Exception:  # broken EXIF is not a broken image: keep it as stored
        log.debug("unreadable EXIF, orientation ignored", exc_info=True)
        return 1


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _HIGH_DEPTH:
        a = np.asarray(img)
        if a.dtype.kind == "i":  # mode I: taken as 16-bit data (what 16-bit PNG/TIFF open as)
            a = np.clip(a, 0, 65535)
        gray = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        finite = np.isfinite(a)
        lo, hi = (float(a[finite].min()), float(a[finite].max())) if finite.any() else (0.0, 1.0)
        scaled = a * 255 if lo >= 0 and hi <= 1 else (a - lo) * (255 / (hi - lo) if hi > lo else 0)
        return Image.fromarray(np.where(finite, np.clip(np.rint(scaled), 0, 255), 0).astype(np.uint8)).convert("RGB")
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, BACKGROUND + (255,)), rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")  # ValueError for a mode PIL cannot convert


def _shrink(img: Image.Image, target: int | None) -> Image.Image:
    w, h = img.size
    if not target or min(w, h) <= target:
        return img
    size = (target, max(target, round(h * target / w))) if w <= h else (max(target, round(w * target / h)), target)
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _corrupt_message(e: Exception) -> str:
    text = str(e)
    if "truncated" in text.lower() or isinstance(e, EOFError):
        return f"the image data is truncated ({text or type(e).__name__}): the file is incomplete; copy it again."
    return f"the image data is corrupt ({type(e).__name__}: {text})."


class Decode:
    """Batch with `bytes` -> without it, + `image` (object array of (h, w, 3) uint8; (0, 0, 3)
    for failed rows), `width`, `height` (int64, the original size; 0 for failed rows).
    Failures -> error_stage 'decode'; rows that failed earlier pass through untouched."""

    def __init__(self, config: DecodeConfig | None = None):
        self.config = (config or DecodeConfig()).validate()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = with_error_columns(batch)
        data = out.pop("bytes")
        n = len(data)
        images = [np.zeros((0, 0, 3), np.uint8) for _ in range(n)]
        widths, heights = np.zeros(n, np.int64), np.zeros(n, np.int64)
        bad = failed(out)
        for i in range(n):
            if bad[i]:
                continue
            try:
                images[i], widths[i], heights[i] = decode_image(data[i], self.config)
            except DinosegError as e:
                set_error(out, i, "decode", e)
            except Exception as e:  # a bug in a codec must cost one row, not the batch
                set_error(out, i, "decode", f"could not decode the image ({type(e).__name__}: {e}).", type(e).__name__)
        out["image"], out["width"], out["height"] = object_array(images), widths, heights
        return out
