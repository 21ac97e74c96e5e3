"""Points instead of masks: a few clicks per class become sparse index masks (255 elsewhere).

A point file is CSV with the columns `image,x,y,class`, or JSON: a list of
`{"image", "x", "y", "class"}` objects (or `{"points": [...]}`). `image` names an image under
IMAGES by its key (`a/b`), its relative path (`a/b.jpg`) or its full URL; `x, y` are pixels of
the image as it is shown (after its EXIF rotation), from the top-left corner; `class` is a class
name of the class map or its index. Each point becomes a disc of `radius` pixels; where discs of
two classes overlap, the pixels are 255 (unsure), never one class's by the order of the file.

`is_point_file(url)` tells a point file from a folder of masks or an image,mask manifest, so
every command that takes MASKS takes a point file there too (`prototypes`, `train`).
"""

from __future__ import annotations

import io
import json
import logging
import os

import numpy as np

from model.classes import IGNORE_INDEX, ClassMap
from model.errors import DinosegError
from model.geometry import PATCH_SIZE
from model.storage import options_for
from pipeline.data.decode import MAX_MEGAPIXELS, DecodeConfig, decode_image
from pipeline.data.keys import extension
from pipeline.data.pairs import Pairs, list_pairs, problem
from pipeline.data.sources import ReadBytes, list_inputs
from pipeline.io.files import write_bytes_atomic
from pipeline.io.masks import encode_mask_png

log = logging.getLogger("dinoseg.points")

POINT_COLUMNS = ("image", "x", "y", "class")
DEFAULT_RADIUS = 6  # pixels: a click covers about a patch at the training resolution


def is_point_file(url: str | None, storage_options: dict | None = None) -> bool:
    """A .json file, or a .csv whose header has x, y and class (an image,mask manifest has not)."""
    if not url or extension(url) not in ("csv", "json"):
        return False
    if extension(url) == "json":
        return True
    import fsspec

    try:
        with fsspec.open(url, "rt", **options_for(url, storage_options)) as f:
            header = f.readline()
    except (OSError, ValueError):
        return False
    return {"x", "y", "class"} <= {c.strip().strip('"') for c in header.strip().split(",")}


def read_points(url: str, storage_options: dict | None = None) -> list[dict]:
    """The point file's rows as {image, x, y, class}; DinosegError naming a bad file or row."""
    import fsspec

    try:
        with fsspec.open(url, "rb", **options_for(url, storage_options)) as f:
            data = f.read()
    except FileNotFoundError:
        raise DinosegError(f"the point file '{url}' does not exist: check the path.") from None
    try:
        if extension(url) == "json":
            rows = json.loads(data)
            rows = rows.get("points") if isinstance(rows, dict) else rows
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise ValueError("expected a list of {image, x, y, class} objects")
        else:
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(
                io.BytesIO(data),
                convert_options=pacsv.ConvertOptions(column_types={"image": "string", "class": "string"}),
            )
            rows = table.to_pylist()
    except Exception as e:
        raise DinosegError(
            f"cannot read the point file '{url}' ({type(e).__name__}: {e}): give CSV with image,x,y,class "
            'columns, or JSON [{"image": ..., "x": ..., "y": ..., "class": ...}].'
        ) from None
    out = []
    for i, r in enumerate(rows):
        missing = [c for c in POINT_COLUMNS if r.get(c) in (None, "")]
        if missing:
            raise DinosegError(f"point {i + 1} of '{url}' has no {', '.join(missing)}: give image, x, y and class.")
        try:
            x, y = float(r["x"]), float(r["y"])
        except (TypeError, ValueError):
            raise DinosegError(
                f"point {i + 1} of '{url}' has x={r['x']!r}, y={r['y']!r}: give pixel numbers."
            ) from None
        out.append({"image": str(r["image"]), "x": x, "y": y, "class": str(r["class"])})
    if not out:
        raise DinosegError(f"the point file '{url}' holds no points: add at least one per class.")
    return out


def class_index(name: str, classes: ClassMap) -> int | None:
    if name in classes.names:
        return classes.names.index(name)
    if name.isdigit() and int(name) < len(classes):
        return int(name)
    return None


def draw_points(height: int, width: int, points: list[tuple[float, float, int]], radius: float) -> np.ndarray:
    """(H, W) uint8: 255, with a disc of `radius` pixels of class c around every (x, y, c); pixels
    two classes' discs claim are 255."""
    mask = np.full((height, width), IGNORE_INDEX, np.uint8)
    claimed = np.zeros((height, width), bool)
    conflict = np.zeros((height, width), bool)
    r = max(float(radius), 0.5)
    for x, y, c in points:
        y0, y1 = max(0, int(np.floor(y - r))), min(height, int(np.ceil(y + r)) + 1)
        x0, x1 = max(0, int(np.floor(x - r))), min(width, int(np.ceil(x + r)) + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        disc = (yy + 0.5 - y) ** 2 + (xx + 0.5 - x) ** 2 <= r * r
        if not disc.any():  # a radius under a pixel still marks the pixel clicked
            disc[min(int(y), y1 - 1) - y0, min(int(x), x1 - 1) - x0] = True
        window = mask[y0:y1, x0:x1]
        other = claimed[y0:y1, x0:x1] & (window != c) & disc
        conflict[y0:y1, x0:x1] |= other
        window[disc] = c
        claimed[y0:y1, x0:x1] |= disc
    mask[conflict] = IGNORE_INDEX
    return mask


def points_to_pairs(
    images: str,
    points_url: str,
    classes: ClassMap,
    folder: str,
    storage_options: dict | None = None,
    radius: float = DEFAULT_RADIUS,
    max_megapixels: float = MAX_MEGAPIXELS,
) -> Pairs:
    """Draw the point file's sparse masks as `folder/<key>.png` and return the (image, mask)
    pairs of the images that have points; points naming an unknown image or class, or lying
    outside their image, are the pairs' problems (reported, left out)."""
    so = storage_options or None
    listed = {}
    for row in list_inputs(images, so):
        if not row["error_stage"]:
            listed[row["key"]] = row["path"]
    by_name = {}
    for key, url in listed.items():
        by_name.update({key: key, url: key, key + os.path.splitext(url)[1]: key})
    out, grouped = Pairs(), {}
    for p in read_points(points_url, so):
        ref = p["image"].replace("\\", "/").removeprefix("./") if "://" not in p["image"] else p["image"]
        key = by_name.get(p["image"]) or by_name.get(ref)
        c = class_index(p["class"], classes)
        if key is None:
            out.problems.append(
                problem(p["image"], p["image"], points_url, "points", f"no image '{p['image']}' under {images}.")
            )
        elif c is None:
            out.problems.append(
                problem(key, listed[key], points_url, "points", f"class '{p['class']}' is not in the class map.")
            )
        else:
            grouped.setdefault(key, []).append((p["x"], p["y"], c))
    # only the displayed size is needed: JPEGs decode at 1/8 (the size returned is the original's)
    read, decode = ReadBytes(so), DecodeConfig(max_megapixels, shrink_to=PATCH_SIZE).validate()
    for key in sorted(grouped):
        url = listed[key]
        batch = read({"path": np.asarray([url], dtype=object)})
        try:
            if batch["error_stage"][0]:
                raise DinosegError(str(batch["error_message"][0]))
            _, width, height = decode_image(batch["bytes"][0], decode)
        except DinosegError as e:
            out.problems.append(problem(key, url, points_url, "decode", str(e)))
            continue
        inside = [(x, y, c) for x, y, c in grouped[key] if 0 <= x < width and 0 <= y < height]
        if len(inside) < len(grouped[key]):
            out.problems.append(
                problem(
                    key,
                    url,
                    points_url,
                    "points",
                    f"{len(grouped[key]) - len(inside)} points lie outside the {width}x{height} image.",
                )
            )
        if not inside:
            continue
        mask_url = f"{folder.rstrip('/')}/{key}.png"
        drawn = draw_points(height, width, inside, radius)
        # in the class map's own values, as the masks of a folder are: training reads both alike
        drawn = np.where(drawn == IGNORE_INDEX, classes.ignore_index, drawn.astype(np.int64) + classes.first_id)
        write_bytes_atomic(mask_url, encode_mask_png(drawn, classes), so)
        out.add(key, url, mask_url)
    if not len(out):
        raise DinosegError(
            f"no point of '{points_url}' lands on an image under {images} "
            f"({len(out.problems)} problems, e.g. {out.problems[0]['message'] if out.problems else 'none'})."
        )
    log.info("%d images with points -> sparse masks in %s", len(out), folder)
    return out


def labeled_pairs(
    images: str,
    masks: str | None,
    classes: ClassMap,
    folder: str,
    storage_options: dict | None = None,
    max_megapixels: float = MAX_MEGAPIXELS,
    radius: float = DEFAULT_RADIUS,
    what: str = "training",
) -> Pairs:
    """The pairs of IMAGES and MASKS, where MASKS is a folder, None (a manifest), or a point file,
    whose sparse masks are drawn under `folder` first: what every command taking MASKS calls."""
    if is_point_file(masks, storage_options):
        return points_to_pairs(images, masks, classes, folder, storage_options, radius, max_megapixels)
    return list_pairs(images, masks, storage_options, what=what)
