"""Ray itself: start it embedded or join a cluster, stop it, and read the cluster's resources
(with the GPUs an autoscaler may still add)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


GPU_CEILING = "dinoseg:autoscaler_gpus"  # key in cluster_resources(): GPUs the cluster may grow to


# `ray up` writes the cluster config, with each node type's resources filled in, here on the head
# node, where `ray job submit` runs the job's driver
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"


TRAIN_POLL_ENV, TRAIN_POLL_LOCAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"  # see start_ray


def start_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join a cluster (`address` or RAY_ADDRESS), or start Ray embedded in this process, with
    Ray's logs and its workers' output where `pipeline.runtime.console` sends them (the run's log
    file, unless verbose). Returns whether this call started Ray (and so should stop it)."""
    import ray

    from pipeline.runtime import console

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Ray Train's controller collects each `ray.train.report` when it next polls the workers,
        # every 2 s by default: on one machine every epoch and the run's end waited for it (the
        # README's train, epochs 2-8: 13 s, 2.6 s at 0.25 s). Polling local workers costs nothing.
        os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_LOCAL)
    kwargs = {"address": address} if address else {"num_cpus": num_cpus, "include_dashboard": False}
    ray.init(**kwargs, **console.ray_init_options())  # Ray's logs and workers' output: see console
    console.after_ray_init()
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
