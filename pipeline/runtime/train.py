"""Ray Train glue: the trainer that runs a worker loop on N workers, and what a worker asks Ray
(its rank, its device, its data shards, reporting an epoch). The loop itself is
`pipeline.train.loop`, which reaches Ray only through `Worker`."""

from __future__ import annotations

import os
import tempfile
from typing import Callable


def fit(
    worker_loop: Callable[[dict], None],
    loop_config,
    name: str,
    data: dict,
    workers: int,
    use_gpu: bool,
    cpus_per_worker: float | None,
    max_failures: int = 2,
):
    """Run `worker_loop({"loop": loop_config})` on `workers` Ray Train workers over `data`
    (named Ray datasets: "train" is split between workers, "val" read whole by each)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus_per_worker} if cpus_per_worker else None
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"loop": loop_config},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=os.path.join(tempfile.gettempdir(), "dinoseg-ray-train"),
            failure_config=FailureConfig(max_failures=max_failures),  # workers resume from last.pt
        ),
        datasets=data,
        dataset_config=_data_config(),
    )
    return trainer.fit()


def _data_config():
    from ray.data import DataContext, ExecutionOptions
    from ray.train import DataConfig

    # train is split evenly between workers (DDP needs equal steps); every worker reads the
    # whole validation set and evaluates every world_size-th batch of it, so the order of the
    # batches must be the same on every worker. Built here, not by DataConfig.default_ingest_options,
    # which sets the deprecated ExecutionOptions.exclude_resources (a RayDeprecationWarning per run).
    now = DataContext.get_current().execution_options
    options = {"resource_limits": now.resource_limits, "verbose_progress": now.verbose_progress}
    return DataConfig(
        datasets_to_split=["train"],
        execution_options={
            "train": ExecutionOptions(preserve_order=now.preserve_order, **options),
            "val": ExecutionOptions(preserve_order=True, **options),
        },
    )


class Worker:
    """Inside a Ray Train worker: who it is and what Ray gives it."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        self._train, self._torch = ray.train, ray.train.torch
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, module):
        """The module on this worker's device, wrapped in DDP when there is more than one worker."""
        return self._torch.prepare_model(module)

    def shard(self, name: str):
        return self._train.get_dataset_shard(name)

    def report(self, metrics: dict) -> None:
        self._train.report(metrics)
