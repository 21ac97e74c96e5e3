"""Decoding: bad files as clear errors, modes, EXIF orientation, the megapixel limit, shrink_to,
and the Decode step over a batch."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile
from test_sources import batch, image_bytes

from model.errors import DinosegError
from pipeline.data.decode import Decode, DecodeConfig, DecodeError, check_pixels, decode_image


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking PNG whose IHDR says width x height, with a few bytes of pixel data."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def decode_err(data: bytes, **config) -> str:
    with pytest.raises(DecodeError) as info:
        decode_image(data, DecodeConfig(**config))
    assert isinstance(info.value, DinosegError)
    return str(info.value)


def test_bad_files_are_clear_errors():
    assert decode_err(b"") == "the file is empty (0 bytes)."
    assert "not a JPEG, PNG, WebP, BMP or TIFF image" in decode_err(b"hello, I am a text file\n")
    assert "not a JPEG" in decode_err(image_bytes("GIF"))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, "JPEG", quality=90)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    assert "truncated" in decode_err(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert "the image data is truncated" in decode_err(buf.getvalue()[:-2])  # only the end marker missing
    png = image_bytes("PNG", (32, 32))
    assert "the image data is truncated" in decode_err(png[:-30])
    assert "the PNG header is truncated or corrupt" in decode_err(png[:40])
    assert "the JPEG header is truncated or corrupt" in decode_err(buf.getvalue()[:300])


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "PNG")
    rgb, w, h = decode_image(buf.getvalue())
    assert (w, h) == (4, 1) and rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255] and (rgb[..., 0] == rgb[..., 2]).all()


def test_other_modes():
    rgb, _, _ = decode_image(image_bytes("JPEG", (16, 16), (0, 255, 255, 0), mode="CMYK"))  # CMYK red
    assert np.abs(rgb[8, 8].astype(int) - [255, 0, 0]).max() < 10
    p = Image.new("P", (4, 2), 0)
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.paste(1, (2, 0, 4, 2))
    buf = io.BytesIO()
    p.save(buf, "PNG", transparency=0)  # index 0 (red) transparent
    rgb, _, _ = decode_image(buf.getvalue())
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[0, 3].tolist() == [0, 0, 255]
    rgb, _, _ = decode_image(image_bytes("PNG", (2, 2), (0, 0, 0, 128), mode="RGBA"))  # half-transparent black
    assert abs(int(rgb[0, 0, 0]) - 127) <= 1
    rgb, _, _ = decode_image(image_bytes("PNG", (2, 2), (0, 0), mode="LA"))
    assert rgb[0, 0].tolist() == [255, 255, 255]
    rgb, _, _ = decode_image(image_bytes("PNG", (3, 1), 1, mode="1"))
    assert rgb.tolist() == [[[255] * 3] * 3]
    buf = io.BytesIO()
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(buf, "TIFF")
    rgb, _, _ = decode_image(buf.getvalue())
    assert rgb[0, :, 0].tolist() == [0, 128, 255]
    buf = io.BytesIO()
    Image.fromarray(np.array([[0, 257, 65535, 70000, -5]], dtype=np.int32)).save(buf, "TIFF")  # mode I
    rgb, _, _ = decode_image(buf.getvalue())
    assert rgb[0, :, 1].tolist() == [0, 1, 255, 255, 0]
    for fmt in ("BMP", "WEBP", "TIFF"):
        rgb, w, h = decode_image(
            image_bytes(fmt, (5, 3), (200, 100, 50), **({"lossless": True} if fmt == "WEBP" else {}))
        )
        assert (w, h) == (5, 3) and rgb.shape == (3, 5, 3) and rgb[1, 2].tolist() == [200, 100, 50]


def test_exif_orientation_swaps_size_and_pixels():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    rgb, w, h = decode_image(buf.getvalue())
    assert (w, h) == (20, 40) and rgb.shape == (40, 20, 3)
    assert rgb[5, 10].argmax() == 0 and rgb[35, 10].argmax() == 2  # the left half is now on top
    big = io.BytesIO()
    img.resize((400, 200)).save(big, "JPEG", exif=exif.tobytes())
    rgb, w, h = decode_image(big.getvalue(), DecodeConfig(shrink_to=50))
    assert (w, h) == (200, 400) and rgb.shape == (100, 50, 3)


def test_tiny_and_very_wide_images():
    rgb, w, h = decode_image(image_bytes("PNG", (1, 1), (1, 2, 3)))
    assert (w, h) == (1, 1) and rgb.tolist() == [[[1, 2, 3]]]
    rgb, w, h = decode_image(image_bytes("PNG", (20000, 8)), DecodeConfig(shrink_to=512))  # never upscaled
    assert (w, h) == (20000, 8) and rgb.shape == (8, 20000, 3)


def test_decompression_bomb_is_refused_before_pixels_are_allocated(monkeypatch):
    def no_load(self, *a, **k):
        raise AssertionError("pixel data must not be decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    data = png_claiming(30000, 30000)
    assert len(data) < 200
    msg = decode_err(data)
    assert msg == (
        "the image is 30000x30000 (900.0 megapixels), over the limit of 100 megapixels: "
        "raise --max-megapixels if the file is trusted."
    )
    webp = b"RIFF" + struct.pack("<I", 22) + b"WEBP" + b"VP8X" + struct.pack("<I", 10) + b"\0" * 4
    webp += (16383 - 1).to_bytes(3, "little") * 2  # WebP allocates its canvas while opening
    assert "16383x16383" in decode_err(webp)


def test_megapixel_limit_accepts_big_photos_and_overrides_pils_guard(monkeypatch):
    check_pixels(10000, 5000, DecodeConfig().max_megapixels)  # a 50 MP photo passes the default
    with pytest.raises(DecodeError, match="--max-megapixels"):
        check_pixels(10001, 10000, 100)

    class Reached(Exception):
        pass

    def stop(self, *a, **k):
        raise Reached("reached the pixel decoder")

    monkeypatch.setattr(ImageFile.ImageFile, "load", stop)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning (> 89.5 MP) must not fire
        for (w, h), limit in [((10000, 5000), 100.0), ((10000, 9500), 100.0), ((19000, 10000), 200.0)]:
            assert "reached the pixel decoder" in decode_err(png_claiming(w, h), max_megapixels=limit)
    assert "over the limit of 10 megapixels" in decode_err(png_claiming(5000, 2001), max_megapixels=10)


def test_shrink_to():
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((4000, 3000))
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=80)
    rgb, w, h = decode_image(buf.getvalue(), DecodeConfig(shrink_to=300))
    assert (w, h) == (4000, 3000)
    assert 300 <= min(rgb.shape[:2]) < 600 and rgb.shape == (300, 400, 3)
    rgb, w, h = decode_image(image_bytes("PNG", (900, 1200)), DecodeConfig(shrink_to=200))
    assert (w, h) == (900, 1200) and rgb.shape == (267, 200, 3)
    rgb, _, _ = decode_image(image_bytes("PNG", (90, 120)), DecodeConfig(shrink_to=200))
    assert rgb.shape == (120, 90, 3)
    with pytest.raises(DinosegError):
        Decode(DecodeConfig(max_megapixels=0))


def test_decode_batch_records_errors_and_passes_failed_rows():
    good = image_bytes("PNG", (5, 3))
    b = batch(["a", "b", "c"], bytes=np.array([good, b"junk", b""], dtype=object))
    b["error_stage"][2], b["error_type"][2], b["error_message"][2] = "read", "FileNotFoundError", "gone"
    out = Decode()(b)
    assert "bytes" not in out and list(out["key"]) == ["k0", "k1", "k2"]
    assert out["image"].dtype == object and out["image"][0].shape == (3, 5, 3) and out["image"][0].dtype == np.uint8
    assert out["image"][1].shape == out["image"][2].shape == (0, 0, 3)
    assert out["width"].tolist() == [5, 0, 0] and out["height"].tolist() == [3, 0, 0] and out["width"].dtype == np.int64
    assert list(out["error_stage"]) == ["", "decode", "read"]
    assert out["error_type"][1] == "DecodeError" and "not a JPEG" in out["error_message"][1]
    assert out["error_message"][2] == "gone"
