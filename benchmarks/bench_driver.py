"""The driver's own cost before Ray starts: listing INPUT and resuming past what OUTPUT holds.

Generates once, into --workdir (reused by later runs), a .txt manifest of N object-store URLs
(`s3://bucket/photos/2024/06/13/IMG_00123456.jpg`: a manifest is listed without touching a file)
and an OUTPUT whose predictions/ hold the first D keys as a finished run leaves them (the real
PREDICTION_SCHEMA + identity column, parts of the job's default size, identity.json, run.json),
with error rows of an earlier run for some of the other inputs. Then, in a fresh subprocess,
`run_segment` runs for real up to the moment it would start Ray (listing, recorded keys, the
model check - replaced by a stand-in that returns the identity the rows were made with -, the
lease, the identity check, the anti-join against the done keys, the rows table handed to the
graph); its wall time and peak RSS (VmHWM) are printed as a markdown table. No model, no Ray.

    python benchmarks/bench_driver.py                    # 10,000,000 inputs, 9,000,000 done
    python benchmarks/bench_driver.py --quick            # 1,000,000 / 900,000
    python benchmarks/bench_driver.py --inputs 2000000 --done 1800000 --workdir /tmp/bench-driver
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.csv as pacsv  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline.data.schema import ERROR_SCHEMA, IDENTITY_FIELD, PREDICTION_SCHEMA  # noqa: E402
from pipeline.io.parts import DEFAULT_PART_ROWS  # noqa: E402

PER_DAY = 10_000  # images per dated folder
ERRORS_EVERY = 100  # one input in this many of those not done failed in the earlier run
MODEL = "dinov2_vits14_voc2012_linear"
CLASSES = 21


def fake_identity() -> dict:
    """What `identity_of` gives for the default model (the values only need to be consistent)."""
    return {
        "model": MODEL,
        "head": hashlib.sha256(b"head").hexdigest(),
        "backbone_weights": "sha256:" + hashlib.sha256(b"backbone").hexdigest(),
        "normalisation": [0.485, 0.456, 0.406, 0.229, 0.224, 0.225],
        "resolution": 512,
        "mode": "whole",
        "crop": None,
        "stride": None,
        "tta": False,
        "precision": "auto",
        "long_side_ratio": 4.0,
    }


def names(start: int, stop: int) -> tuple[pa.Array, pa.Array]:
    """(URLs, keys) of inputs start..stop: `s3://bucket/photos/<yyyy/mm/dd>/IMG_<8 digits>.jpg`,
    PER_DAY to a dated folder; the key is the path below the manifest's common folder."""
    ids = np.arange(start, stop)
    first, last = start // PER_DAY, (stop - 1) // PER_DAY + 1
    days = pa.array([f"{datetime.date(2020, 1, 1) + datetime.timedelta(days=d):%Y/%m/%d}" for d in range(first, last)])
    day = days.take(pa.array(ids // PER_DAY - first))
    number = pc.utf8_lpad(pc.cast(pa.array(ids), pa.string()), width=8, padding="0")
    keys = pc.binary_join_element_wise(day, pc.binary_join_element_wise("IMG_", number, ""), "/")
    return pc.binary_join_element_wise("s3://bucket/photos/", keys, ".jpg", ""), keys


def generate(folder: Path, n: int, done: int) -> None:
    """The manifest and the OUTPUT of a run that finished the first `done` inputs (once)."""
    from pipeline.segment.identity import digest, write_identity

    if (folder / "ready").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    plain = pacsv.WriteOptions(include_header=False, quoting_style="none")
    with pa.OSFile(str(folder / "inputs.txt"), "wb") as f:
        for start in range(0, n, 1_000_000):
            pacsv.write_csv(pa.table({"path": names(start, min(n, start + 1_000_000))[0]}), f, plain)
    out = folder / "out"
    identity = fake_identity()
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    (out / "errors").mkdir(parents=True, exist_ok=True)
    schema = PREDICTION_SCHEMA.append(IDENTITY_FIELD)
    counts = [0] * CLASSES
    counts[0], counts[15] = 300_000, 84_000  # background and person, as in a 640x600 photo
    for part, start in enumerate(range(0, done, DEFAULT_PART_ROWS)):
        urls, keys = names(start, min(done, start + DEFAULT_PART_ROWS))
        m = len(urls)
        table = pa.table(
            {
                "path": urls,
                "key": keys,
                "width": pa.array(np.full(m, 640, np.int32)),
                "height": pa.array(np.full(m, 600, np.int32)),
                "mask": pc.binary_join_element_wise(f"{out}/masks/", keys, ".png", ""),
                "class_counts": pa.array([counts] * m, pa.list_(pa.int64())),
                "mean_confidence": pa.array(np.full(m, 0.9, np.float32)),
                "model": pa.array([MODEL] * m),
                "head_checksum": pa.array([identity["head"]] * m),
                "identity": pa.array([digest(identity)] * m),
            },
            schema=schema,
        )
        pq.write_table(table, out / "predictions" / f"part-bench0000-{part:05d}.parquet", compression="zstd")
    urls, keys = names(done, n)
    failed = pa.array(np.arange(0, n - done, ERRORS_EVERY))
    m = len(failed)
    errors = pa.table(
        {
            "path": urls.take(failed),
            "key": keys.take(failed),
            "stage": pa.array(["decode"] * m),
            "error_type": pa.array(["UnidentifiedImageError"] * m),
            "message": pa.array(["cannot decode the image: it is damaged or not an image."] * m),
            "retryable": pa.array([False] * m),
        },
        schema=ERROR_SCHEMA,
    )
    pq.write_table(errors, out / "errors" / "part-bench0000-00000.parquet", compression="zstd")
    write_identity(str(out), identity, None)
    run = {"arguments": {"input": str(folder / "inputs.txt"), "output": str(out), "model": MODEL}, "identity": identity}
    (out / "run.json").write_text(json.dumps(run, indent=1))
    (folder / "ready").write_text(f"{n} inputs, {done} done, generated in {time.perf_counter() - started:.0f} s\n")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(folder: Path) -> dict:
    """In this (fresh) process: run_segment up to the graph, timed; what it handed to the graph."""
    from dataclasses import replace
    from types import SimpleNamespace

    from model.classes import bundled
    from pipeline import runtime
    from pipeline.segment import SegmentConfig, run_segment
    from pipeline.segment import run as segment_run
    from pipeline.segment.config import inference_config

    class Reached(Exception):
        """The graph would be built now: what the driver did before Ray is over."""

    got: dict = {}
    identity, classes = fake_identity(), bundled("voc2012")

    def described(config, inference, so, unsaved=None):  # the model check, without a model
        resolved = replace(inference, resolution=identity["resolution"])
        return SimpleNamespace(inference=resolved), classes, MODEL, identity["head"], identity

    def build(rows, *args, **kwargs):
        used = resource.getrusage(resource.RUSAGE_SELF)
        got["rows"], got["seconds"] = len(rows), time.perf_counter() - started
        got["cpu_seconds"] = used.ru_utime + used.ru_stime - cpu_before
        got["first"] = rows.slice(0, 1).to_pylist()
        raise Reached

    segment_run._load_model = described
    runtime.start_ray = lambda *a, **k: False
    runtime.cluster_resources = lambda *a, **k: {"CPU": 16.0}
    runtime.build = build
    config = SegmentConfig(str(folder / "inputs.txt"), str(folder / "out"), model=MODEL)
    inference_config(config)  # what the driver imports anyway (torch, the model code), before the baseline
    baseline = _status_mb("VmRSS")
    before = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before, started = before.ru_utime + before.ru_stime, time.perf_counter()
    try:
        run_segment(config)
    except Reached:
        pass
    got.update(peak_mb=_status_mb("VmHWM"), baseline_mb=baseline)
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=10_000_000)
    parser.add_argument("--done", type=int, default=9_000_000)
    parser.add_argument("--quick", action="store_true", help="1,000,000 inputs, 900,000 done")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dinoseg-bench-driver"))
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the subprocess: the folder to measure
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure))))
        return
    if args.quick:
        args.inputs, args.done = 1_000_000, 900_000
    folder = Path(args.workdir) / f"n{args.inputs}-d{args.done}"
    generate(folder, args.inputs, args.done)
    proc = subprocess.run(
        [sys.executable, __file__, "--measure", str(folder)], capture_output=True, text=True, check=False
    )
    if proc.returncode:
        sys.exit(f"the measured run failed:\n{proc.stderr[-4000:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = args.inputs - args.done
    if got["rows"] != expected:
        sys.exit(f"the graph got {got['rows']} rows, expected {expected}: {got}")
    print("| inputs | done | rows to the graph | wall s | CPU s | peak RSS MB | RSS before listing MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {args.inputs:,} | {args.done:,} | {got['rows']:,} | {got['seconds']:.1f} | {got['cpu_seconds']:.1f} "
        f"| {got['peak_mb']:.0f} | {got['baseline_mb']:.0f} |"
    )


if __name__ == "__main__":
    main()
