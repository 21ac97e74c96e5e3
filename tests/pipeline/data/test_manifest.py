"""Manifests (.txt, .csv, .parquet, local and on a loopback S3): order, relative entries, keys
from the common folder, unsafe paths and collisions."""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_sources import batch, image_bytes, keys, write

from model.errors import DinosegError
from pipeline.data.sources import ReadBytes, list_inputs


def test_manifest_on_s3(s3_bucket):
    bucket, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    for name in ("set/a/1.jpg", "set/b/2.png", "other/3.jpg"):
        fs.pipe(f"{bucket}/{name}", image_bytes())
    fs.pipe(f"{bucket}/set/list.txt", f"a/1.jpg\n/{bucket}/set/b/2.png\ns3://{bucket}/other/3.jpg\n".encode())
    rows = list(list_inputs(f"s3://{bucket}/set/list.txt", options))
    assert [(r["path"], r["key"]) for r in rows] == [
        (f"s3://{bucket}/set/a/1.jpg", "set/a/1"),
        (f"s3://{bucket}/set/b/2.png", "set/b/2"),
        (f"s3://{bucket}/other/3.jpg", "other/3"),
    ]
    out = ReadBytes(options)(batch([r["path"] for r in rows]))
    assert list(out["error_stage"]) == ["", "", ""] and set(out["bytes"]) == {image_bytes()}


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
        ("s3://bkt/a/1.jpg", "bkt/a/1"),
        ("memory://bkt/a/2.jpg", "bkt/a/2"),
        ("/local/a/3.jpg", "local/a/3"),
    ]


def test_manifest_paths_cannot_escape(tmp_path):
    write(tmp_path, ["in/a.jpg", "b.jpg"])
    (tmp_path / "in" / "m.txt").write_text("a.jpg\n../b.jpg\ns3://bkt/x/../../etc/c.jpg\ns3://bkt/x/d.jpg\n")
    rows = list(list_inputs(str(tmp_path / "in" / "m.txt")))
    # local '..' resolves as the OS would (both files are inside tmp_path); on an object store it is a name
    local = str(tmp_path)[1:]  # the s3 entries leave no common folder: keys are paths without scheme
    assert [(r["path"], r["key"]) for r in rows[:2]] == [
        (str(tmp_path / "in/a.jpg"), f"{local}/in/a"),
        (str(tmp_path / "b.jpg"), f"{local}/b"),
    ]
    assert (rows[2]["error_stage"], rows[2]["error_type"], rows[2]["key"]) == ("list", "UnsafePath", "")
    assert "'..'" in rows[2]["error_message"]
    assert rows[3]["key"] == "bkt/x/d"
    for r in rows:
        assert ".." not in r["key"].split("/") and not r["key"].startswith("/")


def test_collisions_in_a_manifest(tmp_path):
    entries = ["/d/a.jpg", "/d/b.jpg", "/d/a.png", "/d/a.jpg", "/d/q.jpg.png", "/d/q.jpg", "/d/q.png"]
    (tmp_path / "m.txt").write_text("\n".join(entries))
    rows = list(list_inputs(str(tmp_path / "m.txt")))
    assert [(r["key"], r["error_stage"]) for r in rows] == [
        ("a.jpg", ""),
        ("b", ""),
        ("a.png", ""),
        ("", "list"),
        ("q.jpg", ""),
        ("", "list"),
        ("q.png", ""),
    ]
    assert "listed more than once" in rows[3]["error_message"] and rows[3]["error_type"] == "DuplicateInput"
    assert "already used" in rows[5]["error_message"] and rows[5]["error_type"] == "KeyCollision"


def test_manifest_keys_stay_when_entries_appear_elsewhere(tmp_path):
    (tmp_path / "m.txt").write_text("/d/x/1.jpg\n/d/x/2.jpg\n")
    first = {r["path"]: r["key"] for r in list_inputs(str(tmp_path / "m.txt"))}
    assert first == {"/d/x/1.jpg": "1", "/d/x/2.jpg": "2"}  # the common folder is /d/x
    (tmp_path / "m.txt").write_text("/d/x/1.jpg\n/d/x/2.jpg\n/e/3.jpg\n/d/1.png\n")  # now it is /
    rows = list(list_inputs(str(tmp_path / "m.txt"), recorded=first))
    assert [(r["key"], r["error_type"]) for r in rows] == [
        ("1", ""),  # as in run 1: no second row, no second mask for one image
        ("2", ""),
        ("e/3", ""),
        ("d/1", ""),
    ]
    assert keys(list_inputs(str(tmp_path / "m.txt"))) == ["d/x/1", "d/x/2", "e/3", "d/1"]  # no record


def test_manifest_entries_that_all_moved_keep_their_keys(tmp_path):
    (tmp_path / "m.txt").write_text("s3://b/photos/x/1.jpg\ns3://b/photos/2.jpg\n")
    first = {r["path"]: r["key"] for r in list_inputs(str(tmp_path / "m.txt"))}
    assert sorted(first.values()) == ["2", "x/1"]
    # the same images under another prefix (a bucket copied, a CDN in front): resumed, not collided
    (tmp_path / "m.txt").write_text("https://cdn.example/p-2026/x/1.jpg\nhttps://cdn.example/p-2026/2.jpg\n")
    rows = list(list_inputs(str(tmp_path / "m.txt"), recorded=first))
    assert [(r["key"], r["error_type"]) for r in rows] == [("x/1", ""), ("2", "")]
    # one image given as INPUT, then moved: its key stays
    write(tmp_path / "new", ["2.jpg"])
    rows = list(list_inputs(str(tmp_path / "new" / "2.jpg"), recorded={"/old/2.jpg": "2"}))
    assert [(r["key"], r["error_type"]) for r in rows] == [("2", "")]


def test_manifest_aliases_from_slashes_dots_and_case(tmp_path):
    entries = [
        "s3://b/in/x/y.jpg",
        "s3://b/in/x//y.jpg",
        "s3://b/in/./x/y.jpg",
        "s3://b/in/X/Y.JPG",
        "s3://b/in/x\\y.jpg",
    ]
    (tmp_path / "m.txt").write_text("\n".join(entries))
    rows = list(list_inputs(str(tmp_path / "m.txt")))
    assert [(r["path"], r["key"], r["error_type"]) for r in rows] == [
        ("s3://b/in/x/y.jpg", "x/y.jpg", ""),  # S3 holds each as an object of its own, so each is listed
        ("s3://b/in/x//y.jpg", "", "KeyCollision"),  # ... but their keys would be one mask
        ("s3://b/in/./x/y.jpg", "", "KeyCollision"),
        ("s3://b/in/X/Y.JPG", "", "KeyCollision"),
        ("s3://b/in/x\\y.jpg", "", "UnsafePath"),
    ]
