"""Weights hubs in Meta's layout, filled with random weights, for tests of the named models
(`DINOSEG_HUB=<folder>`): nothing is downloaded, the loading code is the real one."""

from __future__ import annotations

from pathlib import Path

import torch

from model.backbone import backbone_config, build_backbone
from model.weights import SEGMENTATION_MODELS, backbone_file, head_file


def mmseg_head(num_classes: int, channels: int, seed: int) -> dict:
    """A head file as Meta released them: an mmseg checkpoint whose decode_head is a BNHead."""
    g = torch.Generator().manual_seed(seed)
    return {
        "meta": {"CLASSES": ["x"] * num_classes, "mmcv_version": "1.5.0"},
        "state_dict": {
            "decode_head.conv_seg.weight": torch.randn(num_classes, channels, 1, 1, generator=g) * 0.5,
            "decode_head.conv_seg.bias": torch.randn(num_classes, generator=g),
            "decode_head.bn.weight": torch.rand(channels, generator=g) + 0.5,
            "decode_head.bn.bias": torch.randn(channels, generator=g) * 0.1,
            "decode_head.bn.running_mean": torch.randn(channels, generator=g) * 0.1,
            "decode_head.bn.running_var": torch.rand(channels, generator=g) + 0.5,
            "decode_head.bn.num_batches_tracked": torch.tensor(40000),
        },
    }


def write_hub(root: Path, names: list[str], seed: int = 0) -> dict[str, dict]:
    """Write the files of the named backbones / segmentation models under `root`; returns the
    backbones' state dicts by name (freshly initialised models, seeded)."""
    written = {}
    for name in names:
        model = SEGMENTATION_MODELS.get(name)
        backbone = model.backbone if model else name
        if backbone not in written:
            torch.manual_seed(seed)
            written[backbone] = build_backbone(backbone).state_dict()
            path = root / backbone_file(backbone)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(written[backbone], path)
        if model:
            channels = backbone_config(backbone).embed_dim * (4 if model.head == "ms" else 1)
            torch.save(
                mmseg_head(model.num_classes, channels, seed), root / head_file(backbone, model.dataset, model.head)
            )
    return written


def write_backbone(root: Path, name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """One backbone's file under `root` (freshly initialised, seeded), its tensors saved as
    `dtype` (bfloat16 halves a ViT-L's 1.2 GB; `load_backbone` casts to the model's dtype).
    Returns the file's path."""
    torch.manual_seed(seed)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in build_backbone(name).state_dict().items()}
    path = root / backbone_file(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path
