"""Mask PNGs (palette and 16-bit), their URLs under OUTPUT, keys that could escape it, and the
resume listing of existing masks (local and on a loopback S3)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from model.classes import ClassMap, bundled, default_color
from model.errors import DinosegError
from pipeline.io.files import write_bytes_atomic
from pipeline.io.masks import decode_mask_png, encode_mask_png, existing_keys, mask_url, overlay_url

VOC = bundled("voc2012")


WIDE = ClassMap(tuple(f"c{i}" for i in range(300)), tuple(default_color(i) for i in range(300)))


def blobs(h: int, w: int, n_classes: int, seed: int = 0, cell: int = 8) -> np.ndarray:
    """A segmentation-like mask: constant cells of random classes."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, n_classes, (h // cell + 1, w // cell + 1))
    return low.repeat(cell, 0).repeat(cell, 1)[:h, :w].astype(np.uint8 if n_classes <= 256 else np.uint16)


def test_png_round_trip_uint8_keeps_palette_values_and_ignore():
    mask = blobs(48, 64, len(VOC), seed=1)
    mask[:5, :7] = 255
    data = encode_mask_png(mask, VOC)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.mode == "P" and im.size == (64, 48)
        palette = im.getpalette()
    assert palette[: 3 * len(VOC)] == VOC.palette()[: 3 * len(VOC)]
    assert palette[3 * 255 : 3 * 256] == [255, 255, 255]  # ignore shows white
    back = decode_mask_png(data)
    assert back.dtype == np.uint8 and np.array_equal(back, mask) and (back[:5, :7] == 255).all()


def test_png_round_trip_uint16_past_256_classes():
    mask = blobs(40, 30, 300, seed=2)
    mask[0, 0], mask[-1, -1] = 299, 256
    data = encode_mask_png(mask, WIDE)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "I;16"
    back = decode_mask_png(data)
    assert back.dtype == np.uint16 and np.array_equal(back, mask)


def test_png_accepts_wider_ints_that_fit_and_refuses_masks_that_do_not():
    mask = blobs(10, 12, 21).astype(np.int64)
    assert np.array_equal(decode_mask_png(encode_mask_png(mask, VOC)), mask)
    for bad in (
        np.full((4, 4), 300, np.uint16),
        np.full((4, 4), -1, np.int32),
        np.zeros((4, 4, 3), np.uint8),
        np.zeros((4, 4), np.float32),
        np.zeros((0, 4), np.uint8),
    ):
        with pytest.raises(DinosegError):
            encode_mask_png(bad, VOC)


def test_urls_keep_the_protocol_and_nest_keys():
    assert mask_url("s3://bkt/out/", "a/b/c") == "s3://bkt/out/masks/a/b/c.png"
    assert overlay_url("s3://bkt/out", "a/b") == "s3://bkt/out/overlays/a/b.jpg"
    assert mask_url("/data/out", "img.v2") == "/data/out/masks/img.v2.png"


@pytest.mark.parametrize(
    "key", ["", "/etc/passwd", "..", "../x", "a/../../x", "a/..", "./a", "a//b", "a/", "a\\..\\b", "a\x00b"]
)
def test_keys_that_could_escape_output_are_refused(key):
    with pytest.raises(DinosegError):
        mask_url("/data/out", key)
    with pytest.raises(DinosegError):
        overlay_url("s3://bkt/out", key)


def test_existing_keys_local_nested_ignores_temp_and_other_files(tmp_path):
    out = str(tmp_path / "out")
    assert existing_keys(out) == set()  # no output yet
    for key in ("a", "b/c", "b/d/e.v2"):
        write_bytes_atomic(mask_url(out, key), b"png")
    (tmp_path / "out" / "masks" / "b" / ".c2.png.1234abcd.tmp").write_bytes(b"half")
    (tmp_path / "out" / "masks" / "notes.txt").write_text("x")
    write_bytes_atomic(overlay_url(out, "z"), b"jpg")
    assert existing_keys(out) == {"a", "b/c", "b/d/e.v2"}
    assert existing_keys(out + "/") == existing_keys("file://" + out) == {"a", "b/c", "b/d/e.v2"}


def test_existing_keys_s3(s3_bucket):
    bucket, so = s3_bucket
    out = f"s3://{bucket}/run1"
    assert existing_keys(out, so) == set()
    for key in ("a", "b/c", "b/d/e"):
        write_bytes_atomic(mask_url(out, key), b"png", so)
    write_bytes_atomic(f"s3://{bucket}/run1/masksx/f.png", b"png", so)  # a sibling prefix, not masks/
    assert existing_keys(out, so) == {"a", "b/c", "b/d/e"}


# ---- the one mask reader: PNG only, size from the header, 16 bits at most -----------------------


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF", "BMP", "GIF"])
def test_only_pngs_are_decoded_whatever_the_name_says(fmt):
    """Another format named .png (an EPS would reach Ghostscript) never reaches its decoder."""
    data = encoded(Image.new("L", (4, 3), 1), fmt)
    with pytest.raises(DinosegError, match="not a PNG"):
        decode_mask_png(data)


def test_a_32_bit_mask_is_refused_not_wrapped():
    """What used to come back with 70000 wrapped to 4464 (a valid class id)."""
    data = encoded(Image.fromarray(np.array([[70000, 1]], dtype=np.int32)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    with pytest.raises(DinosegError):
        decode_mask_png(data)


def test_a_mask_over_the_pixel_limit_is_refused_from_its_header(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # as it is once an image was decoded (decode.py)
    data = encoded(Image.new("L", (4000, 3000)), "PNG")  # 12 MP of zeros: a few KB of file
    assert len(data) < 100_000
    with pytest.raises(DinosegError, match=r"4000x3000 .*over the limit of 10"):
        decode_mask_png(data, max_megapixels=10)
    assert decode_mask_png(data, max_megapixels=12).shape == (3000, 4000)


def test_rgb_truncated_and_one_bit_masks():
    with pytest.raises(DinosegError, match="RGB image, not an index mask"):
        decode_mask_png(encoded(Image.new("RGB", (2, 2)), "PNG"))
    whole = encode_mask_png(np.zeros((64, 64), dtype=np.uint8), ClassMap(("a",), ((1, 2, 3),)))
    with pytest.raises(DinosegError, match="truncated or corrupt|cannot be read"):
        decode_mask_png(whole[: len(whole) // 2])
    one_bit = decode_mask_png(encoded(Image.fromarray(np.eye(3, dtype=bool)), "PNG"))
    assert one_bit.dtype == np.uint8 and one_bit.tolist() == np.eye(3, dtype=int).tolist()
