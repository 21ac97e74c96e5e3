"""Labeled pairs as batch steps: read and check (image, mask) pairs, resize them to the feature
grid. Shared by training (`pipeline.train`), prototype heads (`pipeline.label.prototypes`) and
the check pass (`pipeline.features.check`); plain callables over numpy-dict batches, a row that
fails keeps flowing with its error fields set:

    {key, image, mask (URLs)} -> ReadPair -> + image_bytes, mask_bytes
        -> DecodePair -> + pixels (h, w, 3) uint8, label (h, w) uint8, width, height

Geometry shared with the feature cache and inference: the short side is resized to the
training resolution (long side capped), then centre-padded to a multiple of 14; the label is
resized with nearest neighbour and padded with 255, so it lines up with the patch grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from model.classes import IGNORE_INDEX, mask_indices
from model.errors import DinosegError
from model.geometry import PATCH_SIZE, centre_pad, resized_size
from pipeline.data.decode import MAX_MEGAPIXELS, DecodeConfig, decode_image
from pipeline.data.schema import (
    ERROR_FIELDS,
    failed,
    object_array,
    set_error,
    with_error_columns,
)
from pipeline.data.sources import ReadBytes
from pipeline.io.masks import decode_mask_png
from pipeline.io.retry import retryable_error

LONG_SIDE_RATIO = 4.0  # the long side is capped at this x the short side (Meta: 2048 for 512)


class ReadPair:
    """+ image_bytes, mask_bytes (rows hold `path` = the image URL, `image`, `mask`). A row with
    `cached` set skips its image: its features are in the cache already.

    Transient read faults are read again (`ReadBytes`). With `fail_reads` (the epochs of a
    training run, whose pairs the check pass read already), a transient read that still fails
    raises instead of dropping the pair: a model is never trained quietly on less than it was given."""

    def __init__(self, storage_options: dict | None = None, fail_reads: bool = False):
        self.read = ReadBytes(storage_options)
        self.fail_reads = fail_reads

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = with_error_columns(batch)
        n = len(out["path"])
        cached = np.asarray(out.get("cached", np.zeros(n, bool)), bool)
        for column, target, skip in (("mask", "mask_bytes", np.zeros(n, bool)), ("image", "image_bytes", cached)):
            rows = np.flatnonzero(~failed(out) & ~skip)
            data = object_array([b""] * n)
            if len(rows):
                part = self.read({"path": np.asarray(out[column])[rows], **{k: out[k][rows] for k in ERROR_FIELDS}})
                for k in ERROR_FIELDS:
                    out[k][rows] = part[k]
                data[rows] = part["bytes"]
            out[target] = data
        if self.fail_reads:
            refuse_unread(out)
        return out


def refuse_unread(batch: dict[str, np.ndarray]) -> None:
    """Raise DinosegError naming the first row of `batch` whose read failed transiently (the
    store, after retries; a file deleted since is the user's change, and stays a row's problem)."""
    for i, stage in enumerate(batch["error_stage"]):
        if stage == "read" and retryable_error(stage, str(batch["error_type"][i])):
            raise DinosegError(
                f"{batch['error_message'][i]} The storage failed while training read its pairs (after retries): "
                "re-run with --resume once it answers, training continues from the last finished epoch."
            )


def decode_label(
    data: bytes,
    num_classes: int,
    max_megapixels: float = MAX_MEGAPIXELS,
    ignore_index: int = IGNORE_INDEX,
    first_id: int = 0,
) -> np.ndarray:
    """An index-mask PNG in the class map's values -> (H, W) uint8 training label, or
    DinosegError naming what is wrong with it.

    Training labels are 8-bit: classes 0..254 and 255 = ignore, so a class map has at most 255
    classes. The map's own values (`ignore_index`, ids from `first_id`: a map whose 0 means
    unlabeled numbers its classes from 1) become those here, once (`model.classes.mask_indices`),
    so every later step knows one ignore value. A 16-bit ('I;16') mask is taken when every value
    is a class or the ignore index and refused otherwise, never truncated. A 1-bit mask ('1') is
    0/1. Read by `decode_mask_png`, the mask reader every command shares."""
    if num_classes > IGNORE_INDEX:
        raise DinosegError(
            f"training supports at most {IGNORE_INDEX} classes (labels are 8-bit: 0..{IGNORE_INDEX - 1}, {IGNORE_INDEX} = ignore) "
            f"and the class map has {num_classes}: pass a class map with at most {IGNORE_INDEX} classes."
        )
    mask = decode_mask_png(data, max_megapixels)  # PNG only, size from the header: one sentence if not
    return mask_indices(mask, num_classes, ignore_index, first_id, IGNORE_INDEX).astype(np.uint8)


def resize_pair(pixels: np.ndarray | None, label: np.ndarray, h: int, w: int):
    """Resize to (h, w): the image bilinearly (antialiased when shrinking), the label nearest."""
    if label.shape != (h, w):
        label = np.asarray(Image.fromarray(label).resize((w, h), Image.Resampling.NEAREST))
    if pixels is not None and pixels.shape[:2] != (h, w):
        pixels = np.asarray(Image.fromarray(pixels).resize((w, h), Image.Resampling.BILINEAR))
    return pixels, label


def pad_label(label: np.ndarray, grid_h: int, grid_w: int, top: int, left: int) -> np.ndarray:
    out = np.full((grid_h * PATCH_SIZE, grid_w * PATCH_SIZE), IGNORE_INDEX, np.uint8)
    out[top : top + label.shape[0], left : left + label.shape[1]] = label
    return out


@dataclass(frozen=True)
class PairConfig:
    num_classes: int
    resolution: int | None = None  # short side to resize to; None keeps the original size
    long_side_ratio: float = LONG_SIDE_RATIO
    max_megapixels: float = MAX_MEGAPIXELS
    keep: bool = True  # False: only check the pair (the row keeps its size, not its pixels)
    ignore_index: int = IGNORE_INDEX  # the class map's mask value of "no label" (decode_label)
    first_id: int = 0  # the class map's first id: 1 when its 0 means unlabeled

    @classmethod
    def of(cls, classes, resolution: int | None = None, **kw) -> "PairConfig":
        """The pair config of a class map: its size and the mask values it gives."""
        return cls(len(classes), resolution, ignore_index=classes.ignore_index, first_id=classes.first_id, **kw)


class DecodePair:
    """- image_bytes, mask_bytes; + pixels, label, width, height (the image's original size).

    A cached row (`cached` set) has no image bytes: its mask is checked against the size in
    `width`/`height` that the cache recorded. Problems -> stage 'decode' (the image) or
    'mask' (the mask: unreadable, not an index mask, a class out of range, another size)."""

    def __init__(self, config: PairConfig):
        self.config = config
        self.decode = DecodeConfig(config.max_megapixels).validate()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = with_error_columns(batch)
        images, masks = out.pop("image_bytes"), out.pop("mask_bytes")
        n = len(images)
        cached = out.get("cached", np.zeros(n, bool))
        widths = np.asarray(out.get("width", np.zeros(n)), np.int64).copy()
        heights = np.asarray(out.get("height", np.zeros(n)), np.int64).copy()
        pixels = [np.zeros((0, 0, 3), np.uint8)] * n
        labels = [np.zeros((0, 0), np.uint8)] * n
        bad = failed(out)
        for i in range(n):
            if bad[i]:
                continue
            try:
                rgb = None
                if not cached[i]:
                    try:
                        rgb, widths[i], heights[i] = decode_image(images[i], self.decode)
                    except DinosegError as e:
                        set_error(out, i, "decode", e)
                        continue
                c = self.config
                label = decode_label(masks[i], c.num_classes, c.max_megapixels, c.ignore_index, c.first_id)
                if label.shape != (heights[i], widths[i]):
                    raise DinosegError(
                        f"the mask is {label.shape[1]}x{label.shape[0]} but its image is {widths[i]}x{heights[i]}: "
                        "masks must have their image's size."
                    )
            except DinosegError as e:
                set_error(out, i, "mask", e)
                continue
            except Exception as e:  # a codec bug costs one row, not the batch
                set_error(out, i, "mask", f"could not read the pair ({type(e).__name__}: {e}).", type(e).__name__)
                continue
            if self.config.keep:
                if self.config.resolution and rgb is not None:
                    r = self.config.resolution
                    rgb, label = resize_pair(
                        rgb, label, *resized_size(*label.shape, r, self.config.long_side_ratio * r)
                    )
                pixels[i], labels[i] = (rgb if rgb is not None else pixels[i]), label
        out["width"], out["height"] = widths, heights
        if self.config.keep:
            out["pixels"], out["label"] = object_array(pixels), object_array(labels)
        return out


def padded_geometry(h: int, w: int) -> tuple[int, int, int, int]:
    """(grid_h, grid_w, top, left) of an image of h x w centre-padded to whole patches."""
    top, bottom, left, right = centre_pad(h, w, PATCH_SIZE)
    return (h + top + bottom) // PATCH_SIZE, (w + left + right) // PATCH_SIZE, top, left
