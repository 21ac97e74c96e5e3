"""Small labeled-pair samples that the pair-step and augmentation tests share."""

from __future__ import annotations

import numpy as np

from model.classes import IGNORE_INDEX as IGNORE
from pipeline.data.schema import ERROR_FIELDS


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def quadrants(h: int, w: int, values=(0, 1, 2, IGNORE)) -> np.ndarray:
    m = np.empty((h, w), np.uint8)
    m[: h // 2, : w // 2], m[: h // 2, w // 2 :], m[h // 2 :, : w // 2], m[h // 2 :, w // 2 :] = values
    return m


def batch(rows: list[tuple[str, str]], **extra) -> dict[str, np.ndarray]:
    """Rows as the training graph builds them: path = image URL, image, mask URLs."""
    n = len(rows)
    b = {
        "path": np.array([r[0] for r in rows], dtype=object),
        "key": np.array([f"k{i}" for i in range(n)], dtype=object),
        "image": np.array([r[0] for r in rows], dtype=object),
        "mask": np.array([r[1] for r in rows], dtype=object),
    }
    b.update({f: np.full(n, "", dtype=object) for f in ERROR_FIELDS})
    b.update(extra)
    return b
