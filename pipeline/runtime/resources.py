"""Where each stage of a Ray Data graph runs: predictor actors, their GPUs and CPUs, and the CPU
tasks that read, decode and write (no Ray import: plain numbers from the cluster's resources)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline.runtime.cluster import GPU_CEILING

log = logging.getLogger(__name__)

DECODE_CPUS = 0.5  # the default CPUs per read/decode/write task of a segment run


@dataclass(frozen=True)
class Resources:
    """Where each stage runs. `None` fields are filled from the cluster by `resolve`."""

    actors: int | None = None  # predictor actors (default: one per GPU, or one on the CPU)
    gpus_per_actor: float | None = None  # default 1 on a GPU cluster, 0 otherwise
    cpus_per_actor: float | None = None  # default 1 with GPUs; on the CPU, what decoding leaves
    decode_cpus: float = DECODE_CPUS  # CPUs per read/decode/write task
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
