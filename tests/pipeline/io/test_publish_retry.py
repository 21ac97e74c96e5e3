"""A part publish or a run.json write that meets transient faults is tried again and never
costs finished rows (pipeline.io.parts, pipeline.io.records)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from botocore.exceptions import EndpointConnectionError

from model.errors import DinosegError
from pipeline.io import files, parts, records, retry
from pipeline.io.parts import RollingParquetWriter, close_all, read_parts

SCHEMA = pa.schema([("key", pa.string())])


@pytest.fixture(autouse=True)
def _no_waiting(monkeypatch):
    monkeypatch.setattr(retry, "BACKOFF_S", 0.0)


def flaky_writes(monkeypatch, module, fail: int):
    """Make `module.write_bytes_atomic` fail `fail` times in a row (endpoint unreachable), then work."""
    state = {"left": fail, "calls": 0}
    real = files.write_bytes_atomic

    def write(url, data, so=None):
        state["calls"] += 1
        if state["left"]:
            state["left"] -= 1
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
        real(url, data, so)

    monkeypatch.setattr(module, "write_bytes_atomic", write)
    return state


def keys(n: int, start: int = 0) -> pa.Table:
    return pa.table({"key": [f"k{i}" for i in range(start, start + n)]}, schema=SCHEMA)


def test_publish_is_retried(tmp_path, monkeypatch):
    state = flaky_writes(monkeypatch, parts, fail=2)
    w = RollingParquetWriter(str(tmp_path / "p"), SCHEMA, max_rows=5)
    w.write(keys(5))  # a full part: published here, after two failures
    assert state["calls"] == 3
    w.close()
    assert read_parts(str(tmp_path / "p"), ["key"])["key"].to_pylist() == [f"k{i}" for i in range(5)]


def test_a_part_that_still_fails_waits_for_the_next_flush(tmp_path, monkeypatch):
    flaky_writes(monkeypatch, parts, fail=retry.ATTEMPTS)  # the whole first publish fails
    w = RollingParquetWriter(str(tmp_path / "p"), SCHEMA, max_rows=5)
    w.write(keys(5))  # does not raise: the rows stay in memory
    assert w.unpublished_rows == 5 and read_parts(str(tmp_path / "p"), ["key"]) is None
    w.write(keys(3, start=5))
    w.close()  # the store answers again: both parts published
    got = sorted(read_parts(str(tmp_path / "p"), ["key"])["key"].to_pylist())
    assert got == sorted(f"k{i}" for i in range(8)) and w.rows_written == 8


def test_unpublished_rows_fail_the_run_in_one_sentence_at_the_end(tmp_path, monkeypatch):
    flaky_writes(monkeypatch, parts, fail=10**6)
    a = RollingParquetWriter(str(tmp_path / "a"), SCHEMA)
    b = RollingParquetWriter(str(tmp_path / "b"), SCHEMA)
    a.write(keys(2))
    b.write(keys(3))
    with pytest.raises(DinosegError, match=r"2 finished rows could not be written to .*a .*re-run") as e:
        close_all(a, b)
    assert "\n" not in str(e.value)
    assert b.unpublished_rows == 3  # b was tried too, not skipped by a's failure


def test_run_json_write_is_retried(tmp_path, monkeypatch):
    flaky_writes(monkeypatch, records, fail=2)
    url = records.write_run_json(str(tmp_path), {"counts": {"inputs": 1}})
    assert json.loads(open(url).read())["counts"] == {"inputs": 1}


def test_run_json_that_cannot_be_written_is_one_sentence(tmp_path, monkeypatch):
    flaky_writes(monkeypatch, records, fail=10**6)
    with pytest.raises(DinosegError, match="rows are safe .*re-run the same command"):
        records.write_run_json(str(tmp_path), {"counts": {}})


def test_read_json_out_of_reach_is_not_missing(monkeypatch, tmp_path):
    import fsspec

    def down(*a, **k):
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")

    monkeypatch.setattr(fsspec, "open", down)
    with pytest.raises(DinosegError, match="did not answer"):
        records.read_json(str(tmp_path / "selection.json"), None)
