"""Sources: listing folders, prefixes and globs (keys, collisions in a folder) and reading bytes.
Manifests are in test_manifest.py, keys in test_keys.py, decoding in test_decode.py."""

from __future__ import annotations

import inspect
import io
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from model.errors import DinosegError
from pipeline.data.schema import ERROR_FIELDS
from pipeline.data.sources import IMAGE_EXTENSIONS, ReadBytes, list_inputs

ROOT = Path(__file__).resolve().parents[3]


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
    monkeypatch.setattr(
        LocalFileSystem, "ls", lambda self, path, *a, **k: calls.append(path) or real_ls(self, path, *a, **k)
    )
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
        ("a", "", ""),
        ("", "list", "PermissionError"),
        ("good/c", "", ""),
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


def test_single_file_and_missing_or_empty_inputs(tmp_path):
    write(tmp_path, ["photo.JPG", "notes/readme.txt"])
    (tmp_path / "data.bin").write_bytes(b"x")
    assert [(r["path"], r["key"]) for r in list_inputs(str(tmp_path / "photo.JPG"))] == [
        (str(tmp_path / "photo.JPG"), "photo")
    ]
    with pytest.raises(DinosegError, match=r"the input '.*nope' does not exist: check the path\."):
        list(list_inputs(str(tmp_path / "nope")))
    with pytest.raises(
        DinosegError, match=r"holds no images with extensions jpg, jpeg, png, webp, bmp, tif, tiff: check the prefix\."
    ):
        list(list_inputs(str(tmp_path / "notes")))
    with pytest.raises(DinosegError, match="neither an image"):
        list(list_inputs(str(tmp_path / "data.bin")))


def test_collisions_in_a_folder(tmp_path):
    write(tmp_path, ["a.jpg", "a.png", "b.jpg", "s/c.jpg", "s/c.JPG", "q.jpg", "q.png", "q.jpg.png"])
    rows = list(list_inputs(str(tmp_path)))
    got = {str(Path(r["path"]).relative_to(tmp_path)): (r["key"], r["error_stage"], r["error_type"]) for r in rows}
    assert got == {
        "a.jpg": ("a.jpg", "", ""),
        "a.png": ("a.png", "", ""),
        "b.jpg": ("b", "", ""),  # all keep the extension
        "q.jpg": ("", "list", "KeyCollision"),  # 'q.jpg' is the plain key of q.jpg.png, and the plain key wins
        "q.jpg.png": ("q.jpg", "", ""),
        "q.png": ("q.png", "", ""),
        "s/c.JPG": ("s/c.JPG", "", ""),  # keys are compared casefolded: one file on macOS or Windows
        "s/c.jpg": ("", "list", "KeyCollision"),
    }
    assert "already used" in next(r for r in rows if r["path"].endswith("/q.jpg"))["error_message"]
    assert rows == list(list_inputs(str(tmp_path)))  # deterministic


def test_keys_are_unique_over_the_whole_listing(tmp_path):
    nfc, nfd = "caf\u00e9/x.jpg", "cafe\u0301/x.png"  # two folders, one name once normalised
    write(tmp_path, ["a\\b.jpg", "a/b.jpg", "X/p.jpg", "x/p.jpg", nfc, nfd, "k.jpg", "K/k.jpg", "m.jpg", "M.png"])
    rows = list(list_inputs(str(tmp_path)))
    assert len(rows) == 10  # one row per input
    got = {str(Path(r["path"]).relative_to(tmp_path)): (r["key"], r["error_type"]) for r in rows}
    assert got == {
        "X/p.jpg": ("X/p", ""),
        "a\\b.jpg": ("", "UnsafePath"),  # a separator on Windows: refused, never taken for 'a/b'
        "a/b.jpg": ("a/b", ""),
        "caf\u00e9/x.jpg": ("", "KeyCollision"),  # one name once Unicode-normalised (macOS)
        "cafe\u0301/x.png": ("cafe\u0301/x", ""),  # NFD sorts first
        "k.jpg": ("k", ""),
        "M.png": ("M.png", ""),  # stems equal but for case keep their extensions, as a.jpg and a.png do
        "m.jpg": ("m.jpg", ""),
        "K/k.jpg": ("K/k", ""),
        "x/p.jpg": ("", "KeyCollision"),  # 'X/p' and 'x/p' are one file on a case-insensitive disk
    }
    message = next(r["error_message"] for r in rows if r["path"].endswith("x/p.jpg"))
    assert f"'{tmp_path / 'x/p.jpg'}'" in message and f"'{tmp_path / 'X/p.jpg'}'" in message
    assert "rename one of them" in message and message.count(". ") == 0  # one sentence, both paths


def test_a_recorded_key_stays_when_a_sibling_appears(tmp_path):
    write(tmp_path, ["a.jpg", "s/b.jpg"])
    first = {r["path"]: r["key"] for r in list_inputs(str(tmp_path))}
    assert first == {str(tmp_path / "a.jpg"): "a", str(tmp_path / "s/b.jpg"): "s/b"}
    write(tmp_path, ["a.png", "s\\b.png", "S/B.jpg"])  # siblings and aliases appear after run 1
    rows = list(list_inputs(str(tmp_path), recorded=first))
    got = {str(Path(r["path"]).relative_to(tmp_path)): (r["key"], r["error_type"]) for r in rows}
    assert got == {
        "a.jpg": ("a", ""),  # as in run 1: its mask and row stay the one image's
        "a.png": ("a.png", ""),
        "s\\b.png": ("", "UnsafePath"),
        "S/B.jpg": ("", "KeyCollision"),  # listed before s/b.jpg, but its key was s/b.jpg's
        "s/b.jpg": ("s/b", ""),
    }
    fresh = {str(Path(r["path"]).relative_to(tmp_path)): r["key"] for r in list_inputs(str(tmp_path))}
    assert fresh["a.jpg"] == "a.jpg" and fresh["a.png"] == "a.png"  # without a record: the rule alone


def test_a_renamed_input_resumes_and_gone_inputs_keep_their_keys(tmp_path):
    import pyarrow as pa

    from pipeline.data.keys import recorded_keys
    from pipeline.io.parts import RollingParquetWriter

    write(tmp_path / "photos", ["a.jpg", "a.png", "sub/b.jpg", "gone.jpg"])
    rows = list(list_inputs(str(tmp_path / "photos")))
    w = RollingParquetWriter(
        str(tmp_path / "out/predictions"), pa.schema([("path", pa.string()), ("key", pa.string())])
    )
    w.write(pa.table({"path": [r["path"] for r in rows], "key": [r["key"] for r in rows]}))
    w.close()
    (tmp_path / "photos").rename(tmp_path / "photos-2026")  # renamed, remounted, or OUTPUT copied along
    (tmp_path / "photos-2026" / "gone.jpg").unlink()
    (tmp_path / "photos-2026" / "a.png").unlink()  # a.jpg alone now: it keeps 'a.jpg' all the same
    write(tmp_path / "photos-2026", ["gone.png"])
    stats: dict = {}
    again = list(list_inputs(str(tmp_path / "photos-2026"), recorded=recorded_keys(str(tmp_path / "out")), stats=stats))
    got = {str(Path(r["path"]).relative_to(tmp_path / "photos-2026")): (r["key"], r["error_type"]) for r in again}
    assert got == {
        "a.jpg": ("a.jpg", ""),  # the same file relative to INPUT: its key, its mask, skipped as done
        "gone.png": ("", "KeyCollision"),  # gone.jpg's mask is still in OUTPUT under 'gone'
        "sub/b.jpg": ("sub/b", ""),
    }
    assert stats == {"recorded_not_listed": 2}  # a.png and gone.jpg: their keys stay reserved


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


def test_pipeline_sources_does_not_import_ray():
    code = "import sys, pipeline.data.sources, pipeline.data.decode; print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
