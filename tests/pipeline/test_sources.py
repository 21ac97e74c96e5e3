"""Sources: listing (folders, prefixes, globs, manifests, keys, collisions), reading, decoding."""

from __future__ import annotations

import inspect
import io
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageFile

from model.errors import DinosegError
from pipeline.schema import ERROR_FIELDS
from pipeline.decode import Decode, DecodeConfig, DecodeError, check_pixels, decode_image
from pipeline.sources import IMAGE_EXTENSIONS, ReadBytes, list_inputs, make_key

ROOT = Path(__file__).resolve().parents[2]


def image_bytes(fmt="PNG", size=(8, 6), color=(10, 20, 30), mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt, **save)
    return buf.getvalue()


def write(root: Path, names, data: bytes | None = None) -> None:
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if data is not None else image_bytes())


def keys(rows) -> list[str]:
    return [r["key"] for r in rows]


def batch(paths, **extra) -> dict[str, np.ndarray]:
    n = len(paths)
    b = {"path": np.array(paths, dtype=object), "key": np.array([f"k{i}" for i in range(n)], dtype=object)}
    b.update({f: np.full(n, "", dtype=object) for f in ERROR_FIELDS})
    b.update(extra)
    return b


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking PNG whose IHDR says width x height, with a few bytes of pixel data."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ---- listing ---------------------------------------------------------------------------------


def test_local_folder_recursive_sorted_filtered(tmp_path):
    write(tmp_path, ["b.jpg", "a.PNG", "z/y.Tiff", "z/x.webp", "m/n/o.bmp", "c.jpeg", "notes.txt", "d.gif", "e"])
    rows = list(list_inputs(str(tmp_path)))
    assert keys(rows) == ["a", "b", "c", "m/n/o", "z/x", "z/y"]  # files of a folder, then its folders, sorted
    assert [r["path"] for r in rows][:2] == [str(tmp_path / "a.PNG"), str(tmp_path / "b.jpg")]
    assert all(r[f] == "" for r in rows for f in ERROR_FIELDS)
    assert list(list_inputs(str(tmp_path) + "/")) == rows == list(list_inputs(f"file://{tmp_path}"))
    assert set(IMAGE_EXTENSIONS) == {"jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff"}


def test_relative_input_gives_absolute_paths(tmp_path, monkeypatch):
    write(tmp_path, ["in/a.jpg"])
    monkeypatch.chdir(tmp_path)
    assert [r["path"] for r in list_inputs("in")] == [str(tmp_path / "in" / "a.jpg")]


def test_listing_is_lazy(tmp_path, monkeypatch):
    write(tmp_path, ["a.jpg"] + [f"d{i}/x.jpg" for i in range(5)])
    calls = []
    real_ls = LocalFileSystem.ls
    monkeypatch.setattr(LocalFileSystem, "ls", lambda self, path, *a, **k: calls.append(path) or real_ls(self, path, *a, **k))
    rows = list_inputs(str(tmp_path))
    assert inspect.isgenerator(rows)
    assert next(rows)["key"] == "a"
    assert len(calls) == 1  # only the top folder has been listed so far
    assert keys(rows) == [f"d{i}/x" for i in range(5)]


def test_unlistable_subfolder_is_an_error_row_and_an_unlistable_root_an_error(tmp_path, monkeypatch):
    write(tmp_path, ["a.jpg", "bad/b.jpg", "good/c.jpg"])
    real_ls = LocalFileSystem.ls

    def ls(self, path, *a, **k):
        if path.endswith("bad") or path.endswith("locked"):
            raise PermissionError(13, "Permission denied", path)
        return real_ls(self, path, *a, **k)

    monkeypatch.setattr(LocalFileSystem, "ls", ls)
    rows = list(list_inputs(str(tmp_path)))
    assert [(r["key"], r["error_stage"], r["error_type"]) for r in rows] == [
        ("a", "", ""), ("", "list", "PermissionError"), ("good/c", "", ""),
    ]
    assert rows[1]["path"] == str(tmp_path / "bad") and "its images are missing" in rows[1]["error_message"]
    (tmp_path / "locked").mkdir()
    with pytest.raises(DinosegError, match="cannot list"):
        list(list_inputs(str(tmp_path / "locked")))


def test_memory_prefix():
    fs = fsspec.filesystem("memory")
    for name in ("mem-in/a/1.png", "mem-in/a/2.JPG", "mem-in/b.txt", "other/3.png"):
        fs.pipe(f"/{name}", image_bytes())
    try:
        rows = list(list_inputs("memory://mem-in"))
        assert keys(rows) == ["a/1", "a/2"]
        for r in rows:
            assert r["path"].startswith("memory://")
            with fsspec.open(r["path"], "rb") as f:
                assert f.read() == image_bytes()
    finally:
        fs.rm("/mem-in", recursive=True)
        fs.rm("/other", recursive=True)


def test_s3_prefix_listing_and_reading(s3_bucket):
    bucket, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    for name in ("in/a.jpg", "in/sub/b.png", "in/sub/c.PNG", "in/readme.md", "elsewhere/d.jpg"):
        fs.pipe(f"{bucket}/{name}", image_bytes())
    rows = list(list_inputs(f"s3://{bucket}/in/", options))
    assert [(r["path"], r["key"]) for r in rows] == [
        (f"s3://{bucket}/in/a.jpg", "a"),
        (f"s3://{bucket}/in/sub/b.png", "sub/b"),
        (f"s3://{bucket}/in/sub/c.PNG", "sub/c"),
    ]
    b = ReadBytes(options)(batch([r["path"] for r in rows] + [f"s3://{bucket}/in/gone.jpg"]))
    assert list(b["bytes"][:3]) == [image_bytes()] * 3 and b["bytes"][3] == b""
    assert list(b["error_stage"]) == ["", "", "", "read"]
    assert "gone.jpg" in b["error_message"][3] and "does not exist" in b["error_message"][3]
    with pytest.raises(DinosegError, match="does not exist: check the path"):
        list(list_inputs(f"s3://{bucket}/nothing-here/", options))
    fs.pipe(f"{bucket}/docs/x.md", b"hi")
    with pytest.raises(DinosegError, match="holds no images with extensions jpg, jpeg, png.*: check the prefix"):
        list(list_inputs(f"s3://{bucket}/docs", options))


def test_manifest_on_s3(s3_bucket):
    bucket, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    for name in ("set/a/1.jpg", "set/b/2.png", "other/3.jpg"):
        fs.pipe(f"{bucket}/{name}", image_bytes())
    fs.pipe(f"{bucket}/set/list.txt", f"a/1.jpg\n/{bucket}/set/b/2.png\ns3://{bucket}/other/3.jpg\n".encode())
    rows = list(list_inputs(f"s3://{bucket}/set/list.txt", options))
    assert [(r["path"], r["key"]) for r in rows] == [
        (f"s3://{bucket}/set/a/1.jpg", "set/a/1"), (f"s3://{bucket}/set/b/2.png", "set/b/2"), (f"s3://{bucket}/other/3.jpg", "other/3"),
    ]
    out = ReadBytes(options)(batch([r["path"] for r in rows]))
    assert list(out["error_stage"]) == ["", "", ""] and set(out["bytes"]) == {image_bytes()}


def test_glob(tmp_path):
    write(tmp_path, ["a.jpg", "b.png", "s1/c.jpg", "s1/deep/d.jpg", "s2/e.jpg", "t/f.jpg"])
    assert keys(list_inputs(str(tmp_path / "*.jpg"))) == ["a"]
    assert keys(list_inputs(str(tmp_path / "**" / "*.jpg"))) == ["a", "s1/c", "s1/deep/d", "s2/e", "t/f"]
    assert keys(list_inputs(str(tmp_path / "s?"))) == ["s1/c", "s1/deep/d", "s2/e"]  # matching folders, whole
    assert keys(list_inputs(str(tmp_path / "s*" / "*.jpg"))) == ["s1/c", "s2/e"]
    with pytest.raises(DinosegError, match="matches no images"):
        list(list_inputs(str(tmp_path / "*.webp")))
    write(tmp_path, ["lit[1]/g.jpg"])  # a real folder with a wildcard character is taken literally
    assert keys(list_inputs(str(tmp_path / "lit[1]"))) == ["g"]


def test_manifests_txt_csv_parquet(tmp_path):
    write(tmp_path, ["data/x/1.jpg", "data/y/2.png", "data/y/3.PNG"])
    lines = ["# a comment", "", str(tmp_path / "data/x/1.jpg"), "  y/2.png  ", "../data/y/3.PNG"]
    (tmp_path / "data" / "list.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "list.txt").write_text("\n".join(lines[2:]).replace("y/2.png", "../data/y/2.png"))
    want_paths = [str(tmp_path / p) for p in ("data/x/1.jpg", "data/y/2.png", "data/y/3.PNG")]
    for manifest in (tmp_path / "data" / "list.txt", tmp_path / "sub" / "list.txt"):
        rows = list(list_inputs(str(manifest)))  # relative entries resolve against the manifest's folder
        assert [r["path"] for r in rows] == want_paths
        assert keys(rows) == ["x/1", "y/2", "y/3"]  # relative to the common folder, data/
    pd_rows = {"path": want_paths[::-1], "label": [1, 2, 3]}
    pq.write_table(pa.table(pd_rows), tmp_path / "m.parquet")
    (tmp_path / "m.csv").write_text("label,path\n" + "".join(f"{i},{p}\n" for i, p in enumerate(want_paths[::-1])))
    for manifest in ("m.parquet", "m.csv"):
        rows = list(list_inputs(str(tmp_path / manifest)))
        assert [r["path"] for r in rows] == want_paths[::-1]  # the manifest's order
        assert keys(rows) == ["y/3", "y/2", "x/1"]
    (tmp_path / "one.txt").write_text(want_paths[1])
    assert keys(list_inputs(str(tmp_path / "one.txt"))) == ["2"]


def test_manifest_errors_and_mixed_filesystems(tmp_path):
    (tmp_path / "nopath.csv").write_text("file,label\na.jpg,1\n")
    with pytest.raises(DinosegError, match="no 'path' column"):
        list(list_inputs(str(tmp_path / "nopath.csv")))
    pq.write_table(pa.table({"url": ["a.jpg"]}), tmp_path / "nopath.parquet")
    with pytest.raises(DinosegError, match="no 'path' column"):
        list(list_inputs(str(tmp_path / "nopath.parquet")))
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(DinosegError, match="lists no paths"):
        list(list_inputs(str(tmp_path / "empty.txt")))
    (tmp_path / "mixed.txt").write_text("s3://bkt/a/1.jpg\nmemory://bkt/a/2.jpg\n/local/a/3.jpg\n")
    rows = list(list_inputs(str(tmp_path / "mixed.txt")))  # no common prefix: the path without scheme
    assert [(r["path"], r["key"]) for r in rows] == [
        ("s3://bkt/a/1.jpg", "bkt/a/1"), ("memory://bkt/a/2.jpg", "bkt/a/2"), ("/local/a/3.jpg", "local/a/3"),
    ]


def test_single_file_and_missing_or_empty_inputs(tmp_path):
    write(tmp_path, ["photo.JPG", "notes/readme.txt"])
    (tmp_path / "data.bin").write_bytes(b"x")
    assert [(r["path"], r["key"]) for r in list_inputs(str(tmp_path / "photo.JPG"))] == [(str(tmp_path / "photo.JPG"), "photo")]
    with pytest.raises(DinosegError, match=r"the input '.*nope' does not exist: check the path\."):
        list(list_inputs(str(tmp_path / "nope")))
    with pytest.raises(DinosegError, match=r"holds no images with extensions jpg, jpeg, png, webp, bmp, tif, tiff: check the prefix\."):
        list(list_inputs(str(tmp_path / "notes")))
    with pytest.raises(DinosegError, match="neither an image"):
        list(list_inputs(str(tmp_path / "data.bin")))


def test_make_key_sanitises():
    assert make_key("s3://b/in", "s3://b/in/x/y.jpg") == "x/y"
    assert make_key("s3://b/in/", "s3://b/in//x/./y.tar.jpg") == "x/y.tar"
    assert make_key("/p", "/p/x/y.png", keep_extension=True) == "x/y.png"
    assert make_key("/p/a.jpg", "/p/a.jpg") == "a"
    assert make_key("C:\\data", "C:\\data\\sub\\img.jpg") == "sub/img"  # backslashes are separators
    assert make_key("", "/abs/olute/a.jpg") == "abs/olute/a"  # never a leading '/'
    for bad in ("/p/../etc/passwd.jpg", "/p/x/..\\..\\y.jpg", "/p/a::memory://x.jpg", "/p/a\x00.jpg"):
        with pytest.raises(DinosegError, match="'..'|NUL"):
            make_key("/p", bad)
    with pytest.raises(DinosegError, match="not under"):
        make_key("/p", "/q/a.jpg")
    with pytest.raises(DinosegError, match="not under"):
        make_key("s3://p", "gs://p/a.jpg")


def test_manifest_paths_cannot_escape(tmp_path):
    write(tmp_path, ["in/a.jpg", "b.jpg"])
    (tmp_path / "in" / "m.txt").write_text("a.jpg\n../b.jpg\ns3://bkt/x/../../etc/c.jpg\ns3://bkt/x/d.jpg\n")
    rows = list(list_inputs(str(tmp_path / "in" / "m.txt")))
    # local '..' resolves as the OS would (both files are inside tmp_path); on an object store it is a name
    local = str(tmp_path)[1:]  # the s3 entries leave no common folder: keys are paths without scheme
    assert [(r["path"], r["key"]) for r in rows[:2]] == [
        (str(tmp_path / "in/a.jpg"), f"{local}/in/a"), (str(tmp_path / "b.jpg"), f"{local}/b"),
    ]
    assert (rows[2]["error_stage"], rows[2]["error_type"], rows[2]["key"]) == ("list", "UnsafePath", "")
    assert "'..'" in rows[2]["error_message"]
    assert rows[3]["key"] == "bkt/x/d"
    for r in rows:
        assert ".." not in r["key"].split("/") and not r["key"].startswith("/")


def test_collisions_in_a_folder(tmp_path):
    write(tmp_path, ["a.jpg", "a.png", "b.jpg", "s/c.jpg", "s/c.JPG", "q.jpg", "q.png", "q.jpg.png"])
    rows = list(list_inputs(str(tmp_path)))
    got = {str(Path(r["path"]).relative_to(tmp_path)): (r["key"], r["error_stage"], r["error_type"]) for r in rows}
    assert got == {
        "a.jpg": ("a.jpg", "", ""), "a.png": ("a.png", "", ""), "b.jpg": ("b", "", ""),  # all keep the extension
        "q.jpg": ("", "list", "KeyCollision"),  # 'q.jpg' is the plain key of q.jpg.png, and the plain key wins
        "q.jpg.png": ("q.jpg", "", ""), "q.png": ("q.png", "", ""),
        "s/c.JPG": ("s/c.JPG", "", ""), "s/c.jpg": ("s/c.jpg", "", ""),
    }
    assert "already used" in next(r for r in rows if r["path"].endswith("/q.jpg"))["error_message"]
    assert rows == list(list_inputs(str(tmp_path)))  # deterministic


def test_collisions_in_a_manifest(tmp_path):
    entries = ["/d/a.jpg", "/d/b.jpg", "/d/a.png", "/d/a.jpg", "/d/q.jpg.png", "/d/q.jpg", "/d/q.png"]
    (tmp_path / "m.txt").write_text("\n".join(entries))
    rows = list(list_inputs(str(tmp_path / "m.txt")))
    assert [(r["key"], r["error_stage"]) for r in rows] == [
        ("a.jpg", ""), ("b", ""), ("a.png", ""), ("", "list"), ("q.jpg", ""), ("", "list"), ("q.png", ""),
    ]
    assert "listed more than once" in rows[3]["error_message"] and rows[3]["error_type"] == "DuplicateInput"
    assert "already used" in rows[5]["error_message"] and rows[5]["error_type"] == "KeyCollision"


# ---- reading ---------------------------------------------------------------------------------


def test_read_bytes_missing_file_among_good_ones(tmp_path):
    write(tmp_path, ["a.jpg", "b[1].jpg", "b1.jpg"], b"A")
    (tmp_path / "b[1].jpg").write_bytes(b"B")  # a glob character in a name is read literally
    (tmp_path / "dir.jpg").mkdir()
    paths = [str(tmp_path / n) for n in ("a.jpg", "gone.jpg", "b[1].jpg", "dir.jpg", "earlier.jpg")]
    b = batch(paths)
    b["error_stage"] = np.array(["", "", "", "", "decode"], dtype="<U6")  # fixed-width: must not truncate
    b["error_type"][4], b["error_message"][4] = "X", "failed before"
    out = ReadBytes()(b)
    assert list(out["bytes"]) == [b"A", b"", b"B", b"", b""]
    assert list(out["error_stage"]) == ["", "read", "", "read", "decode"]
    assert out["error_message"][1] == f"cannot read '{paths[1]}': it does not exist (deleted or moved after listing?)."
    assert "folder" in out["error_message"][3]
    assert out["error_type"][1] == "FileNotFoundError" and out["error_message"][4] == "failed before"
    assert out["bytes"].dtype == object and list(out["key"]) == list(b["key"])


# ---- decoding --------------------------------------------------------------------------------


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
        rgb, w, h = decode_image(image_bytes(fmt, (5, 3), (200, 100, 50), **({"lossless": True} if fmt == "WEBP" else {})))
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


def test_pipeline_sources_does_not_import_ray():
    code = "import sys, pipeline.sources, pipeline.decode; print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
