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

import numpy as np
from fsspec.core import split_protocol

from model.classes import ClassMap
from model.errors import DinosegError
from model.storage import options_for
from pipeline.data.keys import key_from_parts, split_url
from pipeline.io.masks import MAX_MEGAPIXELS

OVERLAPS = ("smaller", "later", "unsure")
CROWDS = ("class", "ignore")
MAX_MEMBER_BYTES = 1 << 29  # 512 MiB: a mask or image file beyond it is not read (an archive's bomb)
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
    """(height, width) of the image at `url` from its header (a few KB read, not the pixels),
    after its EXIF orientation, as `segment` sees the image (so as the mask must be)."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url, **options_for(url, storage_options))
    return file_image_size(fs, path)


def file_image_size(fs, path: str) -> tuple[int, int]:
    """`image_size` of a file in a filesystem (an export's folder or archive)."""
    with fs.open(path, "rb") as f:
        head = f.read(1 << 16)
        try:
            return header_size(head)
        except Exception:  # a header past the first 64 KiB (big EXIF blocks): read it whole
            rest = f.read()
    return header_size(head + rest)


def header_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        turned = im.getexif().get(0x0112) in (5, 6, 7, 8)  # orientations that swap width and height
    return (w, h) if turned else (h, w)


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
    """(index mask, problems) of a record's shapes at `size`; ignore_index where nothing was drawn.

    One shape's pixels are held at a time, each drawn once; `smaller` measures every shape first
    and draws it again in order (a shape is cheap to draw again; 300 full-size masks at once would
    not be)."""
    if overlap not in OVERLAPS:
        raise DinosegError(f"unknown overlap rule '{overlap}': use one of {', '.join(OVERLAPS)}.")
    h, w = size
    ignore = classes.ignore_index
    lookup = class_lookup(classes)
    problems: list[str] = []
    unknown: dict[str, int] = {}

    def usable(shape: Shape) -> Optional[tuple[int, np.ndarray]]:
        """(class, pixels) of a shape to paint; a malformed or unknown one is noted instead."""
        pixels = _draw(shape, h, w, problems)
        if pixels is None:
            return None
        cls = _class_of(shape.label, lookup, len(classes))
        if cls is None:
            unknown[str(shape.label)] = unknown.get(str(shape.label), 0) + int(pixels.sum())
            return None
        return cls, pixels

    # crowds first; then in drawing order, or for `smaller` big to small (measured in a first pass)
    shapes = sorted(
        (s for s in record.shapes if not (s.crowd and crowd == "ignore")),
        key=lambda s: not s.crowd,  # sorted() is stable: drawing order within each group
    )
    if overlap == "smaller":
        measured = []  # (shape, class, area): the pixels are let go as soon as they are counted
        for s in shapes:
            if (u := usable(s)) is not None:
                measured.append((s, u[0], int(u[1].sum())))
        measured.sort(key=lambda m: (not m[0].crowd, -m[2]))
        painting = ((s, (cls, _draw(s, h, w, []))) for s, cls, _ in measured)
    else:
        painting = ((s, usable(s)) for s in shapes)
    mask = np.full((h, w), ignore, dtype=np.uint8 if len(classes) <= 256 and ignore < 256 else np.uint16)
    owner = np.full((h, w), -1, dtype=np.int32)  # the class painted last at each pixel
    under_crowd = np.zeros((h, w), dtype=bool)  # ... and whether a crowd region painted it
    contested = np.zeros((h, w), dtype=bool)  # claimed by two shapes of different classes
    for shape, paint in painting:
        if paint is None:
            continue
        cls, pixels = paint
        clash = pixels & (owner >= 0) & (owner != cls)
        if shape.crowd:
            contested |= clash
        else:  # a shape over a crowd region is no conflict: crowds lie beneath by the rule
            contested &= ~pixels | ~under_crowd  # nor is an older clash of crowds it now covers
            contested |= clash & ~under_crowd
        mask[pixels] = cls
        owner[pixels] = cls
        under_crowd[pixels] = shape.crowd
    for label, n in unknown.items():
        problems.append(
            f"label '{label}' is not in the class map: its {n} pixels are left unlabeled (add it to --classes)"
        )
    if contested.any():
        n = int(contested.sum())
        if overlap == "unsure":
            mask[contested] = ignore
            problems.append(f"{n} pixels claimed by shapes of different classes are left unlabeled (--overlap unsure)")
        else:
            problems.append(f"{n} pixels claimed by shapes of different classes went to the {overlap} shape")
    return mask, problems


def _draw(shape: Shape, h: int, w: int, problems: list[str]) -> Optional[np.ndarray]:
    try:
        pixels = shape.pixels(h, w)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        problems.append(f"a '{shape.label}' shape is malformed and was left out ({e})")
        return None
    if pixels.shape != (h, w):
        problems.append(
            f"a '{shape.label}' shape is {pixels.shape[1]}x{pixels.shape[0]}, not {w}x{h}, and was left out"
        )
        return None
    return pixels


def polygon_pixels(polygons: list[list[float]], h: int, w: int) -> np.ndarray:
    """The (h, w) bool mask of polygons in pixel coordinates ([x0, y0, x1, y1, ...] each), drawn
    by pycocotools as COCO's tools draw them. Coordinates must be finite and near the image
    (within one image size of it): pycocotools allocates by the coordinates' extent, so one
    absurd point would cost gigabytes or crash the process."""
    from pycocotools import mask as coco_mask

    checked = []
    for p in polygons:
        xy = np.asarray(p, dtype=np.float64)  # ValueError for anything that is not numbers
        if xy.ndim != 1 or xy.size < 6 or xy.size % 2:
            raise ValueError("a polygon needs an even number of coordinates, at least 6")
        x, y = xy[0::2], xy[1::2]
        if not (
            np.isfinite(xy).all() and (-w <= x).all() and (x <= 2 * w).all() and (-h <= y).all() and (y <= 2 * h).all()
        ):
            raise ValueError(f"a polygon point lies far outside the {w}x{h} image (or is not a number)")
        checked.append(xy.tolist())
    if not checked:
        raise ValueError("no polygon")
    # a 4-number list would be read as a box: every polygon here has 6 numbers at least
    return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(checked, h, w))).astype(bool)
