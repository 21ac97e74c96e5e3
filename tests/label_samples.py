"""A `segment`-like OUTPUT for the import tests: masks of odd sizes with unsure pixels, keys with
folders and spaces, real images they belong to, classes.yaml and a predictions Parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from model.classes import ClassMap, save_class_map
from pipeline.io.masks import encode_mask_png

CLASSES = ClassMap(("road", "car", "person"), ((128, 64, 128), (0, 0, 142), (220, 20, 60)))


def masks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    out = {}
    for key, (h, w) in {"city/a": (9, 11), "b": (4, 3), "c c": (20, 30)}.items():
        m = rng.integers(0, 3, (h, w)).astype(np.uint8)
        m[0, :2] = 255  # unsure pixels: no label in the tools, 255 again on the way back
        out[key] = m
    return out


def write_segmented(folder: Path) -> Path:
    """folder/seg (masks/, classes.yaml, predictions/) and the images under folder/images."""
    root = folder / "seg"
    rng = np.random.default_rng(0)
    paths = []
    for key, m in masks().items():
        image = folder / "images" / f"{key}.jpg"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*m.shape, 3), dtype=np.uint8)).save(image)
        paths.append(str(image))
        (root / "masks" / key).parent.mkdir(parents=True, exist_ok=True)
        (root / "masks" / f"{key}.png").write_bytes(encode_mask_png(m, CLASSES))
    save_class_map(CLASSES, str(root / "classes.yaml"))
    (root / "predictions").mkdir()
    table = {
        "path": paths,
        "key": list(masks()),
        "height": [m.shape[0] for m in masks().values()],
        "width": [m.shape[1] for m in masks().values()],
    }
    pq.write_table(pa.table(table), root / "predictions" / "part-0.parquet")
    return root
