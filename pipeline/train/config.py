"""What a training run is made of, free of torch and Ray: the worker loop's config and its
per-epoch line (the driver builds them; `pipeline.train.loop` runs inside Ray Train workers)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.train.training import Schedule


@dataclass(frozen=True)
class LoopConfig:
    """Everything a worker needs (picklable). `head`/`classes` are their to_dict() forms."""

    output: str
    run_id: str
    head: dict
    classes: dict
    backbone: str
    backbone_weights: str | None
    resolution: int
    cached: bool
    epochs: int
    batch_size: int  # per worker
    steps_per_epoch: int
    schedule: Schedule
    class_weights: tuple[float, ...] | None = None
    precision: str = "auto"
    seed: int = 0
    settings: dict = field(default_factory=dict)  # the job's options, stored with the state
    storage_options: dict | None = None
    weights_env: dict = field(default_factory=dict)  # the driver's DINOSEG_HUB/CACHE (model.weights.weights_env)


def steps_per_epoch(n_train: int, workers: int, batch_size: int) -> int:
    return math.ceil((n_train // workers) / batch_size)


def describe(record: dict) -> str:
    miou = record.get("val_miou")
    val = f"val mIoU {miou:.4f}" if isinstance(miou, float) else "no validation"
    return (f"epoch {record['epoch']}/{record['epochs']}: loss {record['train_loss']:.4f}, {val}, "
            f"lr {record['lr']:.2e}, {record['seconds']:.1f}s")
