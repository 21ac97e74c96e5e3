"""What a training run is made of, free of torch and Ray: the train job's options (declared once,
here), the worker loop's config and its per-epoch line (the driver builds them;
`pipeline.train.loop` runs inside Ray Train workers)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from pipeline.data.decode import max_megapixels_option
from pipeline.features.config import (
    backbone_option,
    backbone_weights_option,
    cache_dir_option,
    layers_option,
    precision_option,
)
from pipeline.options import (
    REQUIRED,
    address_option,
    argument,
    option,
    storage_options_option,
)

if TYPE_CHECKING:
    from pipeline.train.training import Schedule


# options that must match for --resume to continue a run (the rest may change, e.g. workers)
RESUME_KEYS = (
    "backbone",
    "backbone_weights",
    "head",
    "layers",
    "resolution",
    "crop",
    "epochs",
    "steps",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup",
    "schedule",
    "class_weights",
    "cache",
    "class_names",
    "ignore_index",  # the masks' "no label" value: another one reads other labels
)


# Options whose value, when not given, follows from the training set's size (`plan`): --resume
# compares the values the run used, once the set is counted.
PLANNED = ("epochs", "steps", "lr")

# The default budget: DEFAULT_EPOCHS passes, and at least MIN_STEPS steps, so that a set of 50-100
# corrected images (3-6 steps an epoch at batch 16) is not cut off after a couple of hundred steps.
DEFAULT_EPOCHS = 40
MIN_STEPS = 300
# Meta's linear protocol: AdamW lr 1e-3 over 40k iterations. The default lr keeps Meta's at
# Meta's budget and grows as sqrt(META_STEPS / steps) for shorter runs, up to MAX_AUTO_LR.
META_STEPS = 40_000
META_LR = 1e-3
MAX_AUTO_LR = 0.03

HEADS = ("linear", "ms", "conv")
SCHEDULES = ("poly", "cosine")


@dataclass
class TrainConfig:
    images: str = argument("Folder/URL prefix of training images, or a .csv/.parquet manifest with image,mask columns.")
    masks: Optional[str] = argument(
        "Folder/URL prefix of index-mask PNGs paired with the images by key, or a point file (.csv/.json: image,x,y,class).",
        cli_default=None,
    )
    classes: str = option(REQUIRED, "Class map file (YAML/JSON) or a bundled name (voc2012, ade20k).")
    output: str = option(REQUIRED, "Folder or URL for head.pt, last.pt, metrics.jsonl, classes.yaml, train.json.")
    val_images: Optional[str] = option(None, "Validation images (else --val-fraction of the training pairs).")
    val_masks: Optional[str] = option(None, "Validation masks.")
    val_fraction: float = option(0.1, "Share of the pairs kept for validation when no --val-images (0: none).")
    backbone: str = backbone_option()
    backbone_weights: Optional[str] = backbone_weights_option()
    head: str = option("linear", "linear (last block), ms (last 4 blocks), conv.", choices=HEADS)
    # comma-separated block indices; default: Meta's for the head
    layers: Optional[str] = layers_option("the head's")
    resolution: int = option(512, "Short side images are resized to (features are computed at it).")
    crop: int = option(518, "Training crop in pixels, rounded to whole 14-px patches.")
    epochs: Optional[int] = option(
        None, f"Passes over the training pairs (default: {DEFAULT_EPOCHS}, and at least {MIN_STEPS} steps)."
    )
    steps: Optional[int] = option(None, "Optimizer steps in all, instead of --epochs (Meta's protocol: 40000).")
    batch_size: int = option(16, "Crops per optimizer step, over all workers.")
    lr: Optional[float] = option(
        None, f"AdamW learning rate (default: {META_LR:g} x sqrt({META_STEPS} / steps), at most {MAX_AUTO_LR:g})."
    )
    weight_decay: float = option(1e-4, "AdamW weight decay.")
    warmup: float = option(0.04, "Linear warm-up, as a fraction of all steps.")
    schedule: str = option("poly", "Decay after warm-up.", choices=SCHEDULES)
    class_weights: Optional[str] = option(None, "Cross-entropy weight per class, comma-separated.")
    cache: bool = option(
        True, "Cache backbone features once (fast epochs; crop+flip only). --no-cache: full augmentation."
    )
    cache_dir: Optional[str] = cache_dir_option("OUTPUT/cache")
    workers: Optional[int] = option(None, "Ray Train workers (default: one per GPU, else 1).")
    cpus_per_worker: Optional[float] = option(None, "CPUs reserved per worker.")
    precision: str = precision_option()
    resume: bool = option(False, "Continue the run in OUTPUT from last.pt.")
    overwrite: bool = option(False, "Start over even if OUTPUT holds a run.")
    seed: int = option(0, "Seed for the head's initialisation and the validation split.")
    max_megapixels: float = max_megapixels_option()
    storage_options: dict = storage_options_option()
    address: Optional[str] = address_option()


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
    storage_options: dict | None = field(default=None, repr=False)  # credentials: never in a repr
    weights_env: dict = field(default_factory=dict, repr=False)  # the driver's (model.weights.weights_env)
    steps: int = 0  # all the run's optimizer steps (the schedule's length); 0: epochs * steps_per_epoch


def steps_per_epoch(n_train: int, workers: int, batch_size: int) -> int:
    return math.ceil((n_train // workers) / batch_size)


@dataclass(frozen=True)
class Plan:
    """How long a run trains and at which peak lr, resolved from the options and the set's size."""

    epochs: int
    steps: int
    steps_per_epoch: int
    lr: float


def auto_lr(steps: int) -> float:
    """The default peak lr for a run of `steps`: Meta's 1e-3 at Meta's 40k steps, and for shorter
    runs sqrt(40k / steps) times that (a head trained for 1000 steps: 6.3e-3), at most MAX_AUTO_LR."""
    return min(MAX_AUTO_LR, META_LR * math.sqrt(META_STEPS / max(1, steps)))


def plan(n_train: int, workers: int, batch_size: int, epochs: int | None, steps: int | None, lr: float | None) -> Plan:
    """The run's budget: `steps` when given (the last epoch is cut short), else `epochs` passes
    (given: exactly that; default: DEFAULT_EPOCHS, and at least MIN_STEPS steps); `lr` when given,
    else auto_lr(steps). `batch_size` is per worker."""
    per_epoch = steps_per_epoch(n_train, workers, batch_size)
    if steps is None:
        steps = per_epoch * (epochs or DEFAULT_EPOCHS)
        if epochs is None:
            steps = max(steps, MIN_STEPS)
    return Plan(math.ceil(steps / per_epoch), steps, per_epoch, lr if lr is not None else auto_lr(steps))


def describe(record: dict) -> str:
    miou = record.get("val_miou")
    val = f"val mIoU {miou:.4f}" if isinstance(miou, float) else "no validation"
    return (
        f"epoch {record['epoch']}/{record['epochs']}: loss {record['train_loss']:.4f}, {val}, "
        f"lr {record['lr']:.2e}, {record['seconds']:.1f}s"
    )
