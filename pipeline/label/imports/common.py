"""What every import format reduces to: per image, its reference and the shapes drawn on it,
and the one rule that turns shapes into an index mask.

A reader (coco, cvat, labelstudio) yields `Record`s and names the labels it saw; it knows its
format and nothing about masks on disk. `compose` paints a record's shapes into a mask of class
indices, 255 (the ignore index) where nothing was labeled, and says what it could not use.

Overlaps. Two shapes of different classes may claim a pixel (a COCO file with overlapping
objects; a Label Studio stroke of one label painted over another's). The rule is stated, never
silent: `smaller` (the smaller shape wins: it is usually the object on top, a cup on a table),
`later` (the shape drawn later wins: the annotator's last word), or `unsure` (the pixel becomes
255). Crowd regions (COCO `iscrowd`) lie beneath every other shape, or are left out with
`crowd=ignore`. Each image's problems count the pixels that were decided by the rule.
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass, field
from typing import Callable, Optional

import fsspec
import numpy as np
from fsspec.core import split_protocol

from model.classes import ClassMap
from model.errors import DinosegError
from pipeline.data.keys import key_from_parts, split_url
from pipeline.io.masks import MAX_MEGAPIXELS

OVERLAPS = ("smaller", "later", "unsure")
CROWDS = ("class", "ignore")
MAX_PIXELS = int(MAX_MEGAPIXELS * 1e6)  # a mask beyond it is refused from its header or size, before allocation


@dataclass
class Shape:
    label: str | int  # the tool's label name, or a class index (COCO's --match id)
    pixels: Callable[[int, int], np.ndarray]  # (height, width) -> bool mask; raises ValueError when malformed
    crowd: bool = False


@dataclass
class Record:
    """One image of an export. `name` is the reference as the export writes it (file_name,
    task image, mask file name); `key` is set where the export names it (our own exports carry
    it); `labels` is a decoded label-name mask for formats that store rasters (CVAT)."""

    name: str
    image: Optional[str] = None  # the image's URL, where it is known
    key: Optional[str] = None
    size: Optional[tuple[int, int]] = None  # (height, width)
    shapes: list[Shape] = field(default_factory=list)
    raster: Optional[Callable[[ClassMap], tuple[np.ndarray, list[str]]]] = None  # -> (mask, problems)
    skip: Optional[tuple[str, str]] = None  # (reason, message): an image the export holds no labels for
    notes: list[str] = field(default_factory=list)  # what the reader could not use (a broken shape...)


def join(root: str, *parts: str) -> str:
    """A path under `root` in the source's filesystem (the top of a zip is '')."""
    return "/".join([root.rstrip("/"), *parts]) if root else "/".join(parts)


def key_of(reference: str, root: Optional[str] = None) -> str:
    """A record's key by `segment`'s rules: the reference relative to `root` (when it lies under
    it), else the reference's own path without its scheme and host, '/'-separated, no extension."""
    if root:
        r_protocol, r_parts = split_url(root)
        protocol, parts = split_url(reference)
        if protocol == r_protocol and parts[: len(r_parts)] == r_parts and len(parts) > len(r_parts):
            return key_from_parts(parts[len(r_parts) :], reference)
    protocol, path = split_protocol(reference)
    if protocol in ("http", "https", "s3", "gs", "gcs", "az", "abfs") and "/" in path:
        path = path.split("/", 1)[1]  # the host or bucket is not part of the key
    _, parts = split_url(path)
    return key_from_parts(parts, reference)


def resolve_image(reference: str, root: Optional[str]) -> Optional[str]:
    """An image reference as a URL fsspec opens: absolute ones as they are, relative ones under
    `root` (None when there is no root to put them under)."""
    if split_protocol(reference)[0] or reference.startswith("/"):
        return reference
    if not root:
        return None
    return posixpath.join(root.rstrip("/"), reference)


def image_size(url: str, storage_options: dict | None) -> tuple[int, int]:
    """(height, width) from the image's header (a few KB read, not the pixels)."""
    from PIL import Image

    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        head = f.read(1 << 16)
        try:
            with Image.open(io.BytesIO(head)) as im:
                return im.height, im.width
        except Exception:  # a header past the first 64 KiB (big EXIF blocks): read it whole
            rest = f.read()
    with Image.open(io.BytesIO(head + rest)) as im:
        return im.height, im.width


def class_lookup(classes: ClassMap) -> dict[str, int]:
    return {name: i for i, name in enumerate(classes.names)}


def _class_of(label: str | int, lookup: dict[str, int], n: int) -> Optional[int]:
    """A label name's class, or a class index as it is (COCO's --match id) when there is one."""
    if isinstance(label, int):
        return label if 0 <= label < n else None
    return lookup.get(label)


def compose(
    record: Record, classes: ClassMap, size: tuple[int, int], overlap: str = "smaller", crowd: str = "class"
) -> tuple[np.ndarray, list[str]]:
    """(index mask, problems) of a record's shapes at `size`; ignore_index where nothing was drawn."""
    if overlap not in OVERLAPS:
        raise DinosegError(f"unknown overlap rule '{overlap}': use one of {', '.join(OVERLAPS)}.")
    h, w = size
    ignore = classes.ignore_index
    dtype = np.uint8 if len(classes) <= 256 and ignore < 256 else np.uint16
    lookup = class_lookup(classes)
    problems: list[str] = []
    unknown: dict[str, int] = {}
    painted = []  # (class, bool mask, area, crowd, order)
    for order, shape in enumerate(record.shapes):
        if shape.crowd and crowd == "ignore":
            continue
        try:
            pixels = shape.pixels(h, w)
        except (ValueError, TypeError, KeyError, IndexError) as e:
            problems.append(f"a '{shape.label}' shape is malformed and was left out ({e})")
            continue
        cls = _class_of(shape.label, lookup, len(classes))
        if cls is None:
            unknown[str(shape.label)] = unknown.get(str(shape.label), 0) + int(pixels.sum())
            continue
        painted.append((cls, pixels, int(pixels.sum()), shape.crowd, order))
    for label, n in unknown.items():
        problems.append(
            f"label '{label}' is not in the class map: its {n} pixels are left unlabeled (add it to --classes)"
        )
    mask = np.full((h, w), ignore, dtype=dtype)
    if overlap == "smaller":
        painted.sort(key=lambda p: (not p[3], -p[2], p[4]))  # crowds first, then big to small
    else:
        painted.sort(key=lambda p: (not p[3], p[4]))  # crowds first, then in drawing order
    owner = np.full((h, w), -1, dtype=np.int32)  # the class painted last at each pixel
    under_crowd = np.zeros((h, w), dtype=bool)  # ... and whether a crowd region painted it
    contested = np.zeros((h, w), dtype=bool)
    for cls, pixels, _, is_crowd, _ in painted:
        # a shape over a crowd region is no conflict: crowds lie beneath by the rule
        contested |= pixels & (owner >= 0) & (owner != cls) & (is_crowd | ~under_crowd)
        mask[pixels] = cls
        owner[pixels] = cls
        under_crowd[pixels] = is_crowd
    if contested.any():
        n = int(contested.sum())
        if overlap == "unsure":
            mask[contested] = ignore
            problems.append(f"{n} pixels claimed by shapes of different classes are left unlabeled (--overlap unsure)")
        else:
            problems.append(f"{n} pixels claimed by shapes of different classes went to the {overlap} shape")
    return mask, problems
