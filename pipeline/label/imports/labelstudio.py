"""Label Studio's JSON export: a list of tasks, each with `data` (the image reference under the
Image tag's field), `annotations` (each a list of `result`s) and `predictions`.

Which annotation. Of a task's annotations that were not cancelled, a ground-truth one wins,
else the one updated last (then created last, then the highest id). Predictions are used only
with `predictions=True`, and only for tasks that have no such annotation.

Results. `brushlabels` (Label Studio's brush RLE: an RGBA image, on where alpha >= 128),
`polygonlabels` (points in percent of the image) and `rectanglelabels` (percent, rotated about
the top-left corner) are drawn, at `original_width` x `original_height`; other result types
(keypoints, choices...) are reported per task and left out.

Image references. `/data/upload/<project>/<hash>-<name>` (an uploaded file: Label Studio puts
an 8-character hash before the name) and `/data/local-files/?d=<path>` are named by <name> or
<path> under `images` (the folder that holds the uploads, or the local storage's root); URLs
(s3://, gs://, http://...) and absolute paths are used as they are. Our own exports carry the
key in `data.key`.
"""

from __future__ import annotations

import json
import math
import re
from typing import Iterator, Optional
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np

from model.errors import DinosegError
from pipeline.label.imports.common import Record, Shape, key_of, polygon_pixels, resolve_image

DRAWN = ("brushlabels", "polygonlabels", "rectanglelabels")
_UPLOAD = re.compile(r"^/data/upload/\d+/(?:[0-9a-f]{8}-)?(?P<name>.+)$")


def read_labelstudio(
    fs, path: str, images_root: Optional[str], predictions: bool = False, image_field: Optional[str] = None
) -> tuple[list[str], Iterator[Record]]:
    """(label names in order of first use, records) of a Label Studio JSON export."""
    try:
        with fs.open(path, "rb") as f:
            tasks = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DinosegError(f"'{path}' is not valid JSON ({e}): export the project as 'JSON' in Label Studio.") from None
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and isinstance(t.get("data"), dict) for t in tasks):
        raise DinosegError(
            f"'{path}' is not a Label Studio JSON export (a list of tasks with 'data'): export the project as 'JSON'."
        )
    labels: dict[str, None] = {}
    for task in tasks:
        for source in (_list(task.get("annotations")), _list(task.get("predictions"))):
            for entry in source:
                for r in _list(entry.get("result")) if isinstance(entry, dict) else []:
                    for name in _labels(r):
                        labels.setdefault(name)
    return list(labels), _records(tasks, images_root, predictions, image_field)


def _list(value) -> list:
    """A list field of the export, or [] where the file holds something else."""
    return value if isinstance(value, list) else []


def _labels(result: dict) -> list[str]:
    value = result.get("value") if isinstance(result, dict) else None
    if not isinstance(value, dict):
        return []
    kind = result.get("type")
    names = (value.get(kind) if isinstance(kind, str) else None) or value.get("labels") or []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def _records(
    tasks: list[dict], images_root: Optional[str], predictions: bool, image_field: Optional[str]
) -> Iterator[Record]:
    for task in tasks:
        data = task["data"]
        reference = _reference(data, image_field)
        tid = task.get("id", "?")
        if reference is None:
            yield Record(
                name=f"task {tid}", skip=("no image", f"task {tid} has no image reference in its data ({sorted(data)})")
            )
            continue
        record = Record(name=reference)
        try:
            record.image, record.key = _locate(reference, images_root)
        except (DinosegError, ValueError) as e:  # unsafe names; URLs urllib cannot parse
            record.skip = ("bad reference", f"task {tid}: {e}")
            yield record
            continue
        if isinstance(data.get("key"), str) and data["key"]:
            record.key = data["key"]  # our own export says which key it came from
        chosen = choose_annotation(_list(task.get("annotations")))
        if chosen is None and predictions:
            chosen = _latest(_list(task.get("predictions")))
        if chosen is None:
            why = "all annotations were cancelled" if task.get("annotations") else "not annotated"
            if task.get("predictions") and not predictions:
                why += " (it has predictions: --predictions imports them)"
            record.skip = ("not annotated", f"task {tid} ('{reference}'): {why}")
            yield record
            continue
        for result in _list(chosen.get("result")):
            _add(record, result, tid)
        yield record


def _reference(data: dict, field: Optional[str]) -> Optional[str]:
    if field:
        value = data.get(field)
        return value if isinstance(value, str) and value else None
    if isinstance(data.get("image"), str):
        return data["image"]
    candidates = [v for k, v in data.items() if k != "key" and isinstance(v, str) and ("/" in v or "." in v)]
    return candidates[0] if len(candidates) == 1 else None


def _locate(reference: str, images_root: Optional[str]) -> tuple[Optional[str], str]:
    """(image URL or None when it needs --images, key) of a task's image reference."""
    parsed = urlparse(reference)
    if parsed.path.startswith("/data/local-files"):
        rel = unquote((parse_qs(parsed.query).get("d") or [""])[0]).lstrip("/")
        if not rel:
            raise DinosegError(f"'{reference}' names no file (no ?d=)")
        return resolve_image(rel, images_root), key_of(rel)
    m = _UPLOAD.match(parsed.path)
    if m and parsed.scheme in ("", "http", "https"):
        name = unquote(m.group("name"))
        image = resolve_image(name, images_root) if images_root or not parsed.scheme else reference
        return image, key_of(name)
    if parsed.scheme or reference.startswith("/"):
        return reference, key_of(reference, images_root)
    return resolve_image(reference, images_root), key_of(reference)


def choose_annotation(annotations: list) -> Optional[dict]:
    """The annotation a task is imported from (see the module docstring), or None."""
    usable = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
    truth = [a for a in usable if a.get("ground_truth")]
    return _latest(truth or usable)


def _latest(entries: list) -> Optional[dict]:
    entries = [e for e in entries if isinstance(e, dict)]
    if not entries:
        return None
    return max(
        entries, key=lambda e: (str(e.get("updated_at") or ""), str(e.get("created_at") or ""), _int(e.get("id")))
    )


def _int(v) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return -1


def _add(record: Record, result: dict, tid) -> None:
    kind = result.get("type") if isinstance(result, dict) else None
    if not isinstance(kind, str) or kind not in DRAWN or not isinstance(result.get("value"), dict):
        record.notes.append(f"task {tid}: a '{kind}' result is not a region and was left out")
        return
    names = _labels(result)
    if len(names) != 1:
        record.notes.append(f"task {tid}: a {kind} result has {len(names)} labels, not one, and was left out")
        return
    try:
        size = (int(result["original_height"]), int(result["original_width"]))
    except (KeyError, TypeError, ValueError):
        record.notes.append(f"task {tid}: a {kind} result has no original_width/height and was left out")
        return
    if record.size is None:
        record.size = size
    record.shapes.append(Shape(names[0], _pixels(kind, result["value"], size)))


def _pixels(kind: str, value: dict, size: tuple[int, int]):
    def draw(h: int, w: int) -> np.ndarray:
        if (h, w) != size:
            raise ValueError(f"the result is drawn on a {size[1]}x{size[0]} image, the task's image is {w}x{h}")
        if kind == "brushlabels":
            from pipeline.io.brush_rle import brush_mask

            if value.get("format", "rle") != "rle" or not isinstance(value.get("rle"), list):
                raise ValueError("a brush result without an 'rle' list")
            return brush_mask(value["rle"], h, w)
        if kind == "polygonlabels":
            points = [(float(x) * w / 100, float(y) * h / 100) for x, y in value["points"]]
        else:
            x, y = float(value["x"]) * w / 100, float(value["y"]) * h / 100
            bw, bh = float(value["width"]) * w / 100, float(value["height"]) * h / 100
            a = math.radians(float(value.get("rotation") or 0))
            c, s = math.cos(a), math.sin(a)
            points = [(x + px * c - py * s, y + px * s + py * c) for px, py in ((0, 0), (bw, 0), (bw, bh), (0, bh))]
        return polygon_pixels([[v for p in points for v in p]], h, w)

    return draw
