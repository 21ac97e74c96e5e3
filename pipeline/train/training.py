"""The math of head training, free of Ray: batches to tensors, the loss, the schedule, one
epoch of training, validation into a confusion matrix, and the training state on disk.

`pipeline.train.loop` runs these inside Ray Train workers; a unit test runs them as they are.
Labels arrive 0-based with IGNORE_INDEX (255) = ignore whatever values the class map gives its
masks: `pipeline.features.pairs.decode_label` maps them once, as masks are read.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.classes import IGNORE_INDEX
from model.errors import WeightsError
from model.geometry import PATCH_SIZE
from pipeline.data.metrics import confusion_matrix
from pipeline.train.trainset import MEAN_RGB

STATE_FORMAT = "dinoseg.train-state"
STATE_VERSION = 1


@dataclass(frozen=True)
class Schedule:
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: float = 0.04  # fraction of all steps (Meta: 1500 of 40k iterations)
    kind: str = "poly"  # poly | cosine
    power: float = 1.0
    warmup_ratio: float = 1e-6  # the lr starts at lr * warmup_ratio

    def factor(self, step: int, total: int) -> float:
        """The lr multiplier at `step` (0-based) of `total`: linear warm-up, then poly or cosine to 0."""
        warm = int(self.warmup * total)
        if step < warm:
            return self.warmup_ratio + (1 - self.warmup_ratio) * step / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return (1 - t) ** self.power if self.kind == "poly" else 0.5 * (1 + math.cos(math.pi * t))


def make_optimizer(head: nn.Module, schedule: Schedule, total_steps: int):
    opt = torch.optim.AdamW(head.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule.factor(s, total_steps))
    return opt, sched


# ---- batches ---------------------------------------------------------------------------------


def _pad_stack(arrays: list[np.ndarray], value, multiple: int = 1) -> np.ndarray:
    """Stack arrays of different trailing sizes, padding at the end (bottom/right) with `value`."""
    h = max(a.shape[-2] for a in arrays)
    w = max(a.shape[-1] for a in arrays)
    out = np.full((len(arrays), *arrays[0].shape[:-2], h, w), value, arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, ..., : a.shape[-2], : a.shape[-1]] = a
    return out


def to_tensors(batch: dict, device: torch.device) -> tuple[str, torch.Tensor, torch.Tensor]:
    """A numpy batch -> ('features' | 'pixels', input, label int64). Ragged rows (validation on
    whole images) are padded: features with 0, pixels centre-padded to whole patches with the
    mean colour and then to the largest, labels with IGNORE_INDEX."""
    if "features" in batch:
        feats, labels = batch["features"], batch["label"]
        if feats.dtype == object:
            feats, labels = _pad_stack(list(feats), 0), _pad_stack(list(labels), IGNORE_INDEX)
        x = torch.as_tensor(np.ascontiguousarray(feats)).to(device).float()
        return "features", x, torch.as_tensor(np.ascontiguousarray(labels)).to(device).long()
    pixels, labels = batch["pixels"], batch["label"]
    if pixels.dtype == object or pixels.shape[1] % PATCH_SIZE or pixels.shape[2] % PATCH_SIZE:
        pixels, labels = _patch_pad(list(pixels), list(labels))
    x = torch.as_tensor(np.ascontiguousarray(pixels)).to(device)
    return "pixels", x, torch.as_tensor(np.ascontiguousarray(labels)).to(device).long()


def _patch_pad(pixels: list[np.ndarray], labels: list[np.ndarray]):
    from pipeline.features.pairs import pad_label, padded_geometry

    out_px, out_lb = [], []
    for px, lb in zip(pixels, labels, strict=True):
        gh, gw, top, left = padded_geometry(*lb.shape)
        canvas = np.empty((gh * PATCH_SIZE, gw * PATCH_SIZE, 3), np.uint8)
        canvas[:] = MEAN_RGB
        canvas[top : top + lb.shape[0], left : left + lb.shape[1]] = px
        out_px.append(canvas.transpose(2, 0, 1))
        out_lb.append(pad_label(lb, gh, gw, top, left))
    px = _pad_stack(out_px, 0)
    for i, p in enumerate(out_px):  # the stack's own padding is mean colour too
        px[i, :, p.shape[1] :, :] = np.array(MEAN_RGB, np.uint8)[:, None, None]
        px[i, :, :, p.shape[2] :] = np.array(MEAN_RGB, np.uint8)[:, None, None]
    return px.transpose(0, 2, 3, 1), _pad_stack(out_lb, IGNORE_INDEX)


class FeatureSource:
    """What turns a batch's input into the head's input maps: cached features are split back
    into their layers; pixels go through the frozen backbone (without the cache)."""

    def __init__(self, layers, embed_dim: int, backbone=None, mean=None, std=None, precision="fp32"):
        self.layers, self.embed_dim, self.backbone, self.precision = list(layers), embed_dim, backbone, precision
        if backbone is not None:
            device = backbone.device
            self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
            self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, kind: str, x: torch.Tensor) -> list[torch.Tensor]:
        if kind == "features":
            return list(torch.split(x, self.embed_dim, dim=1))
        from model.device import autocast

        if self.backbone is None:
            raise RuntimeError(
                "pixels arrived but no backbone is loaded: the training data and the cache setting disagree"
            )
        x = (x.permute(0, 3, 1, 2).float() - self.mean) / self.std
        with torch.no_grad(), autocast(x.device, self.precision):
            maps = self.backbone.get_intermediate_layers(x, n=self.layers, reshape=True, norm=True)
        return [m.float() for m in maps]


def loss_fn(logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy at the label's resolution (logits upsampled bilinearly), ignoring 255."""
    logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, label, weight=weight, ignore_index=IGNORE_INDEX)


def train_epoch(
    head,
    source: FeatureSource,
    batches: Iterable[dict],
    optimizer,
    scheduler,
    device,
    weight=None,
    precision="fp32",
    on_step=None,
    max_steps: int | None = None,
) -> dict:
    """One pass over `batches`, or its first `max_steps` steps (the last epoch of a run whose
    budget is in steps). A batch with no labelled pixel (all 255) has no loss: it is left
    out of the epoch's loss, and it still takes its place in the schedule (the scheduler steps
    once per batch, so the lr follows the planned steps) and in DDP's gradient all-reduce (a
    zero loss keeps the graph). The optimizer steps only when some gradient is non-zero; under
    DDP the gradients are already averaged, so every worker takes the same decision.

    Returns train_loss (mean per sample over the batches with a loss; NaN when none),
    train_samples (all samples), and loss_sum / loss_samples for an all-reduce across workers."""
    from model.device import autocast

    head.train()
    total, count, samples = 0.0, 0, 0
    steps = 0
    for batch in batches:
        if max_steps is not None and steps >= max_steps:
            break
        if not len(batch["label"]):  # a block of the other split's rows
            continue
        steps += 1
        kind, x, label = to_tensors(batch, device)
        maps = source(kind, x)
        with autocast(device, precision):
            logits = head(maps)
        labelled = bool((label != IGNORE_INDEX).any())
        loss = loss_fn(logits.float(), label, weight) if labelled else logits.float().sum() * 0.0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not labelled and not _any_gradient(optimizer):
            optimizer.zero_grad(set_to_none=True)  # AdamW skips parameters without a gradient: no decay, no momentum
        optimizer.step()
        scheduler.step()
        samples += len(label)
        if labelled:
            total += float(loss.detach()) * len(label)
            count += len(label)
        if on_step:
            on_step()
    return {
        "train_loss": total / count if count else float("nan"),
        "train_samples": samples,
        "loss_sum": total,
        "loss_samples": count,
    }


def _any_gradient(optimizer) -> bool:
    return any(bool(p.grad.any()) for g in optimizer.param_groups for p in g["params"] if p.grad is not None)


@torch.no_grad()
def validate(
    head,
    source: FeatureSource,
    batches: Iterable[dict],
    device,
    num_classes: int,
    precision="fp32",
    take=lambda i: True,
) -> torch.Tensor:
    """The confusion matrix over the batches this worker takes (`take(batch_index)`)."""
    from model.device import autocast

    head.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for i, batch in enumerate(batches):
        if not take(i) or not len(batch["label"]):
            continue
        kind, x, label = to_tensors(batch, device)
        with autocast(device, precision):
            logits = head(source(kind, x))
        logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
        conf += confusion_matrix(logits.argmax(1), label, num_classes, IGNORE_INDEX)
    return conf


# ---- the state that resumes a run ------------------------------------------------------------


def state_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save({"format": STATE_FORMAT, "version": STATE_VERSION, **state}, buf)
    return buf.getvalue()


def parse_state(obj, source: str) -> dict:
    if not isinstance(obj, dict) or obj.get("format") != STATE_FORMAT:
        raise WeightsError(
            f"{source} is not a dinoseg training state: resume from the last.pt that `dinoseg train` wrote."
        )
    if obj.get("version", 0) > STATE_VERSION:
        raise WeightsError(f"{source} was written by a newer dinoseg: upgrade dinoseg to resume it.")
    return obj
