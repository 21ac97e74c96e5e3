"""errors/ as the latest state (pipeline.data.error_log): one row per input still failing, none
for an input that succeeded since, published before the old parts go."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.error_log import compact_errors
from pipeline.data.keys import list_error_row
from pipeline.data.schema import ERROR_SCHEMA
from pipeline.io.parts import RollingParquetWriter, read_parts

OLD_SCHEMA = pa.schema([f for f in ERROR_SCHEMA if f.name != "retryable"])  # before the column existed


def error(key: str, message: str, stage: str = "read", error_type: str = "OSError", path: str | None = None) -> dict:
    return {"path": path or f"in/{key}.jpg", "key": key, "stage": stage, "error_type": error_type, "message": message}


def listing_error(path: str, message: str, error_type: str) -> dict:
    """A listing's error row as a run writes it: `list_error_row` (no key), in ERROR_SCHEMA's names."""
    row = list_error_row(path, message, error_type)
    return {
        "path": row["path"],
        "key": row["key"],
        "stage": row["error_stage"],
        "error_type": row["error_type"],
        "message": row["error_message"],
    }


def publish(folder, rows: list[dict], schema=ERROR_SCHEMA) -> str:
    w = RollingParquetWriter(str(folder), schema)
    w.write(pa.Table.from_pylist(rows, schema=schema))
    w.close()
    return w.run


def rows_of(folder) -> dict:
    t = read_parts(str(folder), None)
    return {(r["key"] or r["path"]): r for r in t.to_pylist()}


def test_latest_row_per_key_and_none_for_keys_done_since(tmp_path):
    errors, predictions = tmp_path / "errors", tmp_path / "predictions"
    # run 1: a and b failed; the file was written before `retryable` existed
    publish(errors, [error("a", "SlowDown"), error("b", "corrupt", "decode", "DinosegError")], OLD_SCHEMA)
    # run 2: a succeeded, b failed again, c failed at listing; two folders failed to list
    run = publish(
        errors,
        [
            error("b", "corrupt again", "decode", "DinosegError"),
            listing_error("in/c.jpg", "collision", "KeyCollision"),
            listing_error("in/x", "folder x unlisted", "EndpointConnectionError"),
            listing_error("in/y", "folder y unlisted", "EndpointConnectionError"),
        ],
    )
    publish(predictions, [{"key": "a"}], pa.schema([("key", pa.string())]))
    assert compact_errors(str(errors), str(predictions), None, run) == 4
    rows = rows_of(errors)
    assert sorted(rows) == ["b", "in/c.jpg", "in/x", "in/y"], "a succeeded: not in errors/ any more"
    assert rows["b"]["message"] == "corrupt again" and rows["b"]["retryable"] is False
    assert rows["in/c.jpg"]["retryable"] is False and rows["in/x"]["retryable"] is True
    assert len(read_parts(str(errors), ["key"])) == 4, "one row per input"
    files = [p for p in errors.iterdir() if p.suffix == ".parquet"]
    assert len(files) == 1 and pq.read_schema(files[0]).names == ERROR_SCHEMA.names


def test_a_kill_between_publish_and_remove_leaves_duplicates_the_next_run_removes(tmp_path, monkeypatch):
    errors, predictions = tmp_path / "errors", tmp_path / "predictions"
    publish(errors, [error("a", "first")])
    run = publish(errors, [error("a", "second")])

    import fsspec.implementations.local as local

    def killed(self, path):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(local.LocalFileSystem, "rm_file", killed)
    try:
        compact_errors(str(errors), str(predictions), None, run)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert len(read_parts(str(errors), ["key"])) >= 2, "nothing lost: the compacted part is there beside the old"
    assert compact_errors(str(errors), str(predictions), None, "") == 1
    assert [r["message"] for r in rows_of(errors).values()] == ["second"]


def test_nothing_to_do_leaves_the_part_alone(tmp_path):
    errors = tmp_path / "errors"
    publish(errors, [error("a", "x")])
    before = sorted(p.name for p in errors.iterdir())
    assert compact_errors(str(errors), str(tmp_path / "predictions"), None, "") == 1
    assert sorted(p.name for p in errors.iterdir()) == before
    assert compact_errors(str(tmp_path / "none"), str(tmp_path / "predictions"), None, "") == 0


def test_a_run_that_listed_cleanly_drops_the_listing_rows_of_earlier_runs(tmp_path):
    """Listing rows have no key (list_error_row), so no later row replaces them: every run lists all
    of INPUT, so its own listing rows are the only ones that still hold."""
    errors, predictions = tmp_path / "errors", tmp_path / "predictions"
    publish(
        errors,
        [
            listing_error("in/sub", "folder sub unlisted", "EndpointConnectionError"),
            listing_error("in/a\\b.jpg", "collides with in/a/b.jpg", "KeyCollision"),
            listing_error("in/gone", "folder gone unlisted", "EndpointConnectionError"),
            error("x", "SlowDown"),
        ],
    )
    # run 2: sub/ listed, the alias removed, x predicted; gone/ still cannot be listed
    run = publish(errors, [listing_error("in/gone", "folder gone unlisted again", "EndpointConnectionError")])
    publish(predictions, [{"key": "x"}], pa.schema([("key", pa.string())]))
    assert compact_errors(str(errors), str(predictions), None, run) == 1
    assert [(r["path"], r["message"]) for r in rows_of(errors).values()] == [("in/gone", "folder gone unlisted again")]

    # run 3: no error at all (its writer published no part): errors/ is empty
    assert compact_errors(str(errors), str(predictions), None, "f00dcafe") == 0
    assert read_parts(str(errors), None) is None


def test_a_damaged_part_is_left_alone_and_the_rest_compacted(tmp_path, caplog):
    """A damaged part (pyarrow: a plain OSError) is the content's fault, not the store's: the
    compaction warns, keeps it, and does the rest, at once (no retries)."""
    errors, predictions = tmp_path / "errors", tmp_path / "predictions"
    publish(errors, [error("a", "first")])
    [damaged] = list(errors.glob("*.parquet"))
    data = damaged.read_bytes()
    damaged.write_bytes(data[:-12] + bytes(8) + data[-4:])
    publish(errors, [error("b", "one")])
    run = publish(errors, [error("b", "two")])
    with caplog.at_level("WARNING"):
        assert compact_errors(str(errors), str(predictions), None, run) == 1
    assert not [r for r in caplog.records if r.name == "pipeline.io.retry"]
    assert any(damaged.name in r.getMessage() and "left as it is" in r.getMessage() for r in caplog.records)
    assert damaged.exists() and [r["message"] for r in rows_of(errors).values()] == ["two"]
