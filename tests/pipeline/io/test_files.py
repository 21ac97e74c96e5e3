"""Atomic writes (local: temporary name then rename; remote: one PUT) and absolute paths for workers."""

from __future__ import annotations

import os

import fsspec
import pytest

from pipeline.io.files import write_bytes_atomic


def test_atomic_write_creates_folders_leaves_no_temp_file_and_overwrites(tmp_path):
    url = str(tmp_path / "out" / "masks" / "a" / "b.png")
    write_bytes_atomic(url, b"first")
    write_bytes_atomic(url, b"second, longer")
    assert open(url, "rb").read() == b"second, longer"
    assert os.listdir(tmp_path / "out" / "masks" / "a") == ["b.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(url).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    write_bytes_atomic("file://" + str(tmp_path / "c.png"), b"via file://")
    assert (tmp_path / "c.png").read_bytes() == b"via file://"


def test_failed_atomic_write_removes_its_temp_file(tmp_path):
    (tmp_path / "taken.png").mkdir()  # the target is a folder: the rename fails
    with pytest.raises(OSError):
        write_bytes_atomic(str(tmp_path / "taken.png"), b"data")
    assert os.listdir(tmp_path) == ["taken.png"] and not os.listdir(tmp_path / "taken.png")


def test_atomic_write_remote(s3_bucket):
    bucket, so = s3_bucket
    url = f"s3://{bucket}/out/masks/x/y.png"
    write_bytes_atomic(url, b"one", so)
    write_bytes_atomic(url, b"two", so)
    assert fsspec.open(url, "rb", **so).open().read() == b"two"
    write_bytes_atomic("memory://dinoseg-test/masks/deep/k.png", b"mem")  # a filesystem with folders
    assert fsspec.filesystem("memory").cat_file("/dinoseg-test/masks/deep/k.png") == b"mem"


def test_local_inputs_the_workers_read_become_absolute(tmp_path, monkeypatch):
    from pipeline.io.files import absolute_input

    monkeypatch.chdir(tmp_path)
    assert absolute_input("./run/head.pt") == str(tmp_path / "run" / "head.pt")
    for unchanged in (None, "random", "s3://b/head.pt", "file:///x/head.pt", "/abs/head.pt"):
        assert absolute_input(unchanged) == unchanged
