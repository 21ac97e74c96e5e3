"""Crash-point matrix for a whole `segment` job: SIGKILL after the 2nd part publish (2 rows a
part, so parts exist before the kill) and at the 2nd mask write (bytes in a temporary file, not
yet renamed), one kill after the other on one OUTPUT, then a part cut short (what a backend that
streams could leave), then a run to the end. After it every input has exactly one row, in
predictions/ or in errors/ (never both), every mask is whole and matches its row, and no
temporary file remains.

Each kill is a real `python -m jobs.segment` (its own embedded Ray) killed by
tests/crash_hook.py's `sitecustomize.py`, which Ray's workers inherit with the driver's
environment; the last run is in this process, on the session's Ray. Two short jobs and one run,
not a job from scratch per crash point: tests/pipeline/segment/test_write_crash_points.py runs
more points and more n against the writer alone."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from crash_hook import hook_env, killed
from PIL import Image
from test_segment import ROOT, SMALL, head_file, jpeg  # noqa: F401  (head_file: the module's fixture)

from pipeline.io.files import is_temp_name
from pipeline.io.parts import read_parts

IMAGES = 10
KILLS = [("part-publish", 2), ("mask-write", 2)]


def _size(i: int) -> tuple[int, int]:
    return 40 + 4 * i, 30 + 2 * (i % 5)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _kill_at(cmd: list[str], env: dict, out, point: str, n: int, hook) -> dict:
    """Run `cmd` until the hook kills it at the n-th `point`; what it left under `out`."""
    kill_env = hook_env(hook, point, n, env)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=kill_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not killed(kill_env):
        time.sleep(0.05)
    try:  # whatever of the group the hook's own kill did not reach
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    stderr = proc.communicate()[1].decode(errors="replace")
    return {
        "point": point,
        "killed": killed(kill_env),
        "stderr": stderr[-3000:],
        "temp": sorted(str(p) for p in out.rglob("*") if is_temp_name(p.name)),
        "masks": len(list((out / "masks").glob("*.png"))),
        "parts": sorted((out / "predictions").glob("*.parquet")),
    }


@pytest.fixture(scope="module")
def crash_matrix(tmp_path_factory, head_file, ray_local):  # noqa: F811
    """Runs the kills of KILLS, cuts a part short, runs to the end. Returns (inputs, output,
    state after each kill, the cut part, the last run's counts, its warnings)."""
    from pipeline.segment import SegmentConfig, run_segment

    tmp = tmp_path_factory.mktemp("crash")
    src, out = tmp / "in", tmp / "out"
    src.mkdir()
    for i in range(IMAGES):
        (src / f"img{i:02d}.jpg").write_bytes(jpeg(*_size(i), seed=200 + i))
    (src / "bad.jpg").write_bytes(b"not an image")
    cmd = [sys.executable, "-m", "jobs.segment", str(src), str(out), "--head", head_file, "--batch-size", "2"]
    cmd += ["--backbone-weights", "random", "--resolution", str(SMALL["resolution"])]
    cmd += ["--decode-cpus", str(SMALL["decode_cpus"]), "--cpus-per-actor", str(SMALL["cpus_per_actor"])]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"DINOSEG_CACHE": str(tmp / "cache"), "DINOSEG_HUB": str(tmp / "no-hub"), "DINOSEG_PART_ROWS": "2"}
    states = [_kill_at(cmd, env, out, point, n, tmp / "hook") for point, n in KILLS]
    cut = sorted((out / "predictions").glob("*.parquet"))[0]
    cut.write_bytes(cut.read_bytes()[:100])  # a part a streaming backend left half-written
    warnings = _Records()
    logging.getLogger("pipeline.io.parts").addHandler(warnings)
    old = os.environ.get("DINOSEG_PART_ROWS")
    os.environ["DINOSEG_PART_ROWS"] = "2"
    try:
        counts = run_segment(SegmentConfig(str(src), str(out), head=head_file, **(SMALL | {"batch_size": 2})))
    finally:
        logging.getLogger("pipeline.io.parts").removeHandler(warnings)
        if old is None:
            os.environ.pop("DINOSEG_PART_ROWS")
        else:
            os.environ["DINOSEG_PART_ROWS"] = old
    return src, out, states, cut, counts, warnings.messages


@pytest.mark.slow  # real jobs, a real Ray
def test_every_kill_happened_where_it_was_meant_to(crash_matrix):
    states = crash_matrix[2]
    for state in states:
        assert state["killed"], state
    publish, write = states
    assert len(publish["parts"]) >= 2 and publish["masks"] >= 4  # parts were published before the kill
    assert any("/masks/" in t for t in write["temp"])  # a whole temp file that was never renamed
    assert not set(publish["temp"]) & set(write["temp"])  # what the first kill left, the next run swept
    assert write["masks"] >= publish["masks"]


@pytest.mark.slow
def test_after_the_rerun_every_input_has_one_row_one_whole_mask_and_no_temp_file(crash_matrix):
    src, out, _, cut, counts, warnings = crash_matrix
    assert counts["inputs"] == IMAGES + 1
    assert counts["predicted"] + counts["skipped"] + counts["failed"] == IMAGES + 1
    assert any(cut.name in w and "redone" in w for w in warnings)  # the cut part is named, not a crash
    predicted = read_parts(str(out / "predictions"), ["key", "mask", "width", "height", "class_counts"]).to_pylist()
    failed = read_parts(str(out / "errors"), ["key"]).to_pylist()
    keys = [r["key"] for r in predicted]
    assert sorted(keys) == [f"img{i:02d}" for i in range(IMAGES)]  # each once, the cut part's rows redone
    assert [r["key"] for r in failed] == ["bad"]  # once, and in errors/ only
    for row in predicted:
        i = int(row["key"][3:])
        path = out / "masks" / f"{row['key']}.png"
        assert row["mask"] == str(path)
        with Image.open(path) as m:
            m.load()
            mask = np.asarray(m)
        assert (row["width"], row["height"]) == _size(i) and mask.shape == _size(i)[::-1]
        counts = np.bincount(mask.ravel(), minlength=len(row["class_counts"]))[: len(row["class_counts"])]
        assert counts.tolist() == list(row["class_counts"]), row["key"]  # the row describes this very mask
    assert sorted(p.stem for p in (out / "masks").iterdir()) == sorted(keys)
    assert not [p for p in out.rglob("*") if is_temp_name(p.name)]
