"""The options of every command that computes frozen-backbone features (train, prototypes,
discover), declared once here, and how --layers is read. No torch, no Ray."""

from __future__ import annotations

from model.errors import DinosegError
from pipeline.options import option

DEFAULT_BACKBONE = "dinov2_vits14"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def backbone_option():
    return option(DEFAULT_BACKBONE, "Frozen backbone (see `dinoseg models`).")


def backbone_weights_option():
    return option(None, "Backbone weights path/URL (default: the released ones); 'random' offline.")


def layers_option(default: str):
    return option(None, f"Block indices whose features are used, e.g. 8,9,10,11 (default: {default}).")


def precision_option():
    return option("auto", "auto (bf16 on a GPU, fp32 on the CPU), fp32, bf16, fp16.", choices=PRECISIONS)


def cache_dir_option(default: str):
    return option(None, f"Where the feature cache lives (default {default}).")


def parse_layers(text: str | None, depth: int, default: tuple[int, ...]) -> tuple[int, ...]:
    """--layers as sorted block indices (negative ones count from the end); `default` when unset."""
    if not text:
        return default
    try:
        layers = [int(v) for v in text.split(",")]
    except ValueError:
        layers = []
    if not layers or any(not -depth <= i < depth for i in layers) or len({i % depth for i in layers}) != len(layers):
        raise DinosegError(
            f"--layers '{text}': give distinct block indices 0..{depth - 1} (or -{depth}..-1 from the end), "
            f"e.g. {','.join(map(str, range(max(0, depth - 4), depth)))}."
        )
    return tuple(sorted(i % depth for i in layers))
