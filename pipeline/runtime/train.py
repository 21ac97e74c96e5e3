"""Ray Train glue: the trainer that runs a worker loop on N workers, and what a worker asks Ray
(its rank, its device, its data shards, reporting an epoch). The loop itself is
`pipeline.train.loop`, which reaches Ray only through `Worker`."""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from typing import Callable

from model.errors import DinosegError

log = logging.getLogger("dinoseg.train")


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
    (named Ray datasets: "train" is split between workers, "val" read whole by each).

    A worker that fails is started again up to `max_failures` times (the workers resume from
    last.pt), unless it failed with a DinosegError (a refusal: the storage failing a pair after
    its retries, a file that does not fit): that is raised here as one sentence, not retried.
    The restarts are made here, not by Ray Train's FailureConfig, whose policy cannot be told
    which errors are permanent and whose error wraps the refusal in a traceback."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus_per_worker} if cpus_per_worker else None
    for ds in data.values():  # a step's DinosegError reaches the workers as itself (refusals())
        ds.context.raise_original_map_exception = True
    for attempt in range(max_failures + 1):
        trainer = TorchTrainer(
            worker_loop,
            train_loop_config={"loop": loop_config},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(
                name=name,
                storage_path=os.path.join(tempfile.gettempdir(), "dinoseg-ray-train"),
                failure_config=FailureConfig(max_failures=0),  # restarted below, from last.pt
            ),
            datasets=data,
            dataset_config=_data_config(),
        )
        try:
            return trainer.fit()
        except Exception as e:
            refusal = refusal_in(e)
            if refusal is not None:
                raise DinosegError(refusal) from None
            if attempt == max_failures:
                raise
            log.warning(
                "training failed (%s): starting the workers again from last.pt (restart %d of %d)",
                type(e).__name__,
                attempt + 1,
                max_failures,
            )


@contextmanager
def refusals():
    """Datasets built inside raise a step's DinosegError as itself (Ray Data wraps it in a
    UserCodeException that loses it on its way between processes), and a DinosegError raised
    inside, through Ray's wrappers, comes out as the one sentence it is."""
    from ray.data import DataContext

    ctx = DataContext.get_current()  # what the datasets built here copy
    before = ctx.raise_original_map_exception
    ctx.raise_original_map_exception = True
    try:
        yield
    except Exception as e:
        refusal = refusal_in(e)
        if refusal is None or refusal == str(e):  # none, or a DinosegError of this process as it is
            raise
        raise DinosegError(refusal) from None
    finally:
        ctx.raise_original_map_exception = before


# where Ray keeps the error it wraps: a task's cause, Train V2's worker errors (rank -> error),
# a user exception with its traceback, a controller's failure
_WRAPPED = ("cause", "_base_exc", "controller_failure")


def refusal_in(error: BaseException) -> str | None:
    """The sentence of the first DinosegError in `error` and whatever it wraps (causes, Ray's
    task and worker errors), or None when there is none."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen or not isinstance(e, BaseException):
            continue
        seen.add(id(e))
        inner = [getattr(e, name, None) for name in _WRAPPED]
        inner += list((getattr(e, "worker_failures", None) or {}).values())
        if isinstance(e, DinosegError) and not any(isinstance(i, BaseException) for i in inner):
            # not Ray's copy of it (RayTaskError(DinosegError)), whose str is a traceback; and its
            # sentence without the lines Ray Data appends to a map step's error ("Failed to apply ...")
            return str(e).split("\n", 1)[0]
        todo += inner + [e.__cause__, e.__context__]
    return None


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
