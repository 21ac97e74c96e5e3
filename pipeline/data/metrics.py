"""Segmentation metrics: the confusion matrix, per-class IoU and Dice, mIoU, pixel accuracy.

Rows of a confusion matrix are the ground-truth class, columns the predicted class; a (C, C+1)
matrix has one more column for pixels predicted 'unlabeled' (a pseudo-label's unsure 255): a
miss of the row's class (a false negative), a false positive for no class. Numpy in,
numpy out; torch in, torch out on the same device, so an evaluation loop on the GPU never copies
masks to the host. Scores follow mmsegmentation: a class absent from both the ground truth and
the predictions has no IoU (NaN, left out of the mean); a class predicted but never in the
ground truth has IoU 0.
"""

from __future__ import annotations

import sys

import numpy as np

from model.classes import IGNORE_INDEX


def _torch_tensor_type():
    # Only a module that already imported torch can hand us tensors: looking it up in
    # sys.modules keeps torch's import time out of `dinoseg evaluate`, which reads PNGs.
    torch = sys.modules.get("torch")
    return torch.Tensor if torch is not None else None


def _first_values(values, limit: int = 5) -> list[int]:
    return [int(v) for v in list(values)[:limit]]


def confusion_matrix(
    pred, target, num_classes: int, ignore_index: int | None = IGNORE_INDEX, unlabeled_index: int | None = None
):
    """The (C, C) int64 confusion matrix of integer masks `pred` and `target` of one shape;
    (C, C+1) with `unlabeled_index`, the predicted value that means 'no class' (column C).

    Pixels whose target is `ignore_index` are skipped, whatever their prediction. Raises
    ValueError for a shape mismatch, a non-integer dtype, target values outside [0, C) other than
    `ignore_index`, predicted values outside [0, C) other than `unlabeled_index`, and an
    `unlabeled_index` that is a class; TypeError when one is a torch tensor and the other is not."""
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}.")
    n = int(num_classes)
    if unlabeled_index is not None and 0 <= unlabeled_index < n:
        raise ValueError(
            f"unlabeled_index {unlabeled_index} is one of the classes 0..{n - 1}: it must be another value."
        )
    tensor = _torch_tensor_type()
    is_tensor = [tensor is not None and isinstance(x, tensor) for x in (pred, target)]
    if is_tensor[0] != is_tensor[1]:
        raise TypeError("pred and target must both be numpy arrays or both torch tensors.")
    if not is_tensor[0]:
        pred, target = np.asarray(pred), np.asarray(target)
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(
            f"pred has shape {tuple(pred.shape)} but target has shape {tuple(target.shape)}: they must match."
        )
    for name, x in (("pred", pred), ("target", target)):
        floating = (x.dtype.is_floating_point or x.dtype.is_complex) if is_tensor[0] else x.dtype.kind not in "uib"
        if floating:
            raise ValueError(f"{name} must hold integer class indices, not {x.dtype}.")
    if is_tensor[0]:
        torch = sys.modules["torch"]  # the caller's tensors: torch is loaded, and this module never loads it

        p, t = pred.reshape(-1).long(), target.reshape(-1).long()
        unique, bincount, where = torch.unique, torch.bincount, torch.where
    else:
        p, t = pred.reshape(-1).astype(np.int64), target.reshape(-1).astype(np.int64)
        unique, bincount, where = np.unique, np.bincount, np.where
    ignored = (t == ignore_index) if ignore_index is not None else (t < t)  # (t < t): all False, same type
    bad_target = ((t < 0) | (t >= n)) & ~ignored
    if bool(bad_target.any()):
        raise ValueError(
            f"target has values {_first_values(unique(t[bad_target]))} outside 0..{n - 1} that are not the ignore index {ignore_index}."
        )
    unlabeled = (p == unlabeled_index) if unlabeled_index is not None else (p < p)
    bad_pred = ((p < 0) | (p >= n)) & ~unlabeled
    if bool(bad_pred.any()):
        extra = f" or the unlabeled index {unlabeled_index}" if unlabeled_index is not None else ""
        raise ValueError(f"pred has values {_first_values(unique(p[bad_pred]))} outside the classes 0..{n - 1}{extra}.")
    m = n + (unlabeled_index is not None)  # columns
    p = where(unlabeled, n, p)
    # Ignored pixels go to one extra bin, dropped after counting: boolean indexing would make the
    # GPU wait for the host to learn how many pixels are left.
    index = where(ignored, n * m, t * m + p)
    return bincount(index, minlength=n * m + 1)[: n * m].reshape(n, m)


def _as_numpy(confusion) -> np.ndarray:
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(confusion, tensor):
        confusion = confusion.detach().cpu().numpy()
    return np.asarray(confusion).astype(np.int64)


def _optional(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


def _nanmean(values: np.ndarray) -> float | None:
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else None


def scores(confusion, names=None) -> dict:
    """Per-class and mean scores of a (C, C) or (C, C+1) confusion matrix (numpy or torch), as
    plain Python values that json.dumps takes. IoU and Dice are fractions in [0, 1]; None where
    undefined. Pixels predicted unlabeled (column C) count in their class's ground truth and in
    `pixels`, never as a prediction; `unlabeled_fraction` is their share of `pixels`."""
    cm = _as_numpy(confusion)
    if cm.ndim != 2 or cm.shape[0] == 0 or cm.shape[1] - cm.shape[0] not in (0, 1):
        raise ValueError(
            f"a confusion matrix must be (C, C) or (C, C+1) with an unlabeled column, got shape {cm.shape}."
        )
    n = cm.shape[0]
    unlabeled = int(cm[:, n:].sum())
    if names is not None:
        names = [str(x) for x in names]
        if len(names) != n:
            raise ValueError(f"{len(names)} class names for a confusion matrix of {n} classes.")
    tp = np.diag(cm[:, :n])
    gt, pred = cm.sum(axis=1), cm[:, :n].sum(axis=0)
    union = gt + pred - tp  # 0 only when the class is in neither the ground truth nor the predictions
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        dice = np.where(union > 0, 2 * tp / (gt + pred), np.nan)
    total = int(cm.sum())
    result = {
        "miou": _nanmean(iou),
        "mean_dice": _nanmean(dice),
        "pixel_accuracy": float(tp.sum() / total) if total else None,
        "pixels": total,
        "unlabeled_pixels": unlabeled,
        "unlabeled_fraction": unlabeled / total if total else None,
        "num_classes": n,
        "classes_scored": int((union > 0).sum()),
        "iou": _optional(iou),
        "dice": _optional(dice),
        "gt_pixels": [int(v) for v in gt],
        "pred_pixels": [int(v) for v in pred],
    }
    if names is not None:
        result["names"] = names
    return result


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def format_table(result: dict) -> str:
    """Per-class lines (name, IoU %, Dice %, GT pixels) and a summary line, from `scores()`."""
    n = len(result["iou"])
    names = result.get("names") or [str(i) for i in range(n)]
    width = max(len("class"), *(len(x) for x in names))
    pixels = [f"{v:,}" for v in result["gt_pixels"]]
    pwidth = max(len("GT pixels"), *(len(x) for x in pixels))
    lines = [f"{'class':<{width}}  {'IoU %':>7}  {'Dice %':>7}  {'GT pixels':>{pwidth}}"]
    for name, iou, dice, px in zip(names, result["iou"], result["dice"], pixels, strict=True):
        lines.append(f"{name:<{width}}  {_percent(iou):>7}  {_percent(dice):>7}  {px:>{pwidth}}")
    lines.append(
        f"mIoU {_percent(result['miou'])}  mean Dice {_percent(result['mean_dice'])}  "
        f"pixel accuracy {_percent(result['pixel_accuracy'])}  "
        f"({result.get('classes_scored', n)} of {n} classes scored, {result['pixels']:,} pixels"
        + (
            f", {_percent(result['unlabeled_fraction'])}% predicted unlabeled)"
            if result.get("unlabeled_pixels")
            else ")"
        )
    )
    return "\n".join(lines)
