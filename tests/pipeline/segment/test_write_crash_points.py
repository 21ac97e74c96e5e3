"""Crash-point matrix for the writer alone (no Ray, no model): the write and publish steps and the
driver's accounting — lease, sweep, resume past the published keys, WriteMasks, PublishParts into
predictions/ parts of 2 rows — SIGKILLed in a subprocess at the n-th mask write, mask rename or
part publish (tests/crash_hook.py), for several n and each --masks mode. What a kill leaves is checked (every published row's mask whole and matching it, only our
temporary names), then a re-run ends with every key in exactly one row, every mask whole and
the row's, and no temporary file. The full-job version is tests/jobs/test_crash_points.py."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from crash_hook import hook_env, killed
from PIL import Image
from test_write import VOC, blobs, make_batch

from pipeline.io.files import is_temp_name
from pipeline.io.parts import read_parts

KEYS = [f"d{i % 3}/k{i:02d}" for i in range(12)]
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]


def mask_of(key: str) -> np.ndarray:
    i = int(key[-2:])
    return blobs(10 + i, 12 + 2 * i, len(VOC), seed=i)


def drive(out: str, batch_size: int = 3, masks: str = "png") -> None:
    """What run_segment and its graph do, without Ray: the lease, sweep, resume, WriteMasks, its
    rows regrouped into publish batches of 2 (the graph's repartition), PublishParts, the driver's
    accounting into errors/."""
    import pyarrow as pa

    from pipeline.data.schema import ERROR_SCHEMA
    from pipeline.io.files import sweep_temp_files
    from pipeline.io.lease import Lease
    from pipeline.io.parts import RollingParquetWriter, done_keys
    from pipeline.segment.publish import PublishParts, account
    from pipeline.segment.write import WriteConfig, WriteMasks

    lease = Lease(out, "segment")
    lease.acquire()  # a killed run's lease: its process is gone, so it is taken over at once
    try:
        sweep_temp_files(out)
        done = done_keys(f"{out}/predictions")
        todo = [k for k in KEYS if k not in done]
        cfg = WriteConfig(out, VOC, masks, model_id="m", head_checksum="c", io_threads=2, run_id=lease.run_id)
        write, publish = WriteMasks(cfg), PublishParts(cfg)
        errors = RollingParquetWriter(f"{out}/errors", ERROR_SCHEMA, guard=lease.check)
        counts, waiting = {"predicted": 0, "failed": 0}, None
        for start in range(0, len(todo), batch_size):
            keys = todo[start : start + batch_size]
            table = write(make_batch([mask_of(k) for k in keys], keys))
            waiting = table if waiting is None else pa.concat_tables([waiting, table])
            while len(waiting) >= 2:
                account(publish(waiting.slice(0, 2)), errors, counts, lease)
                waiting = waiting.slice(2)
        if waiting is not None and len(waiting):
            account(publish(waiting), errors, counts, lease)
        lease.close_writers(errors)
        assert counts == {"predicted": len(todo), "failed": 0}
    finally:
        lease.release()


def check_rows_and_masks(out: Path) -> list[str]:
    """Every published row's mask (file, or mask_png bytes) is whole and is the row's; every mask
    file decodes. Returns the published keys."""
    columns = ["key", "mask", "mask_png", "width", "height", "class_counts"]
    table = read_parts(str(out / "predictions"), columns)
    published = table.to_pylist() if table is not None else []
    for row in published:
        with Image.open(row["mask"] or io.BytesIO(row["mask_png"]["bytes"])) as m:
            m.load()
            mask = np.asarray(m)
        assert np.array_equal(mask, mask_of(row["key"])), row["key"]
        assert mask.shape == (row["height"], row["width"])
        counts = np.bincount(mask.ravel(), minlength=len(VOC))[: len(VOC)]
        assert counts.tolist() == list(row["class_counts"])
    for path in (out / "masks").rglob("*.png"):  # masks without a row yet (killed before the publish): whole too
        with Image.open(path) as m:
            m.load()
    return [r["key"] for r in published]


@pytest.mark.parametrize(
    "point,n,masks",
    [
        ("mask-write", 1, "png"),
        ("mask-write", 5, "png"),
        ("mask-rename", 2, "png"),
        ("mask-rename", 7, "png"),
        ("part-publish", 1, "png"),
        ("part-publish", 3, "png"),
        ("part-publish", 2, "parquet"),
        ("mask-write", 4, "both"),
    ],
)
def test_killed_writer_rerun_leaves_one_row_and_one_whole_mask_per_key(tmp_path, point, n, masks):
    out = tmp_path / "out"
    env = hook_env(tmp_path / "hook", point, n)
    code = (
        f"import sys; sys.path[:0] = {[str(HERE), str(HERE.parents[1])]!r}; import {Path(__file__).stem} as t; "
        f"t.drive({str(out)!r}, masks={masks!r})"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=120, start_new_session=True
    )
    assert killed(env), proc.stderr.decode()[-2000:]
    temps = [p for p in out.rglob("*") if p.name.startswith(".")]
    assert all(is_temp_name(p.name) for p in temps)
    if point == "mask-write":
        assert any("masks" in p.parts for p in temps)  # the whole temp file the rename never took
    before = check_rows_and_masks(out)
    assert len(before) == len(set(before)) < len(KEYS)
    if point == "part-publish":
        assert len(before) >= 2 * n  # n parts of 2 rows were published before the kill

    drive(str(out), masks=masks)  # the re-run
    after = check_rows_and_masks(out)
    assert sorted(after) == sorted(KEYS)  # each key once: published rows are not redone, the rest are
    files = sorted(str(p.relative_to(out / "masks")) for p in (out / "masks").rglob("*.png"))
    assert files == (sorted(f"{k}.png" for k in KEYS) if masks != "parquet" else [])
    assert not [p for p in out.rglob("*") if is_temp_name(p.name)]
