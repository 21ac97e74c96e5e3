"""Segmentation heads over DINOv2 patch features.

- `LinearHead` is Meta's BNHead: chosen block outputs resized to the first one's size and
  concatenated, BatchNorm, then a 1x1 conv. 'linear' reads the last block, 'ms' the last four.
  Meta's released head files (mmseg checkpoints) load into it after dropping `decode_head.`.
- `ConvHead` is a small convolutional decoder for users who want more than a linear probe.
- `PrototypeHead` needs no training: cosine similarity to per-class prototypes (below).
- `model.dinotxt.TextHead` needs none either: dino.txt's vision head, then cosine similarity to
  text embeddings of the class names; it reads the backbone's tokens, not its maps.

A head takes the backbone's reshaped features (a list of (B, D, h, w)) and returns logits on
the patch grid (linear) or twice that (conv); the Segmenter upsamples them to the image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DinosegError, WeightsError

HEAD_TYPES = ("linear", "ms", "conv")  # trained heads; PrototypeHead's KIND is built, not trained


@dataclass(frozen=True)
class HeadConfig:
    kind: str  # one of HEAD_TYPES
    layers: tuple[int, ...]  # absolute block indices read from the backbone
    embed_dim: int
    num_classes: int
    hidden: int = 256  # ConvHead width
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def in_channels(self) -> int:
        return self.embed_dim * len(self.layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        return cls(
            kind=d["kind"],
            layers=tuple(int(i) for i in d["layers"]),
            embed_dim=int(d["embed_dim"]),
            num_classes=int(d["num_classes"]),
            hidden=int(d.get("hidden", 256)),
            extra=dict(d.get("extra", {})),
        )


def default_layers(kind: str, depth: int) -> tuple[int, ...]:
    """Meta's choice: 'linear' reads the last block; 'ms' and our 'conv' read the last four."""
    if kind not in HEAD_TYPES:
        raise DinosegError(f"Unknown head type '{kind}'; choose one of: {', '.join(HEAD_TYPES)}.")
    n = 1 if kind == "linear" else 4
    return tuple(range(depth - n, depth))


def resize_concat(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Resize every map bilinearly to the first one's size, then concatenate on channels."""
    size = features[0].shape[-2:]
    maps = [
        f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        for f in features
    ]
    return torch.cat(maps, dim=1) if len(maps) > 1 else maps[0]


class LinearHead(nn.Module):
    """BatchNorm + 1x1 conv over concatenated patch features (Meta's BNHead)."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        self.bn = nn.BatchNorm2d(config.in_channels)
        self.conv_seg = nn.Conv2d(config.in_channels, config.num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.conv_seg(self.bn(resize_concat(features)))


def _conv_bn_act(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.GELU())


class ConvHead(nn.Module):
    """1x1 projection, 2x upsampling, two 3x3 conv blocks, 1x1 classifier: logits at 1/7 scale."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        self.proj = _conv_bn_act(config.in_channels, config.hidden, 1)
        self.refine = nn.Sequential(
            _conv_bn_act(config.hidden, config.hidden, 3), _conv_bn_act(config.hidden, config.hidden, 3)
        )
        self.conv_seg = nn.Conv2d(config.hidden, config.num_classes, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.proj(resize_concat(features))
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.conv_seg(self.refine(x))


# ---- prototype heads ---------------------------------------------------------------------------
# Nearest-prototype segmentation on DINOv2 patch features, no training. Each class holds up to k
# unit vectors in feature space (its prototypes: the mean of its normalised patch features for
# k=1, k-means centroids for k>1). A patch's logit for a class is the cosine similarity of its
# normalised feature to the class's best prototype, divided by a temperature, so the softmax over
# classes is a confidence that pseudo-labelling can threshold. The logits sit on the patch grid
# like a linear head's, and the Segmenter upsamples them the same way. A class whose prototypes
# are all missing (no labeled pixel) never wins. State dict: `prototypes` (C, k, D) float32 unit
# rows, `valid` (C, k) bool, `temperature` ().

KIND = "prototype"
DEFAULT_TEMPERATURE = 0.05  # cosine gaps of ~0.1 between classes give confident softmaxes
NO_PROTOTYPE = -1e4  # the logit of a class without a prototype: finite, so softmax stays exact


def normalized_features(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """The backbone's maps -> (B, D, h, w) unit vectors along D: what prototypes are made of."""
    return F.normalize(resize_concat(features).float(), dim=1)


def prototype_config(layers: Sequence[int], embed_dim: int, num_classes: int, k: int) -> HeadConfig:
    return HeadConfig(KIND, tuple(int(i) for i in layers), embed_dim, num_classes, extra={"k": int(k)})


class PrototypeHead(nn.Module):
    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        k = int(config.extra.get("k", 1))
        self.register_buffer("prototypes", torch.zeros(config.num_classes, k, config.in_channels))
        self.register_buffer("valid", torch.zeros(config.num_classes, k, dtype=torch.bool))
        self.register_buffer("temperature", torch.tensor(DEFAULT_TEMPERATURE))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        # fp32 even under bf16 autocast: bf16 cosines step by 0.004, and classes 1e-3 apart
        # decide a patch (and its confidence, which pseudo-labels threshold)
        with torch.autocast(features[0].device.type, enabled=False):
            x = normalized_features(features)
            sims = torch.einsum("bdhw,ckd->bckhw", x, self.prototypes.float())
            sims = sims.masked_fill(~self.valid[None, :, :, None, None], -2.0)  # below any cosine
            best = sims.amax(dim=2) / self.temperature.float()
            present = self.valid.any(dim=1)
            return best.masked_fill(~present[None, :, None, None], NO_PROTOTYPE)


def prototype_state(prototypes: torch.Tensor, valid: torch.Tensor, temperature: float | None = None) -> dict:
    """The state dict of a PrototypeHead: prototypes re-normalised, invalid ones zero; temperature
    None: DEFAULT_TEMPERATURE."""
    temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    if not temperature > 0:
        raise WeightsError(f"temperature {temperature} must be positive, e.g. {DEFAULT_TEMPERATURE}.")
    protos = F.normalize(prototypes.float(), dim=-1) * valid[..., None]
    return {
        "prototypes": protos.contiguous(),
        "valid": valid.bool().contiguous(),
        "temperature": torch.tensor(float(temperature)),
    }


def build_head(config: HeadConfig) -> nn.Module:
    if config.kind in ("linear", "ms"):
        return LinearHead(config)
    if config.kind == "conv":
        return ConvHead(config)
    if config.kind == KIND:
        return PrototypeHead(config)
    from .dinotxt import KIND as TEXT
    from .dinotxt import TextHead

    if config.kind == TEXT:
        return TextHead(config)
    raise DinosegError(f"Unknown head type '{config.kind}'; choose one of: {', '.join((*HEAD_TYPES, KIND, TEXT))}.")


def output_classes(state_dict: dict) -> int | None:
    """How many classes a head's weights predict (None: they hold no classifier)."""
    for key in ("conv_seg.weight", "prototypes", "embeddings"):
        if key in state_dict and hasattr(state_dict[key], "shape"):
            return int(state_dict[key].shape[0])
    return None


def head_from_mmseg(checkpoint, kind: str, embed_dim: int, depth: int, what: str) -> nn.Module:
    """A LinearHead holding the weights of one of Meta's released head files (mmseg layout).

    `checkpoint` is what `torch.load` returned: {'state_dict': {'decode_head.conv_seg.weight', ...}}.
    """
    sd = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(sd, dict) or "decode_head.conv_seg.weight" not in sd:
        raise WeightsError(
            f"{what} is not a DINOv2 segmentation head (no 'decode_head.conv_seg.weight'): "
            "pass one of Meta's *_head.pth files or a head trained by dinoseg."
        )
    sd = {k[len("decode_head.") :]: v for k, v in sd.items() if k.startswith("decode_head.")}
    weight = sd["conv_seg.weight"]
    layers = default_layers(kind, depth)
    config = HeadConfig(kind, layers, embed_dim, num_classes=int(weight.shape[0]))
    if weight.dim() != 4 or weight.shape[1] != config.in_channels:
        raise WeightsError(
            f"{what} expects {weight.shape[1]}-channel features but a '{kind}' head on this backbone "
            f"gets {config.in_channels} ({len(layers)} x {embed_dim}): use the head file made for this backbone."
        )
    head = LinearHead(config)
    expected = head.state_dict()
    sd = {k: v for k, v in sd.items() if k in expected}  # mmseg may add conv_seg-less extras
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise WeightsError(f"{what} lacks {', '.join(missing[:3])}: the head file is incomplete or of another kind.")
    head.load_state_dict(sd, strict=True)
    return head
