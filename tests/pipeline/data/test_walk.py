"""The folder walk: symbolic links followed only within INPUT (real links in tmp_path), failed
listings retried, botocore's non-OSError faults caught, and unlisted folders counted."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileSystem
from test_sources import batch, image_bytes, write

from model.errors import DinosegError
from pipeline.data.sources import ReadBytes, list_inputs
from pipeline.data.walk import storage_fault
from pipeline.io import retry


@pytest.fixture(autouse=True)
def _no_pauses(monkeypatch):
    monkeypatch.setattr(retry, "BACKOFF_S", 0.0)


def rel_rows(rows, root: Path) -> dict:
    return {str(Path(r["path"]).relative_to(root)): (r["key"], r["error_type"]) for r in rows}


# ---- symbolic links --------------------------------------------------------------------------


def test_symlinks_are_followed_within_input_and_refused_outside(tmp_path):
    inp, outside = tmp_path / "in", tmp_path / "secret"
    write(inp, ["real/a.jpg", "b.jpg"])
    write(outside, ["s.jpg", "d/t.jpg"])
    (inp / "link.jpg").symlink_to(inp / "b.jpg")  # a file within INPUT
    (inp / "linked").symlink_to(inp / "real", target_is_directory=True)  # a folder within INPUT
    (inp / "leak.jpg").symlink_to(outside / "s.jpg")  # a file outside
    (inp / "out").symlink_to(outside / "d", target_is_directory=True)  # a folder outside
    (inp / "real" / "up").symlink_to(inp, target_is_directory=True)  # a loop
    (inp / "rel.png").symlink_to("real/a.jpg")  # a relative link within INPUT
    (inp / "notes.txt").symlink_to(outside / "s.jpg")  # not an image name: not an input at all
    stats: dict = {}
    rows = list(list_inputs(str(inp), stats=stats, refuse_outside_links=True))  # as segment lists
    got = rel_rows(rows, inp)
    assert got == {
        "b.jpg": ("b", ""),
        "link.jpg": ("link", ""),
        "rel.png": ("rel", ""),
        "leak.jpg": ("", "SymlinkOutsideInput"),
        "out": ("", "SymlinkOutsideInput"),
        "linked/a.jpg": ("linked/a", ""),
        "real/a.jpg": ("real/a", ""),
        "real/up": ("", "SymlinkLoop"),
        "linked/up": ("", "SymlinkLoop"),  # the same loop, seen through the followed link
    }
    assert stats == {"symlinks_refused": 2}
    leak = next(r for r in rows if r["path"].endswith("leak.jpg"))
    assert "outside INPUT" in leak["error_message"] and "not read" in leak["error_message"]
    # nothing outside INPUT is ever read: the rows that reach ReadBytes are only those within
    assert not any(str(outside) in r["path"] for r in rows if not r["error_stage"])


def test_links_out_of_input_are_followed_unless_refused(tmp_path):
    # a split folder of links into a shared store: train, evaluate and export read it as it is
    write(tmp_path / "store", ["a.jpg", "b.jpg", "d/c.jpg"])
    split = tmp_path / "split" / "images"
    split.mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        (split / name).symlink_to(tmp_path / "store" / name)
    (split / "d").symlink_to(tmp_path / "store" / "d", target_is_directory=True)
    stats: dict = {}
    rows = list(list_inputs(str(split), stats=stats))
    assert [(r["key"], r["error_type"]) for r in rows] == [("a", ""), ("b", ""), ("d/c", "")]
    assert [r["path"] for r in rows][0] == str(split / "a.jpg")  # the link's own path, read through it
    assert stats == {}
    refused = list(list_inputs(str(split), stats=stats, refuse_outside_links=True))
    assert [r["error_type"] for r in refused] == ["SymlinkOutsideInput"] * 3 and stats == {"symlinks_refused": 3}


def test_input_given_through_a_symlink_is_walked(tmp_path):
    write(tmp_path / "data", ["a.jpg", "s/b.jpg"])
    (tmp_path / "alias").symlink_to(tmp_path / "data", target_is_directory=True)
    (tmp_path / "data" / "s" / "c.jpg").symlink_to(tmp_path / "data" / "a.jpg")
    rows = list(list_inputs(str(tmp_path / "alias")))
    assert [(r["key"], r["error_type"]) for r in rows] == [("a", ""), ("s/b", ""), ("s/c", "")]


def test_links_within_input_are_read(tmp_path):
    write(tmp_path / "in", ["a.jpg"])
    (tmp_path / "in" / "l.jpg").symlink_to(tmp_path / "in" / "a.jpg")
    rows = list(list_inputs(str(tmp_path / "in")))
    out = ReadBytes()(batch([r["path"] for r in rows]))
    assert list(out["bytes"]) == [image_bytes()] * 2


# ---- listing faults --------------------------------------------------------------------------


def test_a_transient_listing_fault_is_retried(tmp_path, monkeypatch):
    write(tmp_path, ["a.jpg", "sub/b.jpg"])
    real_ls, fails = LocalFileSystem.ls, {"sub": 2}

    def ls(self, path, *a, **k):
        name = os.path.basename(path)
        if fails.get(name):
            fails[name] -= 1
            raise ConnectionResetError(104, "Connection reset by peer")
        return real_ls(self, path, *a, **k)

    monkeypatch.setattr(LocalFileSystem, "ls", ls)
    stats: dict = {}
    assert [r["key"] for r in list_inputs(str(tmp_path), stats=stats)] == ["a", "sub/b"]
    assert stats == {} and fails == {"sub": 0}


def test_an_unlisted_folder_is_an_error_row_and_counted(tmp_path, monkeypatch):
    write(tmp_path, ["a.jpg", "flaky/b.jpg", "denied/c.jpg"])
    real_ls, calls = LocalFileSystem.ls, {"flaky": 0, "denied": 0}

    def ls(self, path, *a, **k):
        name = os.path.basename(path)
        if name in calls:
            calls[name] += 1
            if name == "denied":
                raise PermissionError(13, "Permission denied", path)
            raise TimeoutError("read timed out")
        return real_ls(self, path, *a, **k)

    monkeypatch.setattr(LocalFileSystem, "ls", ls)
    stats: dict = {}
    rows = list(list_inputs(str(tmp_path), stats=stats))
    assert [(r["key"], r["error_stage"], r["error_type"]) for r in rows] == [
        ("a", "", ""),
        ("", "list", "PermissionError"),
        ("", "list", "TimeoutError"),
    ]
    assert calls == {"flaky": retry.ATTEMPTS, "denied": 1}  # a permanent fault is not retried
    assert stats == {"unlisted_folders": 2}
    for r in rows[1:]:
        assert "its images are missing from this run" in r["error_message"] and "run again" in r["error_message"]
    assert f"after {retry.ATTEMPTS} tries" in rows[2]["error_message"]


class EndpointConnectionError(Exception):  # botocore's: a BotoCoreError, not an OSError
    __module__ = "botocore.exceptions"


def test_botocore_faults_that_are_not_oserrors_are_caught(tmp_path, monkeypatch):
    write(tmp_path, ["a.jpg", "sub/b.jpg"])
    real_ls = LocalFileSystem.ls

    def ls(self, path, *a, **k):
        if path.endswith("sub"):
            raise EndpointConnectionError('Could not connect to the endpoint URL: "http://127.0.0.1:9"')
        return real_ls(self, path, *a, **k)

    monkeypatch.setattr(LocalFileSystem, "ls", ls)
    stats: dict = {}
    rows = list(list_inputs(str(tmp_path), stats=stats))
    assert [(r["key"], r["error_type"]) for r in rows] == [("a", ""), ("", "EndpointConnectionError")]
    assert stats == {"unlisted_folders": 1}
    assert storage_fault(ValueError("x")) is None and storage_fault(FileNotFoundError()) == "permanent"


def test_an_unreachable_endpoint_is_one_sentence(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = {
        "key": "k",
        "secret": "s",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
        "config_kwargs": {"retries": {"max_attempts": 1}},
    }
    monkeypatch.setattr(retry, "ATTEMPTS", 2)
    with pytest.raises(DinosegError, match=r"cannot look at 's3://bkt/in/' \(EndpointConnectionError") as e:
        list(list_inputs("s3://bkt/in/", options))
    assert "\n" not in str(e.value) and "run again" in str(e.value)


def test_a_manifest_unreachable_mid_read_is_one_sentence(tmp_path, monkeypatch):
    (tmp_path / "m.txt").write_text("/d/a.jpg\n")

    def unreachable(self, path, *a, **k):
        raise EndpointConnectionError('Could not connect to the endpoint URL: "http://127.0.0.1:9/m.txt"')

    monkeypatch.setattr(LocalFileSystem, "open", unreachable)
    with pytest.raises(DinosegError, match=r"cannot read the manifest .*EndpointConnectionError.*run again\.$"):
        list(list_inputs(str(tmp_path / "m.txt")))


# ---- object stores ---------------------------------------------------------------------------


def test_objects_under_a_doubled_slash_are_an_error_row_never_left_out(s3_bucket):
    import fsspec

    bucket, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    for name in ("in/x/y.jpg", "in/x//y.jpg", "in/x//w.jpg", "in/q.jpg"):
        fs.pipe(f"{bucket}/{name}", b"x")
    fs.pipe(f"{bucket}/in/x/", b"")  # a folder placeholder object: skipped
    stats: dict = {}
    rows = list(list_inputs(f"s3://{bucket}/in", options, stats=stats))
    assert [(r["path"], r["key"], r["error_type"]) for r in rows] == [
        (f"s3://{bucket}/in/q.jpg", "q", ""),
        (f"s3://{bucket}/in/x/y.jpg", "x/y", ""),
        (f"s3://{bucket}/in/x//", "", "UnlistableFolder"),
    ]
    assert "images are missing from this run" in rows[2]["error_message"]
    assert stats == {"unlisted_folders": 1}  # the run says its listing is incomplete
