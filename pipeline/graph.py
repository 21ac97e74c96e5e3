"""The Ray Data graph of `segment`: the only module of `pipeline/` that imports Ray.

    listing (driver) -> ReadBytes + Decode (CPU tasks) -> Predict (actor pool, model loaded once
    per actor) -> WriteMasks (CPU tasks) -> result rows, consumed by the driver in a stream.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa

log = logging.getLogger(__name__)
GPU_CEILING = "dinoseg:autoscaler_gpus"  # key in cluster_resources(): GPUs the cluster may grow to
# `ray up` writes the cluster config, with each node type's resources filled in, here on the head
# node, where `ray job submit` runs the job's driver
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"
TRAIN_POLL_ENV, TRAIN_POLL_LOCAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"  # see start_ray


@dataclass(frozen=True)
class Resources:
    """Where each stage runs. `None` fields are filled from the cluster by `resolve`."""

    actors: int | None = None  # predictor actors (default: one per GPU, or one on the CPU)
    gpus_per_actor: float | None = None  # default 1 on a GPU cluster, 0 otherwise
    cpus_per_actor: float | None = None  # default 1 with GPUs; on the CPU, what decoding leaves
    decode_cpus: float = 0.5  # CPUs per read/decode/write task
    batch_size: int = 8  # images per predictor call
    read_batch_size: int = 16  # images per read/decode task call
    min_actors: int | None = None  # the pool starts with this many and grows to `actors`

    def resolve(self, cluster: dict) -> "Resources":
        gpus, cpus = int(cluster.get("GPU", 0)), float(cluster.get("CPU", 1))
        # An autoscaling cluster (GPU workers from zero) has fewer GPUs now than it may have: plan
        # for the most, and start with those that are up, or with one as soon as one is (a fixed
        # pool of the maximum would wait for every node, and forever when the cloud has fewer).
        most = max(gpus, int(cluster.get(GPU_CEILING, 0)))
        gpa = self.gpus_per_actor if self.gpus_per_actor is not None else (1 if most else 0)
        actors = self.actors or (max(1, int(most // gpa)) if gpa else 1)
        min_actors = self.min_actors or (max(1, int(gpus // gpa)) if gpa and not self.actors else actors)
        # On the CPU an actor reserves what decoding leaves (its torch threads use every core anyway);
        # a request of all CPUs would starve the decode tasks and hang the job.
        cpa = self.cpus_per_actor or (1.0 if gpa else max(0.25, (cpus - self.decode_cpus) / actors))
        decode = self.decode_cpus
        if not gpa and cpa == decode:
            # Ray Data fuses a task stage into the next actor stage when their requests are equal:
            # decoding would then run inside the predictor, one batch after the other.
            decode = cpa / 2
            log.info("decode tasks request %.2f CPUs (not %.2f) so they are not fused into the predictor", decode, cpa)
        return Resources(actors, gpa, cpa, decode, self.batch_size, self.read_batch_size, min(min_actors, actors))


def build(rows: pa.Table, read, decode, predict_cls, predict_config, write, resources: Resources):
    """The lazy Dataset of result rows (one per input row)."""
    import ray.data

    # small blocks, so reading and decoding spread over tasks and the stream starts at once
    step = 4 * resources.read_batch_size
    ds = ray.data.from_arrow([rows.slice(i, step) for i in range(0, max(len(rows), 1), step)])
    decode_args = dict(batch_size=resources.read_batch_size, batch_format="numpy", num_cpus=resources.decode_cpus)
    ds = ds.map_batches(read, **decode_args)
    ds = ds.map_batches(decode, **decode_args)
    ds = ds.map_batches(
        predict_cls,
        fn_constructor_kwargs={"config": predict_config},
        compute=ray.data.ActorPoolStrategy(min_size=resources.min_actors or resources.actors, max_size=resources.actors),
        batch_size=resources.batch_size,
        batch_format="numpy",
        num_cpus=resources.cpus_per_actor,
        num_gpus=resources.gpus_per_actor or None,
    )  # Ray Data restarts dead pool actors and retries their batches by default: no input is lost
    return ds.map_batches(write, **decode_args)


def map_rows(rows: pa.Table, step, batch_size: int, num_cpus: float):
    """The lazy Dataset of one CPU task stage (`step(batch)`, a picklable callable) over
    driver-built rows, in small blocks so the work spreads over tasks at once."""
    import ray.data

    blocks = [rows.slice(i, 4 * batch_size) for i in range(0, max(len(rows), 1), 4 * batch_size)]
    return ray.data.from_arrow(blocks).map_batches(step, batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus)


def iter_results(ds, batch_size: int = 256) -> Iterator[pa.Table]:
    """Result rows as Arrow tables, in a stream (the write step declares their schema)."""
    yield from ds.iter_batches(batch_size=batch_size, batch_format="pyarrow")


def start_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join a cluster (`address` or RAY_ADDRESS), or start Ray embedded in this process.
    Returns whether this call started Ray (and so should stop it)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Ray Train's controller collects each `ray.train.report` when it next polls the workers,
        # every 2 s by default: on one machine every epoch and the run's end waited for it (the
        # README's train, epochs 2-8: 13 s, 2.6 s at 0.25 s). Polling local workers costs nothing.
        os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_LOCAL)
    kwargs = {"address": address} if address else {"num_cpus": num_cpus, "include_dashboard": False}
    ray.init(**kwargs, configure_logging=False)
    return True


def cluster_resources(joined: bool = True) -> dict:
    """The cluster's resources now, plus `GPU_CEILING` when the cluster may grow to more GPUs
    than it has (a GPU worker group with min_workers 0 shows no GPU until a job asks for one).
    `joined`: this process joined a cluster (an embedded Ray never grows)."""
    import ray

    now = dict(ray.cluster_resources())
    most = _autoscaler_gpus() if joined else 0.0
    if most > now.get("GPU", 0):
        now[GPU_CEILING] = most
    return now


def _autoscaler_gpus() -> float:
    """The most GPUs the autoscaler may bring up: from the limits an autoscaler reports to the GCS
    (what Ray Train and Ray Data read; not public API, and Ray 2.60's VM autoscaler reports none),
    else from the `ray up` config on this node."""
    try:
        from ray._private.state import state

        reported = (state.get_max_resources_from_cluster_config() or {}).get("GPU", 0)
        if reported:
            return float(reported)
    except Exception as e:  # noqa: BLE001 - without the limits, plan with what is there
        log.debug("no autoscaler limits in the GCS: %s", e)
    path = os.path.expanduser(LAUNCHER_CONFIG)
    if not os.path.exists(path):
        return 0.0
    try:
        import yaml

        with open(path) as f:
            return launcher_gpus(yaml.safe_load(f) or {})
    except Exception as e:  # noqa: BLE001 - an unreadable config: plan with what is there
        log.warning("could not read the cluster's limits from %s (%s): planning with the GPUs that are up", path, e)
        return 0.0


def launcher_gpus(config: dict) -> float:
    """The most GPUs a cluster launcher config allows: the head's, plus each worker type's GPUs x
    its max_workers, within the cluster's max_workers."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    cap = config.get("max_workers")
    head_gpus, workers, largest = 0.0, 0.0, 0.0
    for name, node_type in types.items():
        gpus = float((node_type.get("resources") or {}).get("GPU", 0))
        if name == head:
            head_gpus = gpus
            continue
        workers += gpus * int(node_type.get("max_workers", cap or 0))
        largest = max(largest, gpus)
    if cap is not None:
        workers = min(workers, largest * int(cap))
    return head_gpus + workers


def stop_ray() -> None:
    import ray

    ray.shutdown()
