"""The only place that imports Ray: starting and joining it, the cluster's resources, Ray Data
graphs built from plain steps, and Ray Train's trainer and worker context. Ray is imported inside
the functions, so importing this package costs nothing."""

from pipeline.runtime.cluster import GPU_CEILING, cluster_resources, launcher_gpus, start_ray, stop_ray
from pipeline.runtime.datasets import arrow_filesystem, build, iter_results, map_rows, quiet, strip_protocol
from pipeline.runtime.resources import Resources

__all__ = [
    "GPU_CEILING",
    "Resources",
    "arrow_filesystem",
    "build",
    "cluster_resources",
    "iter_results",
    "launcher_gpus",
    "map_rows",
    "quiet",
    "start_ray",
    "stop_ray",
    "strip_protocol",
]
