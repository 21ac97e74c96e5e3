"""The steps of the discover pass: decode and resize (CPU tasks), then a seeded sample of unit
patch features per image on the feature actors (`pipeline.features.cache.ComputeFeatures`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from model.geometry import PATCH_SIZE, resized_size
from pipeline.data.schema import failed, object_array
from pipeline.features.pairs import LONG_SIDE_RATIO
from pipeline.label.accumulate import unit_rows


def sample_rank(seed: int, key: str) -> str:
    """A key's place in the seeded sample: the same seed samples the same images."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


@dataclass(frozen=True)
class SampleConfig:
    features: object  # pipeline.features.cache.FeatureConfig
    patches: int
    seed: int


class DecodeResized:
    """{path, bytes} -> + pixels (resized to the short side `resolution`), width, height."""

    def __init__(self, resolution: int, max_megapixels: float):
        from pipeline.data.decode import Decode, DecodeConfig

        self.resolution = resolution
        self.decode = Decode(DecodeConfig(max_megapixels))

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        out = self.decode(batch)
        images = out.pop("image")
        pixels = []
        for i, rgb in enumerate(images):
            if failed(out)[i]:
                pixels.append(np.zeros((0, 0, 3), np.uint8))
                continue
            h, w = resized_size(*rgb.shape[:2], self.resolution, LONG_SIDE_RATIO * self.resolution)
            if (h, w) != rgb.shape[:2]:
                rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))
            pixels.append(rgb)
        out["pixels"] = object_array(pixels)
        return out


class SampleFeatures:
    """Actor: rows with pixels -> + `sample` (n, D) float16 unit features of n random patches
    inside the image, seeded by the key; rows flagged `sheet` keep their whole grid as `features`."""

    def __init__(self, config: SampleConfig):
        from pipeline.features.cache import ComputeFeatures

        self.config = config
        self.compute = ComputeFeatures(config.features)

    def __call__(self, batch: dict) -> dict:
        out = self.compute(batch)
        samples = []
        for i, data in enumerate(out["features"]):
            if not len(data):
                samples.append(b"")
                continue
            c, gh, gw = (int(out[k][i]) for k in ("channels", "grid_h", "grid_w"))
            f = np.frombuffer(data, np.float16).reshape(c, gh, gw)
            cells = inside_cells(out, i)
            rng = np.random.default_rng(int(sample_rank(self.config.seed, str(out["key"][i]))[:12], 16))
            take = rng.choice(cells, size=min(self.config.patches, len(cells)), replace=False)
            samples.append(unit_rows(f.reshape(c, -1)[:, take].T).astype(np.float16).tobytes())
            if not out["sheet"][i]:
                out["features"][i] = b""
        out["sample"] = object_array(samples)
        return out


def inside_cells(row: dict, i: int) -> np.ndarray:
    """Flat indices of the grid cells whose centre lies on the image, not on its padding."""
    gh, gw = int(row["grid_h"][i]), int(row["grid_w"][i])
    top, left, rh, rw = (int(row[k][i]) for k in ("pad_top", "pad_left", "resized_h", "resized_w"))
    centres_y = np.arange(gh) * PATCH_SIZE + PATCH_SIZE / 2 - top
    centres_x = np.arange(gw) * PATCH_SIZE + PATCH_SIZE / 2 - left
    ok = ((centres_y >= 0) & (centres_y < rh))[:, None] & ((centres_x >= 0) & (centres_x < rw))[None, :]
    return np.flatnonzero(ok)


RESULT_COLUMNS = (
    "key",
    "path",
    "sheet",
    "sample",
    "features",
    "channels",
    "grid_h",
    "grid_w",
    "pad_top",
    "pad_left",
    "resized_h",
    "resized_w",
    "error_stage",
    "error_message",
)


def results(batch: dict) -> dict:
    """The columns the driver collects (the images' pixels stay behind)."""
    return {k: batch[k] for k in RESULT_COLUMNS}
