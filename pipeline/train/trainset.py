"""Training augmentation without the feature cache: mmseg's random rescale, crop, flip and
photometric jitter over decoded pairs (`pipeline.features.pairs`).

    pairs -> ReadPair -> DecodePair -> AugmentPairs -> fixed-size crops
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.classes import IGNORE_INDEX
from model.geometry import IMAGENET_MEAN, PATCH_SIZE, resized_size
from pipeline.data.schema import failed
from pipeline.features.pairs import resize_pair

# ImageNet mean as uint8: padding an image with it is padding the normalised image with 0
MEAN_RGB = tuple(round(255 * m) for m in IMAGENET_MEAN)


@dataclass(frozen=True)
class AugmentConfig:
    """mmseg's recipe: random rescale around the training resolution, random crop, flip,
    photometric jitter. `crop` is rounded to whole patches."""

    crop: int = 518
    resolution: int = 512
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    jitter: bool = True
    seed: int | None = None

    @property
    def crop_px(self) -> int:
        return max(1, round(self.crop / PATCH_SIZE)) * PATCH_SIZE


class AugmentPairs:
    """{pixels, label} of any size -> fixed (crop, crop) `pixels` and `label`; failed rows dropped."""

    def __init__(self, config: AugmentConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = np.flatnonzero(~failed(batch)) if "error_stage" in batch else np.arange(len(batch["label"]))
        c = self.config.crop_px
        pixels = np.empty((len(keep), c, c, 3), np.uint8)
        labels = np.empty((len(keep), c, c), np.uint8)
        for j, i in enumerate(keep):
            pixels[j], labels[j] = self.augment(batch["pixels"][i], batch["label"][i])
        return {"key": np.asarray(batch["key"])[keep], "pixels": pixels, "label": labels}

    def augment(self, rgb: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cfg, rng, c = self.config, self.rng, self.config.crop_px
        short = cfg.resolution * rng.uniform(*cfg.scale_range)
        h, w = resized_size(*label.shape, short, 4 * short)
        rgb, label = resize_pair(rgb, label, h, w)
        ph, pw = max(c - h, 0), max(c - w, 0)
        if ph or pw:  # smaller than the crop: pad (mean colour / ignore), as mmseg's Pad does
            rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)))
            rgb[h:, :] = MEAN_RGB
            rgb[:, w:] = MEAN_RGB
            label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
        y = int(rng.integers(0, label.shape[0] - c + 1))
        x = int(rng.integers(0, label.shape[1] - c + 1))
        rgb, label = rgb[y : y + c, x : x + c], label[y : y + c, x : x + c]
        if cfg.flip and rng.random() < 0.5:
            rgb, label = rgb[:, ::-1], label[:, ::-1]
        if cfg.jitter:
            rgb = photometric(rgb, rng)
        return rgb, label


def photometric(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness (+-32), contrast and saturation (x0.5..1.5), each with probability 1/2."""
    x = rgb.astype(np.float32)
    if rng.random() < 0.5:
        x += rng.uniform(-32, 32)
    if rng.random() < 0.5:
        x = (x - x.mean()) * rng.uniform(0.5, 1.5) + x.mean()
    if rng.random() < 0.5:
        grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
        x = grey[..., None] + (x - grey[..., None]) * rng.uniform(0.5, 1.5)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
