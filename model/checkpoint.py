"""The project's head checkpoint: written by training, read by segmentation.

One file, loadable with `torch.load(weights_only=True)` (only tensors, str, int, float, lists,
dicts), holding the head's state dict and everything needed to use it:

    {"format": "dinoseg.head", "version": 1, "backbone": "dinov2_vits14",
     "head": HeadConfig.to_dict(), "classes": ClassMap.to_dict(), "resolution": 512,
     "normalization": {"mean": [...], "std": [...]}, "state_dict": {...}, "meta": {...}}
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .backbone import IMAGENET_MEAN, IMAGENET_STD
from .classes import ClassMap
from .convert import describe_mismatch
from .errors import WeightsError
from .heads import HeadConfig, build_head, output_classes
from .storage import options_for, write_local_atomic

FORMAT = "dinoseg.head"
VERSION = 1


@dataclass
class HeadCheckpoint:
    backbone: str
    config: HeadConfig
    classes: ClassMap
    state_dict: dict
    resolution: int = 512
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    meta: dict = field(default_factory=dict)

    def build(self, source: str = "the head checkpoint") -> nn.Module:
        head = build_head(self.config)
        found = describe_mismatch(self.state_dict, head.state_dict())
        if found:
            raise WeightsError(
                f"{source}: its weights do not fit the '{self.config.kind}' head it declares ({found}); "
                "the file is damaged or was edited: retrain or re-export it."
            )
        head.load_state_dict(self.state_dict, strict=True)
        return head

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "backbone": self.backbone,
            "head": self.config.to_dict(),
            "classes": self.classes.to_dict(),
            "resolution": int(self.resolution),
            "normalization": {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]},
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in self.state_dict.items()},
            "meta": plain(self.meta, "meta"),
        }


def plain(value, where: str):
    """`value` as types that torch.load(weights_only=True) reads back: numpy scalars become
    Python numbers, paths and other scalars strings; anything else is refused here, at save time."""
    if value is None or type(value) in (str, bool, int, float):
        return value
    for kind in (bool, int, float, str):  # subclasses (np.float64 is a float) become the plain type
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {str(k): plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalar
        return value.item()
    if hasattr(value, "tolist"):  # numpy array
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{where} holds a {type(value).__name__}, which a weights-only checkpoint cannot store")


def is_head_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def parse_head_checkpoint(obj, source: str, backbone: str | None = None) -> HeadCheckpoint:
    """Validate a loaded head checkpoint; `backbone`, when given, must be the one it was trained on."""
    if not is_head_checkpoint(obj):
        raise WeightsError(f"{source} is not a dinoseg head checkpoint: pass a head.pt written by `dinoseg train`.")
    version = obj.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise WeightsError(
            f"{source} has head-checkpoint format version {version!r}, and this dinoseg reads up to "
            f"{VERSION}: upgrade dinoseg to read it."
        )
    try:
        ckpt = HeadCheckpoint(
            backbone=str(obj["backbone"]),
            config=HeadConfig.from_dict(obj["head"]),
            classes=ClassMap.from_dict(obj["classes"], source=source, written_by_dinoseg=True),
            state_dict=dict(obj["state_dict"]),
            resolution=int(obj.get("resolution", 512)),
            mean=tuple(obj.get("normalization", {}).get("mean", IMAGENET_MEAN)),
            std=tuple(obj.get("normalization", {}).get("std", IMAGENET_STD)),
            meta=dict(obj.get("meta", {})),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{source} is a damaged head checkpoint (missing {e}): retrain or re-export it.") from None
    if backbone is not None and backbone != ckpt.backbone:
        raise WeightsError(
            f"{source} was trained on {ckpt.backbone}, not {backbone}: use --backbone {ckpt.backbone} "
            "(or leave --backbone out; the checkpoint names its backbone)."
        )
    n = ckpt.config.num_classes
    got = output_classes(ckpt.state_dict)
    if got is None:
        raise WeightsError(
            f"{source} holds no classifier weights (conv_seg.weight, prototypes or embeddings): the file is damaged; rebuild it."
        )
    if len(ckpt.classes) != n or got != n:
        raise WeightsError(
            f"{source} is a head for {got} classes but names {len(ckpt.classes)} and declares {n}: "
            "the file is inconsistent; retrain it with the right class map."
        )
    return ckpt


def save_head_checkpoint(ckpt: HeadCheckpoint, url: str, storage_options: dict | None = None) -> None:
    """Write atomically: a local file via temp + rename; an object store PUT is atomic itself."""
    buf = io.BytesIO()
    torch.save(ckpt.to_dict(), buf)
    data = buf.getvalue()
    if "://" not in url or url.startswith("file://"):
        write_local_atomic(url.removeprefix("file://"), data)  # the temp name a run's sweep knows
        return
    import fsspec

    with fsspec.open(url, "wb", **options_for(url, storage_options)) as f:
        f.write(data)
