"""Device and precision are decided here, once, from what the caller asked for."""

from __future__ import annotations

import contextlib

import torch

from .errors import DinosegError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def choose_device(requested: str | torch.device | None = None) -> torch.device:
    """'auto'/None: CUDA when present, else CPU. An explicit device must exist."""
    if requested is None or str(requested) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise DinosegError(f"Unknown device '{requested}': use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DinosegError(
                f"Device '{requested}' was asked for but no CUDA GPU is visible: use --device cpu (or auto)."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DinosegError(
                f"Device '{requested}' does not exist ({torch.cuda.device_count()} GPUs visible): pick another index."
            )
    return device


def choose_precision(requested: str | None, device: torch.device) -> str:
    """'auto'/None: bf16 on a GPU that supports it (fp16 on older ones), fp32 on the CPU."""
    if requested is None or requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if requested not in PRECISIONS:
        raise DinosegError(f"Unknown precision '{requested}': use auto, {', '.join(PRECISIONS)}.")
    return requested


def autocast(device: torch.device, precision: str):
    """The autocast context for a forward pass; fp32 runs without one."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])
