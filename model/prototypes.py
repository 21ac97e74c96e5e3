"""Prototype heads: nearest-prototype segmentation on DINOv2 patch features, no training.

Each class holds up to k unit vectors in feature space (its prototypes: the mean of its
normalised patch features for k=1, k-means centroids for k>1). A patch's logit for a class is
the cosine similarity of its normalised feature to the class's best prototype, divided by a
temperature, so the softmax over classes is a confidence that pseudo-labelling can threshold.
The logits sit on the patch grid like a linear head's, and the Segmenter upsamples them the
same way. A class whose prototypes are all missing (no labeled pixel) never wins.

State dict: `prototypes` (C, k, D) float32 unit rows, `valid` (C, k) bool, `temperature` ().
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import WeightsError
from .heads import HeadConfig, resize_concat

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
        x = normalized_features(features)  # fp32: cosines of 1e-3 apart decide a patch
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
