"""Keys: an input's path under the INPUT root -> its key, sanitised or refused; folded keys, the
registry that keeps them unique and stable, and what an earlier run recorded."""

from __future__ import annotations

import pytest

from model.errors import DinosegError
from pipeline.data import keys as keys_module
from pipeline.data.keys import KeyRegistry, fold_key, is_safe_key, make_key, recorded_keys


def test_make_key_sanitises():
    assert make_key("s3://b/in", "s3://b/in/x/y.jpg") == "x/y"
    assert make_key("s3://b/in/", "s3://b/in//x/./y.tar.jpg") == "x/y.tar"
    assert make_key("/p", "/p/x/y.png", keep_extension=True) == "x/y.png"
    assert make_key("/p/a.jpg", "/p/a.jpg") == "a"
    assert make_key("", "/abs/olute/a.jpg") == "abs/olute/a"  # never a leading '/'
    for bad in ("/p/../etc/passwd.jpg", "/p/a::memory://x.jpg", "/p/a\x00.jpg"):
        with pytest.raises(DinosegError, match="'..'|NUL"):
            make_key("/p", bad)
    for bad in ("/p/x/..\\..\\y.jpg", "/p/a\\b.jpg", "s3://b/in/x\\y.jpg"):  # a separator on Windows and in zips
        with pytest.raises(DinosegError, match="has a backslash in its name.*: rename the file"):
            make_key("/p" if bad.startswith("/") else "s3://b/in", bad)
    with pytest.raises(DinosegError, match="not under"):
        make_key("/p", "/q/a.jpg")
    with pytest.raises(DinosegError, match="not under"):
        make_key("s3://p", "gs://p/a.jpg")


def test_backslash_separates_only_local_windows_paths(monkeypatch):
    monkeypatch.setattr(keys_module, "WINDOWS_LOCAL", True)
    assert make_key("C:\\data", "C:\\data\\sub\\img.jpg") == "sub/img"
    with pytest.raises(DinosegError, match="backslash"):  # an object store's name, even there
        make_key("s3://b/in", "s3://b/in/x\\y.jpg")


def test_fold_key_is_what_a_forgiving_disk_equates():
    assert fold_key("a\\b") == fold_key("a/b") == fold_key("A//./B") == "a/b"
    assert fold_key("caf\u00e9") == fold_key("CAFE\u0301") == "caf\u00e9"  # NFC and NFD, any case
    assert fold_key("Stra\u00dfe") == fold_key("STRASSE")  # full case folding
    assert fold_key("x\u00b2") != fold_key("x2")  # a superscript is no alias on any disk (NFC, not NFKC)
    assert fold_key("\uff21") != fold_key("a")  # nor a full-width letter


def test_is_safe_key():
    for good in ("a", "a/b.jpg", "..a", "a..", "caf\u00e9", "C:x"):
        assert is_safe_key(good), good
    for bad in ("", "/a", "\\a", "x\\y", "a/../b", "..", "a//b", "a/./b", "a\x00", "a::b"):
        assert not is_safe_key(bad), bad


def test_registry_collisions_duplicates_and_recorded_keys():
    reg = KeyRegistry({"/in/a.jpg": "a", "/in/gone.jpg": "gone", "/in/evil.jpg": "../x"})
    assert reg.claim("/in/A.png", "A")["error_type"] == "KeyCollision"  # reserved for /in/a.jpg
    assert reg.claim("/in/a.jpg", "a.jpg")["key"] == "a"  # the recorded path keeps its key
    dup = reg.claim("/in/a.jpg", "a.jpg")
    assert dup["error_type"] == "DuplicateInput" and dup["key"] == ""
    clash = reg.claim("/in/new/GONE.jpg", "GONE")  # a gone image's mask is still there
    assert clash["error_type"] == "KeyCollision" and "'/in/gone.jpg'" in clash["error_message"]
    assert "'/in/new/GONE.jpg'" in clash["error_message"] and "rename one" in clash["error_message"]
    assert reg.claim("/in/evil.jpg", "evil")["key"] == "evil"  # an unsafe recorded key is not kept
    assert reg.claim("/in/x/y.jpg", "x/y")["key"] == "x/y"
    assert reg.claim("/in/X/y.png", "X/y")["error_type"] == "KeyCollision"


def test_recorded_keys_reads_predictions_and_errors(tmp_path):
    import pyarrow as pa

    from pipeline.io.parts import RollingParquetWriter

    assert recorded_keys(str(tmp_path)) == {}
    for folder, rows in (
        ("predictions", [("/in/a.jpg", "a"), ("/in/b.jpg", "b")]),
        ("errors", [("/in/b.jpg", "b-old"), ("/in/c.jpg", "c"), ("/in/sub", "")]),
    ):
        w = RollingParquetWriter(str(tmp_path / folder), pa.schema([("path", pa.string()), ("key", pa.string())]))
        w.write(pa.table({"path": [p for p, _ in rows], "key": [k for _, k in rows]}))
        w.close()
    assert recorded_keys(str(tmp_path)) == {"/in/a.jpg": "a", "/in/b.jpg": "b", "/in/c.jpg": "c"}


def test_registry_compares_paths_without_credentials():
    # parts hold redacted paths (pipeline.io.secrets): the next listing sees the raw URLs again
    reg = KeyRegistry(
        recorded_keys_of(
            {"http://u:CANARY@h:8/a/x.jpg": "a/x", "http://h:8/b/y.jpg?X-Amz-Signature=SIG1&X-Amz-Expires=3": "b/y"}
        )
    )
    assert reg.claim("http://u:CANARY@h:8/a/x.jpg", "x") == {**reg_row("http://u:CANARY@h:8/a/x.jpg", "a/x")}
    y = reg.claim("http://h:8/b/y.jpg?X-Amz-Signature=SIG2&X-Amz-Expires=3", "y")
    assert (y["key"], y["error_type"]) == ("b/y", "")
    again = reg.claim("http://h:8/b/y.jpg?X-Amz-Signature=SIG3&X-Amz-Expires=3", "y")  # another signature
    assert (again["key"], again["error_type"]) == ("", "DuplicateInput")
    assert reg.unlisted() == 0


def test_registry_memory_per_input():
    import tracemalloc

    n = 20_000
    rec = {
        f"s3://bucket/datasets/batch-{i // 1000:05d}/IMG_{i:08d}.jpg": f"batch-{i // 1000:05d}/IMG_{i:08d}"
        for i in range(n)
    }
    tracemalloc.start()
    try:
        reg = KeyRegistry(rec)  # the recorded mapping is used as given, not copied
        for path, key in rec.items():
            reg.claim(path, key)
        used = tracemalloc.get_traced_memory()[0] / n
    finally:
        tracemalloc.stop()
    assert used < 140, f"{used:.0f} bytes per input"  # 165 before: a copy of the map, owners, folds twice


def recorded_keys_of(rows: dict[str, str]) -> dict[str, str]:
    """What `recorded_keys` reads back after a run wrote these rows through real parts."""
    import tempfile

    import pyarrow as pa

    from pipeline.io.parts import RollingParquetWriter

    with tempfile.TemporaryDirectory() as tmp:
        w = RollingParquetWriter(f"{tmp}/predictions", pa.schema([("path", pa.string()), ("key", pa.string())]))
        w.write(pa.table({"path": list(rows), "key": list(rows.values())}))
        w.close()
        got = recorded_keys(tmp)
    assert not any("CANARY" in p or "SIG" in p for p in got)  # the parts hold no credentials
    return got


def reg_row(path: str, key: str) -> dict:
    from pipeline.data.keys import input_row

    return input_row(path, key)
