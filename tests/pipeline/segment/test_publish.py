"""The publish step, PublishParts, and the driver's accounting: a batch of WriteMasks' rows becomes
one predictions/ part published by the task, under a name that a retried task reproduces, only
while the run holds OUTPUT's lease; the driver gets keys and errors, never masks. The parts carry
Hugging Face datasets' features: `datasets.load_dataset("parquet", ...)` decodes `mask_png` as an
image. No Ray."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import EndpointConnectionError
from test_write import VOC, blobs, fail_earlier, make_batch

from model.errors import DinosegError
from pipeline.data.schema import ERROR_SCHEMA
from pipeline.io import parts, retry
from pipeline.io.lease import LEASE_NAME, Lease
from pipeline.io.parts import RollingParquetWriter, read_parts
from pipeline.segment.publish import (
    ACCOUNT_SCHEMA,
    LEASE_LOST,
    MASK_PART_ROWS,
    ROWS_PART_ROWS,
    PublishParts,
    account,
    part_batch_rows,
    part_schema,
)
from pipeline.segment.write import WriteConfig, WriteMasks


@pytest.fixture
def lease(tmp_path):
    held = Lease(str(tmp_path / "out"), "segment")
    held.acquire()
    yield held
    held.release()


def step(out, lease: Lease, **options) -> tuple[WriteMasks, PublishParts]:
    cfg = WriteConfig(str(out), VOC, model_id="m", head_checksum="c", identity="id-1", run_id=lease.run_id, **options)
    return WriteMasks(cfg), PublishParts(cfg)


def written(write: WriteMasks, keys: list[str], broken: int | None = None):
    batch = make_batch([blobs(12, 10 + i, len(VOC), seed=i) for i in range(len(keys))], keys)
    if broken is not None:
        fail_earlier(batch, broken)
    return write(batch)


def part_files(out) -> list:
    return sorted((out / "predictions").glob("*.parquet"))


def take_over(out) -> None:
    """OUTPUT's lease becomes another run's, as a takeover leaves it."""
    path = out / LEASE_NAME
    record = json.loads(path.read_text()) | {"run_id": "another-run", "nonce": "x"}
    path.write_text(json.dumps(record))


def test_a_batch_becomes_one_part_and_the_driver_gets_keys_and_errors_only(tmp_path, lease):
    out = tmp_path / "out"
    write, publish = step(out, lease, masks="both", rle=True)
    account_rows = publish(written(write, ["a", "b", "c"], broken=1))
    assert account_rows.schema == ACCOUNT_SCHEMA  # no mask, no prediction column
    assert account_rows["ok"].to_pylist() == [True, False, True]
    [part] = part_files(out)
    assert part.name.startswith(f"part-{lease.run_id[:8]}-")
    table = pq.read_table(part)
    assert table.schema.names == part_schema(publish.config).names
    assert table["key"].to_pylist() == ["a", "c"] and set(table["identity"].to_pylist()) == {"id-1"}
    assert table["mask_png"][0].as_py()["bytes"] == (out / "masks" / "a.png").read_bytes()

    counts = {"predicted": 0, "failed": 0}
    errors = RollingParquetWriter(str(out / "errors"), ERROR_SCHEMA, max_rows=10)
    account(account_rows, errors, counts, lease)
    errors.close()
    assert counts == {"predicted": 2, "failed": 1}
    assert read_parts(str(out / "errors"), ["key", "stage"]).to_pylist() == [{"key": "b", "stage": "decode"}]


def test_a_task_run_again_after_its_publish_rewrites_the_same_part(tmp_path, lease):
    out = tmp_path / "out"
    write, publish = step(out, lease)
    rows = written(write, ["k0", "k1", "k2"])
    publish(rows)
    first = part_files(out)
    publish(rows)  # Ray's retry: the same batch once more
    assert part_files(out) == first and len(first) == 1
    assert sorted(read_parts(str(out / "predictions"), ["key"])["key"].to_pylist()) == ["k0", "k1", "k2"]
    publish(written(write, ["k2", "k1", "k0"]))  # the same keys in another order: the same part
    assert part_files(out) == first
    publish(written(write, ["k3"]))  # other keys: another part
    assert len(part_files(out)) == 2


def test_a_batch_without_finished_rows_publishes_nothing(tmp_path, lease):
    out = tmp_path / "out"
    write, publish = step(out, lease)
    got = publish(written(write, ["x"], broken=0))
    assert got["ok"].to_pylist() == [False] and not part_files(out)


def test_after_a_takeover_a_task_publishes_nothing_and_the_driver_stops(tmp_path, lease):
    out = tmp_path / "out"
    write, publish = step(out, lease)
    rows = written(write, ["a", "b"])
    take_over(out)
    got = publish(rows)
    assert not part_files(out)
    assert set(got["error_type"].to_pylist()) == {LEASE_LOST} and not any(got["ok"].to_pylist())
    errors = RollingParquetWriter(str(out / "errors"), ERROR_SCHEMA, max_rows=1, guard=lease.check)
    counts = {"predicted": 0, "failed": 0}
    with pytest.raises(DinosegError, match="taken over by another run"):
        account(got, errors, counts, lease)
    assert lease.lost and counts == {"predicted": 0, "failed": 0}
    assert errors.abandon() == 0 and not (out / "errors").exists()  # nothing of that table was kept


def test_without_a_lease_a_task_publishes_nothing(tmp_path, lease):
    out = tmp_path / "out"
    write, publish = step(out, lease)
    rows = written(write, ["a"])
    (out / LEASE_NAME).unlink()  # removed under the run: no run holds OUTPUT for it
    assert publish(rows)["error_type"].to_pylist() == [LEASE_LOST] and not part_files(out)
    with pytest.raises(DinosegError, match="publishing predictions/ parts needs the run id"):
        PublishParts(WriteConfig(str(out), VOC))


def test_a_part_the_store_keeps_refusing_makes_its_rows_retryable_errors(tmp_path, lease, monkeypatch):
    out = tmp_path / "out"
    write, publish = step(out, lease)
    rows = written(write, ["a", "b", "c"], broken=2)
    calls = []

    def down(url, data, so=None):
        calls.append(url)
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")

    monkeypatch.setattr(retry, "BACKOFF_S", 0.0)
    monkeypatch.setattr(parts, "write_bytes_atomic", down)
    got = {r["key"]: r for r in publish(rows).to_pylist()}
    assert len(calls) == retry.ATTEMPTS and not part_files(out)  # tried again first
    for key in ("a", "b"):
        assert not got[key]["ok"] and got[key]["stage"] == "write" and got[key]["retryable"]
        assert got[key]["error_type"] == "EndpointConnectionError" and "next run redoes it" in got[key]["message"]
    assert got["c"]["stage"] == "decode" and not got["c"]["retryable"]  # the earlier failure kept as it was


def test_rows_per_part(monkeypatch):
    monkeypatch.delenv("DINOSEG_PART_ROWS", raising=False)
    assert part_batch_rows("png") == ROWS_PART_ROWS < parts.DEFAULT_PART_ROWS  # what a failed run leaves to redo
    assert part_batch_rows("parquet") == part_batch_rows("both") == MASK_PART_ROWS < ROWS_PART_ROWS  # ~16 MB of PNG
    monkeypatch.setenv("DINOSEG_PART_ROWS", "3")
    assert part_batch_rows("png") == part_batch_rows("both") == 3


def test_load_dataset_decodes_mask_png_as_an_image(tmp_path, lease):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    out = tmp_path / "out"
    write, publish = step(out, lease, masks="parquet", rle=True)
    keys = ["d/one", "two", "three"]
    publish(written(write, keys[:2]))
    publish(written(write, keys[2:]))
    loaded = datasets.load_dataset(
        "parquet", data_files=str(out / "predictions" / "*.parquet"), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert isinstance(loaded.features["mask_png"], datasets.Image)
    assert loaded.features["class_counts"] == datasets.List(datasets.Value("int64"))
    assert loaded.features["width"] == datasets.Value("int32")
    rows = {r["key"]: r for r in loaded}
    assert sorted(rows) == sorted(keys)
    for i, key in enumerate(keys):
        image = rows[key]["mask_png"]
        assert isinstance(image, Image.Image) and image.mode == "P"
        assert np.array_equal(np.asarray(image), blobs(12, 10 + i % 2, len(VOC), seed=i % 2))
        assert rows[key]["rle"] and rows[key]["identity"] == "id-1"


def test_the_driver_reads_parts_that_tasks_published_after_it_listed_the_folder(s3_bucket, monkeypatch):
    """The driver lists predictions/ (resume), the tasks publish from their own processes, then the
    driver reads the folder again (compaction): s3fs's listing cache of the driver must not hide
    the new parts, nor fail opening one it lists."""
    import fsspec

    bucket, so = s3_bucket
    out = f"s3://{bucket}/out"
    held = Lease(out, "segment", so)
    held.acquire()
    try:
        write, publish = step(out, held, storage_options=so)
        publish(written(write, ["a"]))
        assert read_parts(f"{out}/predictions", ["key"], so)["key"].to_pylist() == ["a"]  # listed, cached
        elsewhere = fsspec.filesystem("s3", skip_instance_cache=True, **so)  # a task's own client
        monkeypatch.setattr(parts, "write_bytes_atomic", lambda url, data, so=None: elsewhere.pipe_file(url, data))
        publish(written(write, ["b"]))
        assert sorted(read_parts(f"{out}/predictions", ["key"], so)["key"].to_pylist()) == ["a", "b"]
    finally:
        held.release()
