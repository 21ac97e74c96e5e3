"""The segment driver's ceiling: result rows per second (and MB/s) that its loop over the graph's
results handles, fed as fast as it can take them, no model and no cluster work.

- before: the loop as it was until the write tasks published their own parts: WriteMasks' rows
  with their masks (`--masks parquet`, `--png-kb` of incompressible bytes per row, like a PNG)
  reach the driver, which appends `identity`, writes predictions/ and errors/ parts, counts;
- after: what the driver runs now, `pipeline.segment.publish.account` over the publish tasks'
  accounting rows (path, key, ok, error columns): errors/ and the counts.

Both hold a real lease on a local OUTPUT (`Lease.check` per table, a publish guard per part) and
write their parts to a temporary folder; 1% of the rows are failures. Two feeds: `loop`, tables
already in the driver's memory (the loop's own cost), and `ray`, the tables in Ray's object store
read back through `runtime.iter_results` as the driver does (the loop plus pulling the rows into
the driver). The median of `--passes` passes; the cluster it keeps up with is rows/s over the
stated images/s per GPU.

    python benchmarks/bench_driver_rows.py                # about a minute on 2 idle cores
    python benchmarks/bench_driver_rows.py --no-ray --rows 2000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from pipeline.data.schema import ERROR_SCHEMA, IDENTITY_FIELD, MASK_PNG_FIELD, PREDICTION_SCHEMA  # noqa: E402
from pipeline.io.lease import Lease  # noqa: E402
from pipeline.io.parts import RollingParquetWriter  # noqa: E402
from pipeline.segment.publish import ACCOUNT_SCHEMA, account  # noqa: E402

TABLE_ROWS = 256  # what runtime.iter_results hands the driver at a time
FAILED_EVERY = 100  # one row in a hundred failed earlier
GPU_RATES = (50, 500)  # assumed images/s per GPU (no GPU figure measured yet): ViT-L/14, ViT-S/14 at 518 bf16


def result_tables(rows: int, png_bytes: int, with_masks: bool, seed: int = 0) -> list[pa.Table]:
    """Synthetic result tables: WriteMasks' rows (`with_masks`, --masks parquet) or the accounting rows."""
    rng = np.random.default_rng(seed)
    tables = []
    for start in range(0, rows, TABLE_ROWS):
        n = min(TABLE_ROWS, rows - start)
        keys = [f"folder{(start + i) // 1000:04d}/image{start + i:08d}" for i in range(n)]
        ok = [(start + i) % FAILED_EVERY != 0 for i in range(n)]
        cols = {
            "path": [f"s3://bucket/in/{k}.jpg" for k in keys],
            "key": keys,
            "stage": ["" if o else "decode" for o in ok],
            "error_type": ["" if o else "UnidentifiedImageError" for o in ok],
            "message": ["" if o else "cannot identify image file" for o in ok],
            "retryable": [False] * n,
            "ok": ok,
        }
        if not with_masks:
            tables.append(pa.table(cols, schema=ACCOUNT_SCHEMA))
            continue
        blob = rng.integers(0, 256, n * png_bytes, dtype=np.uint8).tobytes()  # incompressible, as PNG is
        cols |= {
            "width": pa.array([640] * n, pa.int32()),
            "height": pa.array([480] * n, pa.int32()),
            "mask": [""] * n,
            "class_counts": pa.array([list(range(150)) if o else None for o in ok], pa.list_(pa.int64())),
            "mean_confidence": pa.array([0.8 if o else None for o in ok], pa.float32()),
            "model": ["dinov2_vits14_ade20k_linear"] * n,
            "head_checksum": ["0123456789abcdef"] * n,
            MASK_PNG_FIELD.name: pa.array(
                [
                    {"bytes": blob[i * png_bytes : (i + 1) * png_bytes], "path": f"{k}.png"} if o else None
                    for i, (k, o) in enumerate(zip(keys, ok, strict=True))
                ],
                MASK_PNG_FIELD.type,
            ),
        }
        tables.append(pa.table(cols))
    return tables


def before(results, out: str, lease: Lease, counts: dict) -> None:
    """The driver's loop as it was: every prediction row, its mask's bytes included, written here."""
    schema = PREDICTION_SCHEMA.append(MASK_PNG_FIELD)
    predictions = RollingParquetWriter(f"{out}/predictions", schema.append(IDENTITY_FIELD), guard=lease.check)
    errors = RollingParquetWriter(f"{out}/errors", ERROR_SCHEMA, max_rows=100_000, guard=lease.check)
    ident = "0" * 16
    for table in results:
        lease.check()
        ok = table["ok"]
        done_rows = table.filter(ok).select(schema.names)
        done_rows = done_rows.append_column(IDENTITY_FIELD, pa.array([ident] * len(done_rows), pa.string()))
        failed_rows = table.filter(pc.invert(ok)).select(ERROR_SCHEMA.names)
        predictions.write(done_rows)
        errors.write(failed_rows)
        counts["predicted"] += len(done_rows)
        counts["failed"] += len(failed_rows)
    lease.close_writers(predictions, errors)


def after(results, out: str, lease: Lease, counts: dict) -> None:
    """The driver's loop now (pipeline.segment.run): accounting rows only."""
    errors = RollingParquetWriter(f"{out}/errors", ERROR_SCHEMA, max_rows=100_000, guard=lease.check)
    for table in results:
        account(table, errors, counts, lease)
    lease.close_writers(errors)


def timed(loop, feed, tables: list[pa.Table], passes: int) -> float:
    """Median seconds of `loop` over the tables `feed` hands it, each pass into a fresh OUTPUT."""
    times = []
    for _ in range(passes):
        with tempfile.TemporaryDirectory(prefix="dinoseg-bench-driver-") as out:
            lease = Lease(out, "segment")
            lease.acquire()
            try:
                counts = {"predicted": 0, "failed": 0}
                results = feed(tables)
                started = time.perf_counter()
                loop(results, out, lease, counts)
                times.append(time.perf_counter() - started)
                assert counts["predicted"] + counts["failed"] == sum(len(t) for t in tables), counts
            finally:
                lease.release()
    return statistics.median(times)


def in_memory(tables):
    return iter(tables)


def through_ray(tables):
    """The tables in the object store (as the publish or write stage leaves them), read back the
    way the driver reads results."""
    import ray.data

    from pipeline import runtime

    ds = ray.data.from_arrow(tables).materialize()
    return runtime.iter_results(ds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000, help="rows with masks (before); after gets 25x as many")
    parser.add_argument("--png-kb", type=int, default=60, help="bytes of mask_png per row, in KB")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--no-ray", action="store_true", help="only the in-memory feed (no Ray start)")
    args = parser.parse_args()

    cases = [
        ("before (masks through the driver)", before, result_tables(args.rows, args.png_kb << 10, True)),
        ("after (keys and errors only)", after, result_tables(25 * args.rows, 0, False)),
    ]
    feeds = [("loop", in_memory)]
    if not args.no_ray:
        from pipeline import runtime

        runtime.start_ray(None, num_cpus=2)
        feeds.append(("ray", through_ray))
    rates = " | ".join(f"GPUs fed at {r} img/s" for r in GPU_RATES)
    print(f"| driver loop | feed | rows | MB | s | rows/s | MB/s | {rates} |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(GPU_RATES))
    try:
        for feed_name, feed in feeds:
            for name, loop, tables in cases:
                rows, mb = sum(len(t) for t in tables), sum(t.nbytes for t in tables) / 1e6
                seconds = timed(loop, feed, tables, args.passes)
                fed = " | ".join(f"{rows / seconds / r:,.0f}" for r in GPU_RATES)
                print(
                    f"| {name} | {feed_name} | {rows:,} | {mb:,.0f} | {seconds:.2f} | {rows / seconds:,.0f} "
                    f"| {mb / seconds:,.0f} | {fed} |"
                )
    finally:
        if not args.no_ray:
            from pipeline import runtime

            runtime.stop_ray()


if __name__ == "__main__":
    main()
