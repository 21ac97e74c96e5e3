"""Rolling Parquet parts: published whole, sized, and read back for resume."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.schema import ERROR_SCHEMA
from pipeline.io.parts import RollingParquetWriter, done_keys


def rows(keys):
    """Error rows for `keys` (fields the test does not set are null)."""
    return pa.Table.from_pylist(
        [
            {"path": f"/in/{k}.jpg", "key": k, "stage": "decode", "error_type": "DecodeError", "message": "bad"}
            for k in keys
        ],
        schema=ERROR_SCHEMA,
    )


def test_parts_roll_by_rows_and_only_complete_parts_count(tmp_path):
    w = RollingParquetWriter(str(tmp_path / "p"), ERROR_SCHEMA, max_rows=3)
    w.write(rows(["a", "b"]))
    assert done_keys(str(tmp_path / "p")) == set()  # nothing published yet: a kill now loses no file
    w.write(rows(["c", "d"]))  # 3 rows: the part is published; d starts the next
    assert done_keys(str(tmp_path / "p")) == {"a", "b", "c"}
    w.write(rows(["e"]))
    w.close()
    parts = sorted((tmp_path / "p").glob("*.parquet"))
    assert len(parts) == 2 and not list((tmp_path / "p").glob(".*"))
    assert pq.read_table(parts).schema.equals(ERROR_SCHEMA)
    assert done_keys(str(tmp_path / "p")) == set("abcde")


def test_done_keys_of_a_missing_folder_is_empty(tmp_path):
    assert done_keys(str(tmp_path / "nothing")) == set()


def test_s3_parts(s3_bucket):
    bucket, so = s3_bucket
    w = RollingParquetWriter(f"s3://{bucket}/out/errors", ERROR_SCHEMA, so)
    w.write(rows(["x/y", "z"]))
    w.close()
    assert done_keys(f"s3://{bucket}/out/errors", so) == {"x/y", "z"}


def _two_parts_and_cut_the_first(folder: str, so=None) -> str:
    """Publish parts {a, b} and {c}, then cut the first short (a backend that streamed it, a
    damaged disk); returns the cut part's URL."""
    import fsspec

    w = RollingParquetWriter(folder, ERROR_SCHEMA, so, max_rows=2)
    w.write(rows(["a", "b"]))
    w.write(rows(["c"]))
    w.close()
    fs, root = fsspec.core.url_to_fs(folder, **(so or {}))
    first = sorted(fs.find(root))[0]
    fs.pipe_file(first, fs.cat_file(first)[:50])
    return fs.unstrip_protocol(first)


def test_a_truncated_part_is_skipped_named_and_its_rows_redone(tmp_path, caplog):
    folder = str(tmp_path / "p")
    cut = _two_parts_and_cut_the_first(folder)
    with caplog.at_level("WARNING", logger="pipeline.io.parts"):
        assert done_keys(folder) == {"c"}  # a and b are redone; the resume does not crash
    [record] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert cut.rsplit("/", 1)[-1] in record.getMessage() and "rows will be redone" in record.getMessage()


def test_a_truncated_part_on_s3_is_skipped(s3_bucket, caplog):
    bucket, so = s3_bucket
    folder = f"s3://{bucket}/out/predictions"
    cut = _two_parts_and_cut_the_first(folder, so)
    with caplog.at_level("WARNING", logger="pipeline.io.parts"):
        assert done_keys(folder, so) == {"c"}
    assert any(cut.rsplit("/", 1)[-1] in r.getMessage() for r in caplog.records)


def test_temp_files_are_not_parts_and_parts_go_through_a_temp_name(tmp_path, monkeypatch):
    import os

    from pipeline.io.files import is_temp_name, temp_name

    folder = tmp_path / "p"
    w = RollingParquetWriter(str(folder), ERROR_SCHEMA, max_rows=1)
    renamed = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append((src, dst)), real(src, dst))[1])
    w.write(rows(["a"]))
    [(src, dst)] = renamed
    assert is_temp_name(os.path.basename(src)) and dst.endswith(".parquet")
    (folder / temp_name("part-00000000-00009.parquet")).write_bytes(b"half a part")  # a kill mid-write
    assert done_keys(str(folder)) == {"a"}


def test_rows_per_part_from_the_environment(tmp_path, monkeypatch):
    from model.errors import DinosegError
    from pipeline.io.parts import DEFAULT_PART_ROWS

    assert RollingParquetWriter(str(tmp_path), ERROR_SCHEMA).max_rows == DEFAULT_PART_ROWS
    monkeypatch.setenv("DINOSEG_PART_ROWS", "3")
    assert RollingParquetWriter(str(tmp_path), ERROR_SCHEMA).max_rows == 3
    assert RollingParquetWriter(str(tmp_path), ERROR_SCHEMA, max_rows=7).max_rows == 7  # given: kept
    monkeypatch.setenv("DINOSEG_PART_ROWS", "-1")
    with pytest.raises(DinosegError, match="DINOSEG_PART_ROWS is '-1': give a positive number"):
        RollingParquetWriter(str(tmp_path), ERROR_SCHEMA)


def test_a_big_table_is_split_so_no_part_holds_more_than_max_rows(tmp_path):
    """Ray hands the driver blocks of any size: one write of 5 rows with 2 a part is 3 parts."""
    w = RollingParquetWriter(str(tmp_path / "p"), ERROR_SCHEMA, max_rows=2)
    w.write(rows(list("abcde")))
    w.close()
    sizes = [pq.read_metadata(p).num_rows for p in sorted((tmp_path / "p").glob("*.parquet"))]
    assert sizes == [2, 2, 1] and done_keys(str(tmp_path / "p")) == set("abcde")


def _damage(data: bytes, how: str) -> bytes:
    """Damaged in place, length kept (a bad disk or a copy gone wrong, not a cut)."""
    import io

    if how == "footer":  # pyarrow: a plain OSError "Couldn't deserialize thrift"
        return data[:-12] + bytes(8) + data[-4:]
    key = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(0).column(1)  # the key column's first page
    start = key.dictionary_page_offset + 20  # inside its compressed payload: "ZSTD decompression failed"
    return data[:start] + b"\xff" * 20 + data[start + 20 :]


@pytest.mark.parametrize("how", ["footer", "page"])
def test_a_damaged_part_is_skipped_at_once_not_blamed_on_the_store(tmp_path, caplog, how):
    """pyarrow reports a damaged footer or page as a plain OSError: that is the content's fault,
    so the part is skipped (its rows redone), neither tried again nor taken for the store down."""
    import fsspec

    folder = str(tmp_path / "p")
    w = RollingParquetWriter(folder, ERROR_SCHEMA, max_rows=200)
    w.write(rows([f"k{i}" for i in range(200)]))
    w.write(rows(["c"]))
    w.close()
    fs = fsspec.filesystem("file")
    first = sorted(fs.find(folder))[0]
    fs.pipe_file(first, _damage(fs.cat_file(first), how))
    with caplog.at_level("WARNING"):
        assert done_keys(folder) == {"c"}
    assert not [r for r in caplog.records if r.name == "pipeline.io.retry"], "a damaged part is not tried again"
    [record] = [r for r in caplog.records if r.name == "pipeline.io.parts"]
    assert first.rsplit("/", 1)[-1] in record.getMessage() and "rows will be redone" in record.getMessage()


def test_the_store_failing_under_the_parser_is_tried_again_then_one_sentence(tmp_path, monkeypatch):
    """A read of a part's bytes that the store fails is I/O: tried again (only that part), and a
    store still down is one DinosegError, never a part taken for damaged or missing."""
    from botocore.exceptions import EndpointConnectionError
    from fsspec.implementations.local import LocalFileOpener

    from model.errors import DinosegError
    from pipeline.io import retry

    monkeypatch.setattr(retry, "BACKOFF_S", 0.0)
    folder = str(tmp_path / "p")
    w = RollingParquetWriter(folder, ERROR_SCHEMA, max_rows=2)
    w.write(rows(["a", "b", "c"]))
    w.close()
    real, failures = LocalFileOpener.read, {"left": 2}

    def read(self, *args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LocalFileOpener, "read", read)
    assert done_keys(folder) == {"a", "b", "c"} and failures["left"] == 0
    failures["left"] = 10**6
    with pytest.raises(DinosegError, match="the store did not answer") as e:
        done_keys(folder)
    assert "\n" not in str(e.value) and "EndpointConnectionError" in str(e.value)


def test_parts_the_store_refuses_are_held_up_to_a_cap_then_the_run_fails(tmp_path, monkeypatch):
    """During a long outage the parts waiting in memory are capped (MAX_PENDING_BYTES): past it,
    one sentence, and what was published before stays."""
    from botocore.exceptions import EndpointConnectionError

    from model.errors import DinosegError
    from pipeline.io import files, parts, retry

    monkeypatch.setattr(retry, "BACKOFF_S", 0.0)
    folder = str(tmp_path / "p")
    w = RollingParquetWriter(folder, ERROR_SCHEMA, max_rows=2)
    w.write(rows(["a", "b"]))  # published while the store answers
    down = {"on": True}

    def write(url, data, so=None):
        if down["on"]:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
        files.write_bytes_atomic(url, data, so)

    monkeypatch.setattr(parts, "write_bytes_atomic", write)
    w.write(rows(["c", "d"]))
    one = len(w._pending[0][1])
    monkeypatch.setattr(parts, "MAX_PENDING_BYTES", 2 * one)
    w.write(rows(["e", "f"]))  # two parts held: at the cap, not past it
    assert w.unpublished_rows == 4
    with pytest.raises(DinosegError, match=r"3 parts .*6 finished rows\) could not be written to .*re-run") as e:
        w.write(rows(["g", "h"]))
    assert "\n" not in str(e.value) and "EndpointConnectionError" in str(e.value)
    assert done_keys(folder) == {"a", "b"}, "what was published is kept"
    down["on"] = False
    w.close()  # the store answers again before the run ends: nothing is lost after all
    assert done_keys(folder) == set("abcdefgh")
