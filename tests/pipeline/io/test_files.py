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


def test_temp_names_are_hidden_short_unique_and_recognised():
    from pipeline.io.files import is_temp_name, temp_name

    long = "é" * 120 + ".png"  # 244 bytes
    names = {temp_name(long) for _ in range(50)}
    assert len(names) == 50 and all(is_temp_name(n) and n.startswith(".") for n in names)
    assert max(len(n.encode()) for n in names) <= 1 + 64 + 1 + 8 + len(".dinoseg-tmp")
    assert all(n.encode().decode() == n for n in names)  # a multi-byte character is never cut in half
    for users in ("a.tmp", ".a.tmp", "x.dinoseg-tmp", ".x.dinoseg-tmp", ".x.ABCDEF12.dinoseg-tmp", "mask.png"):
        assert not is_temp_name(users), users
    # earlier versions' temp names: the next run sweeps them too
    assert is_temp_name(".b.png.0123456789ab.tmp") and is_temp_name(".part-0123abcd-00003.parquet.tmp")


def test_a_long_name_that_fits_the_filesystem_is_written(tmp_path):
    """A 254-byte name works on a 255-byte-per-name filesystem: the temporary name must not be
    longer than the name itself (`.` + name + `.<hex>.tmp` was 272 bytes: ENAMETOOLONG)."""
    name = "a" * 250 + ".png"
    write_bytes_atomic(str(tmp_path / "masks" / name), b"whole")
    assert (tmp_path / "masks" / name).read_bytes() == b"whole"
    assert os.listdir(tmp_path / "masks") == [name]


def test_a_name_too_long_for_the_filesystem_is_one_clear_error(tmp_path):
    from model.errors import DinosegError

    with pytest.raises(DinosegError, match=r"260 bytes, too long for this filesystem.*shorten the input's name"):
        write_bytes_atomic(str(tmp_path / "masks" / ("b" * 256 + ".png")), b"x")
    assert os.listdir(tmp_path / "masks") == []  # no temp file left either


def test_sweep_removes_only_our_temp_files_under_output(tmp_path):
    from pipeline.io.files import sweep_temp_files, temp_name

    out, outside = tmp_path / "out", tmp_path / "outside"
    (out / "masks" / "a").mkdir(parents=True)
    (out / "predictions").mkdir()
    outside.mkdir()
    ours = [
        out / "masks" / "a" / temp_name("k.png"),
        out / "predictions" / temp_name("part-0123abcd-00000.parquet"),
        out / temp_name("run.json"),
        out / "predictions" / ".part-0123abcd-00001.parquet.tmp",  # an earlier version's
    ]
    users = [out / "masks" / "a" / "k.png", out / "notes.tmp", out / ".hidden", out / "x.dinoseg-tmp"]
    for p in ours + users:
        p.write_bytes(b"x")
    (outside / temp_name("theirs.png")).write_bytes(b"not ours")
    (out / "masks" / "link").symlink_to(outside, target_is_directory=True)  # not followed
    assert sweep_temp_files(str(out)) == len(ours)
    assert not any(p.exists() for p in ours) and all(p.exists() for p in users)
    assert len(os.listdir(outside)) == 1
    assert sweep_temp_files(str(out)) == 0 and sweep_temp_files(str(tmp_path / "missing")) == 0


def _streaming_fs():
    """A filesystem where a write streams into the name it is given (like sftp, ftp, webdav):
    a memory filesystem that records every name written, and can die half-way through one."""
    from fsspec.implementations.memory import MemoryFileSystem

    class Streaming(MemoryFileSystem):
        protocol = ("dinoseg-streaming",)
        written: list = []
        fail_after: int | None = None  # bytes written before a simulated kill

        @classmethod
        def _strip_protocol(cls, path):
            return MemoryFileSystem._strip_protocol(path.removeprefix("dinoseg-streaming://"))

        def pipe_file(self, path, value, **kwargs):
            path = self._strip_protocol(path)
            type(self).written.append(path.rsplit("/", 1)[-1])
            if self.fail_after is not None:
                super().pipe_file(path, value[: self.fail_after])  # half the file is there...
                raise ConnectionResetError("killed mid-write")  # ...when the writer dies
            super().pipe_file(path, value)

    Streaming.store, Streaming.pseudo_dirs = {}, [""]
    fsspec.register_implementation("dinoseg-streaming", Streaming, clobber=True)
    return Streaming


def test_streaming_backends_write_a_temp_name_then_move_so_the_final_name_is_never_half(tmp_path):
    from pipeline.io.files import is_temp_name, sweep_temp_files

    fs_cls = _streaming_fs()
    url = "dinoseg-streaming://out/masks/k.png"
    write_bytes_atomic(url, b"first whole file")
    fs = fsspec.filesystem("dinoseg-streaming")
    assert fs.cat_file("/out/masks/k.png") == b"first whole file"
    assert fs_cls.written and all(is_temp_name(n) for n in fs_cls.written)  # never the final name
    fs_cls.fail_after = 4
    with pytest.raises(ConnectionResetError):
        write_bytes_atomic(url, b"second whole file")
    assert fs.cat_file("/out/masks/k.png") == b"first whole file"  # the old file, whole
    assert fs.ls("/out/masks", detail=False) == ["/out/masks/k.png"]  # the cut-short temp file removed
    fs_cls.fail_after = None
    fs.pipe_file("/out/masks/.k.png.0a1b2c3d.dinoseg-tmp", b"left by a kill")
    assert sweep_temp_files("dinoseg-streaming://out") == 1
    assert fs.ls("/out/masks", detail=False) == ["/out/masks/k.png"]


def test_read_only_outputs_are_refused(tmp_path):
    from model.errors import DinosegError

    with pytest.raises(DinosegError, match=r"read-only filesystem \(https://\).*local folder or an object store"):
        write_bytes_atomic("https://example.invalid/out/run.json", b"{}")
