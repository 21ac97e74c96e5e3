"""Crash-point matrix for the writer alone (no Ray, no model): the driver's write loop — sweep,
resume past the published keys, WriteMasks, predictions/ parts of 2 rows — SIGKILLed in a
subprocess at the n-th mask write, mask rename or part publish (tests/crash_hook.py), for several
n. What a kill leaves is checked (every published row's mask whole and matching it, only our
temporary names), then a re-run ends with every key in exactly one row, every mask whole and
the row's, and no temporary file. The full-job version is tests/jobs/test_crash_points.py."""

from __future__ import annotations

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


def drive(out: str, batch_size: int = 3) -> None:
    """What run_segment does with results, without Ray: sweep, resume, write, publish."""
    from pipeline.data.schema import PREDICTION_SCHEMA
    from pipeline.io.files import sweep_temp_files
    from pipeline.io.parts import RollingParquetWriter, done_keys
    from pipeline.segment.write import WriteConfig, WriteMasks, prediction_columns

    sweep_temp_files(out)
    done = done_keys(f"{out}/predictions")
    todo = [k for k in KEYS if k not in done]
    cfg = WriteConfig(out, VOC, model_id="m", head_checksum="c", io_threads=2)
    write, predictions = WriteMasks(cfg), RollingParquetWriter(f"{out}/predictions", PREDICTION_SCHEMA, max_rows=2)
    for start in range(0, len(todo), batch_size):
        keys = todo[start : start + batch_size]
        table = write(make_batch([mask_of(k) for k in keys], keys))
        predictions.write(table.filter(table["ok"]).select(prediction_columns(cfg)))
    predictions.close()


def check_rows_and_masks(out: Path) -> list[str]:
    """Every published row's mask is whole and is the row's; every mask file decodes. Returns
    the published keys."""
    table = read_parts(str(out / "predictions"), ["key", "mask", "width", "height", "class_counts"])
    published = table.to_pylist() if table is not None else []
    for row in published:
        with Image.open(row["mask"]) as m:
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
    "point,n",
    [
        ("mask-write", 1),
        ("mask-write", 5),
        ("mask-rename", 2),
        ("mask-rename", 7),
        ("part-publish", 1),
        ("part-publish", 3),
    ],
)
def test_killed_writer_rerun_leaves_one_row_and_one_whole_mask_per_key(tmp_path, point, n):
    out = tmp_path / "out"
    env = hook_env(tmp_path / "hook", point, n)
    code = f"import sys; sys.path[:0] = {[str(HERE), str(HERE.parents[1])]!r}; import {Path(__file__).stem} as t; t.drive({str(out)!r})"
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

    drive(str(out))  # the re-run
    after = check_rows_and_masks(out)
    assert sorted(after) == sorted(KEYS)  # each key once: published rows are not redone, the rest are
    assert sorted(str(p.relative_to(out / "masks")) for p in (out / "masks").rglob("*.png")) == sorted(
        f"{k}.png" for k in KEYS
    )
    assert not [p for p in out.rglob("*") if is_temp_name(p.name)]
