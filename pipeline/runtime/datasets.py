"""Ray Data graphs built from plain steps (callables over numpy-dict batches):

    rows (driver) -> read + decode (CPU tasks) -> model step (actor pool, loaded once per actor)
    -> write (CPU tasks) -> result rows, consumed by the driver in a stream.

The steps themselves live with their workflow; this module only turns them into stages.
"""

from __future__ import annotations

import math
from typing import Iterator

import pyarrow as pa

from model.storage import options_for


def from_rows(rows: pa.Table, block_rows: int):
    """A Dataset of driver-built rows in blocks of `block_rows`, so the work spreads over tasks
    at once and the stream starts at once."""
    import ray.data

    return ray.data.from_arrow([rows.slice(i, block_rows) for i in range(0, max(len(rows), 1), block_rows)])


def stages(ds, steps, batch_size: int | None, num_cpus: float):
    """`ds` through CPU task stages, one per step (a picklable callable over numpy-dict batches);
    batch_size None: a whole block per call."""
    for step in steps:
        ds = ds.map_batches(step, batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus)
    return ds


def build(rows: pa.Table, read, decode, predict_cls, predict_config, write, resources, publish=None, part_rows=None):
    """The lazy Dataset of result rows (one per input row): read and decode in CPU tasks, the
    model step in an actor pool (`predict_cls(config=predict_config)`, loaded once per actor),
    then the write step in CPU tasks; with `publish`, a step over Arrow batches of exactly
    `part_rows` rows (the last one fewer) after it, in CPU tasks too."""
    import ray.data

    batch, cpus = resources.read_batch_size, resources.decode_cpus
    ds = stages(from_rows(rows, 4 * batch), [read, decode], batch, cpus)
    ds = ds.map_batches(
        predict_cls,
        fn_constructor_kwargs={"config": predict_config},
        compute=ray.data.ActorPoolStrategy(
            min_size=resources.min_actors or resources.actors, max_size=resources.actors
        ),
        batch_size=resources.batch_size,
        batch_format="numpy",
        num_cpus=resources.cpus_per_actor,
        num_gpus=resources.gpus_per_actor or None,
    )  # Ray Data restarts dead pool actors and retries their batches by default: no input is lost
    ds = stages(ds, [write], batch, cpus)
    if publish is None:
        return ds
    # The write tasks' output cut into blocks of a divisor of both batch sizes, so that the publish
    # tasks' batches are exactly `part_rows` (a batch_size alone leaves a remainder batch per task,
    # a tiny part each), while the write tasks keep their small batches (given a part's rows, one
    # would hold that many full-size masks at once).
    ds = _cut(ds, math.gcd(batch, part_rows), cpus)
    # No CPU request: the driver did this outside Ray's accounting before (a part's encoding is well
    # under a millisecond of CPU a row; the rest waits on one PUT), and on the CPU the actors hold
    # every CPU but the decode tasks' share, where any request would wait for them to end.
    return ds.map_batches(publish, batch_size=part_rows, batch_format="pyarrow", num_cpus=0)


def _cut(ds, rows: int, num_cpus: float):
    """`ds` in blocks of exactly `rows` rows (the last fewer): Ray Data's strict streaming
    repartition, fused into the stage before it. Ray 2.60's `repartition` has no argument for its
    tasks' resources and gives them 1 CPU, which would keep them from fusing with a stage that
    requests less (and on the CPU from running while the actors live); they get `num_cpus`, the
    stage's, instead. The stage's batch size must be a multiple of `rows`, as it is here."""
    import ray

    ds = ds.repartition(target_num_rows_per_block=rows, strict=True)
    op = ds._logical_plan.dag
    if not isinstance(getattr(op, "ray_remote_args", None), dict):  # Ray is pinned; a new one must not be silent
        raise RuntimeError(f"Ray {ray.__version__}'s repartition has no ray_remote_args: adapt _cut to it.")
    object.__setattr__(op, "ray_remote_args", {"num_cpus": num_cpus})  # a frozen dataclass
    return ds


def map_rows(rows: pa.Table, step, batch_size: int, num_cpus: float):
    """The lazy Dataset of one CPU task stage (`step(batch)`, a picklable callable) over
    driver-built rows."""
    return stages(from_rows(rows, 4 * batch_size), [step], batch_size, num_cpus)


def read_parquet(files: list[str], storage_options: dict | None, num_cpus: float):
    """A Dataset of Parquet files under any fsspec URL (the same storage options apply)."""
    import ray.data

    fs = arrow_filesystem(files[0], storage_options) if files else None
    return ray.data.read_parquet([strip_protocol(f) if fs else f for f in files], filesystem=fs, num_cpus=num_cpus)


def object_store_bytes() -> float:
    import ray

    return ray.cluster_resources().get("object_store_memory", 0)


def shuffled(ds):
    """The blocks in a new random order every epoch."""
    return ds.randomize_block_order()


def held(ds):
    """The Dataset computed once and kept in the object store."""
    return ds.materialize()


def iter_results(ds, batch_size: int = 256) -> Iterator[pa.Table]:
    """Result rows as Arrow tables, in a stream (the write step declares their schema)."""
    yield from ds.iter_batches(batch_size=batch_size, batch_format="pyarrow")


def arrow_filesystem(url: str, storage_options: dict | None):
    """(pyarrow filesystem or None, paths' form) for Ray Data readers: fsspec's, so the same
    storage options (endpoints, credentials) apply."""
    if "://" not in url or url.startswith("file://"):
        return None
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = fsspec.core.url_to_fs(url, **options_for(url, storage_options))
    return PyFileSystem(FSSpecHandler(fs))


def strip_protocol(url: str) -> str:
    return url.split("://", 1)[1] if "://" in url else url


def quiet(named: dict) -> dict:
    """No progress bars for the epochs' data (a line an epoch says where training is)."""
    for ds in named.values():
        ds.context.enable_progress_bars = False
        ds.context.enable_operator_progress_bars = False
    return named
