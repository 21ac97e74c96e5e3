"""Masks into what labeling tools import: COCO JSON (one compressed RLE per class per image),
CVAT's "Segmentation mask 1.1" (Pascal VOC layout) and Label Studio brush predictions.

No Ray, no CLI. `jobs.export` reads masks in a thread pool and drives an exporter:

    exporter.begin()               checks the class map against the format, before any mask is read
    payload = exporter.encode(item)   worker threads: pure, or writes one file of its own
    exporter.add(payload)          the caller's thread, in listing order: appends to the streams
    exporter.finish() -> [urls]    assembles and publishes the files (exporter.abort() drops them)

The big files (annotations.json, tasks.json) are streamed through local staging files and
published at the end, so memory stays bounded by the masks in flight, whatever the image count.
Pixels equal to the ignore index (255: unsure, not labeled) are exported as no label.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from model.classes import ClassMap
from model.errors import DinosegError
from model.storage import options_for
from pipeline.io.brush_rle import brush_from_runs, runs
from pipeline.io.files import is_local_url, write_bytes_atomic
from pipeline.io.masks import PNG_COMPRESS_LEVEL, check_key
from pipeline.io.rle import rle_encode_labels

FORMATS = ("coco", "cvat", "labelstudio")
log = logging.getLogger("dinoseg.export")


@dataclass
class ExportItem:
    key: str  # the mask's key (path under LABELS/masks without .png)
    image: str  # the image's URL or name, as the tool will look it up
    mask: np.ndarray  # (h, w) class indices; ignore_index = no label


def stray_values(mask: np.ndarray, classes: ClassMap, limit: int = 5) -> list[int]:
    """Values in the mask that are neither a class nor the ignore index (at most `limit`)."""
    present = np.flatnonzero(np.bincount(mask.ravel()))
    stray = present[(present >= len(classes)) & (present != classes.ignore_index)]
    return [int(v) for v in stray[:limit]]


def class_stats(mask: np.ndarray, ignore_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class ids present but ignore, their pixel counts, their [x, y, w, h] boxes), in two passes
    over the pixels whatever the number of classes (a mask per class would cost one pass each)."""
    h, w = mask.shape
    counts = np.bincount(mask.ravel())
    present = np.flatnonzero(counts)
    lut = np.zeros(counts.size, dtype=np.intp)
    lut[present] = np.arange(present.size)
    compact = lut[mask]  # values renumbered 0..k-1, so the tables below stay small for 16-bit masks
    rows = np.zeros((h, present.size), dtype=bool)
    rows[np.arange(h)[:, None], compact] = True
    cols = np.zeros((w, present.size), dtype=bool)
    cols[np.arange(w)[None, :], compact] = True
    ids = present[present != ignore_index]
    boxes = np.zeros((ids.size, 4), dtype=np.int64)
    for i, c in enumerate(ids):
        ys, xs = np.flatnonzero(rows[:, lut[c]]), np.flatnonzero(cols[:, lut[c]])
        boxes[i] = (xs[0], ys[0], xs[-1] - xs[0] + 1, ys[-1] - ys[0] + 1)
    return ids, counts[ids], boxes


def labelstudio_config(classes: ClassMap, from_name: str = "tag", to_name: str = "image") -> str:
    """The labeling config whose BrushLabels the predictions name (colours from the class map)."""
    labels = "\n".join(
        f"    <Label value={quoteattr(n)} background={quoteattr('#%02x%02x%02x' % tuple(c))}/>"
        for n, c in zip(classes.names, classes.colors, strict=True)
    )
    return (
        f'<View>\n  <Image name={quoteattr(to_name)} value="$image" zoom="true"/>\n'
        f"  <BrushLabels name={quoteattr(from_name)} toName={quoteattr(to_name)}>\n{labels}\n"
        "  </BrushLabels>\n</View>\n"
    )


# --- CVAT --------------------------------------------------------------------------------------


# CVAT has no "no label": its unannotated pixels are the background, 0,0,0. Where that colour is
# a class of its own (a black 'background', as in VOC), unsure pixels are given this label (VOC's
# 'void' colour) instead, so a person sees what is left to label and `dinoseg import` reads them
# back as 255, not as background.
UNLABELED = ("unlabeled", (224, 224, 192))


def cvat_labelmap(classes: ClassMap) -> tuple[str, np.ndarray]:
    """(labelmap.txt, RGB colour per mask value) for CVAT, which (through Datumaro's VOC reader)
    maps mask colours to labels: every colour must name one label, and 0,0,0 is the background
    that unlabeled (ignore) pixels become. A black class named 'background' (VOC) is that one,
    and then unlabeled pixels get the UNLABELED label."""
    fix = "edit a copy of the class map and pass it with --classes"
    seen: dict[tuple, str] = {}
    background = None
    for i, (name, color) in enumerate(zip(classes.names, map(tuple, classes.colors), strict=True)):
        if not name or name != name.strip() or ":" in name or "\n" in name or name.startswith("#"):
            raise DinosegError(
                f"class {i} '{name}' cannot be a CVAT label (labelmap.txt splits at ':' and skips '#' lines): rename it ({fix})."
            )
        if color in seen:
            raise DinosegError(
                f"classes '{seen[color]}' and '{name}' share the colour {','.join(map(str, color))} and CVAT tells labels apart by colour: give one another colour ({fix})."
            )
        seen[color] = name
        is_bg_name = name.lower() == "background"
        if color == (0, 0, 0) and not is_bg_name:
            raise DinosegError(
                f"class '{name}' has colour 0,0,0, which CVAT keeps for the background (unlabeled pixels): "
                f"give it another colour, or name it 'background' if that is what it is ({fix})."
            )
        if is_bg_name and color != (0, 0, 0):
            raise DinosegError(
                f"class '{name}' has colour {','.join(map(str, color))}, but CVAT's background is 0,0,0: colour it 0,0,0 or rename it ({fix})."
            )
        background = i if is_bg_name else background
    lines = ["# label:color_rgb:parts:actions"] + ([] if background is not None else ["background:0,0,0::"])
    order = ([background] if background is not None else []) + [i for i in range(len(classes)) if i != background]
    lines += [f"{classes.names[i]}:{','.join(map(str, classes.colors[i]))}::" for i in order]
    lut = np.zeros((max(len(classes), classes.ignore_index + 1), 3), dtype=np.uint8)
    lut[: len(classes)] = np.asarray(classes.colors, dtype=np.uint8)
    lut[classes.ignore_index] = 0
    name, colour = UNLABELED
    if background is not None and name not in classes.names and colour not in seen:
        lines.append(f"{name}:{','.join(map(str, colour))}::")
        lut[classes.ignore_index] = colour
    elif background is not None:
        log.warning(
            "a class is named '%s' or coloured %s, so unsure pixels are exported as the background (0,0,0) and "
            "come back as '%s': rename or recolour that class to keep them apart",
            name,
            ",".join(map(str, colour)),
            classes.names[background],
        )
    return "\n".join(lines) + "\n", lut


# --- the exporters -----------------------------------------------------------------------------


class _Exporter:
    """Staging: local files that become OUTPUT files at the end. Inside OUTPUT when it is local
    (publishing is a rename on the same disk), a temporary folder otherwise (one upload each)."""

    def __init__(self, output: str, classes: ClassMap, storage_options: dict | None = None, **options):
        self.output, self.classes, self.so, self.options = output.rstrip("/"), classes, storage_options, options
        self.published: list[str] = []

    def begin(self) -> None:
        if is_local_url(self.output):
            root = LocalFileSystem._strip_protocol(self.output)
            os.makedirs(root, exist_ok=True)
            self.staging = tempfile.mkdtemp(prefix=".export-", dir=root)
        else:
            self.staging = tempfile.mkdtemp(prefix="dinoseg-export-")

    def _open(self, name: str, mode: str = "w"):
        return open(os.path.join(self.staging, name), mode, encoding=None if "b" in mode else "utf-8")

    def _publish(self, name: str, url: str) -> None:
        src = os.path.join(self.staging, name)
        if is_local_url(url):
            path = LocalFileSystem._strip_protocol(url)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            shutil.move(src, path)  # a rename, atomic, when staging and target share a disk
        else:
            fs, path = fsspec.core.url_to_fs(url, **options_for(url, self.so))
            fs.put_file(src, path)
        self.published.append(url)

    def abort(self) -> None:
        shutil.rmtree(getattr(self, "staging", ""), ignore_errors=True)


class CocoExporter(_Exporter):
    """OUTPUT/annotations.json: images, categories (id = class index + 1, class index kept as
    `dinoseg_class`), one annotation per class present per image with a compressed RLE."""

    def begin(self) -> None:
        super().begin()
        self._images, self._annotations = self._open("images.part"), self._open("annotations.part")
        self.n_images = self.n_annotations = 0

    def encode(self, item: ExportItem):
        h, w = item.mask.shape
        ids, areas, boxes = class_stats(item.mask, self.classes.ignore_index)
        counts = rle_encode_labels(item.mask, ids)
        image = {"id": 0, "file_name": item.image, "width": int(w), "height": int(h), "dinoseg_key": item.key}
        annotations = [
            {
                "id": 0,
                "image_id": 0,
                "category_id": int(c) + 1,
                "segmentation": {"size": [int(h), int(w)], "counts": counts[int(c)]},
                "area": int(a),
                "bbox": [int(v) for v in box],
                "iscrowd": 0,
            }
            for c, a, box in zip(ids, areas, boxes, strict=True)
        ]
        return image, annotations

    def add(self, payload) -> None:
        image, annotations = payload
        self.n_images += 1
        image["id"] = self.n_images
        self._images.write(("," if self.n_images > 1 else "") + "\n" + json.dumps(image))
        for a in annotations:
            self.n_annotations += 1
            a["id"], a["image_id"] = self.n_annotations, self.n_images
            self._annotations.write(("," if self.n_annotations > 1 else "") + "\n" + json.dumps(a))

    def finish(self) -> list[str]:
        self._images.close()
        self._annotations.close()
        categories = [
            {"id": i + 1, "name": n, "supercategory": "", "dinoseg_class": i} for i, n in enumerate(self.classes.names)
        ]
        head = {
            "info": {
                "description": "dinoseg export",
                "dinoseg_ignore_index": self.classes.ignore_index,
                "category_ids": "COCO category id = dinoseg class index + 1",
            },
            "licenses": [],
            "categories": categories,
        }
        with self._open("annotations.json") as out:
            out.write(json.dumps(head)[:-1] + ',\n"images": [')  # the head without its closing brace
            for part, tail in (("images.part", '\n],\n"annotations": ['), ("annotations.part", "\n]\n}\n")):
                with self._open(part, "r") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
                out.write(tail)
        self._publish("annotations.json", f"{self.output}/annotations.json")
        self.abort()
        return self.published


class CvatExporter(_Exporter):
    """OUTPUT/labelmap.txt, ImageSets/Segmentation/default.txt and SegmentationClass/<key>.png
    (RGB, class colours, ignore = background 0,0,0); with zip=True also OUTPUT.zip of the same."""

    def begin(self) -> None:
        self.labelmap, self.lut = cvat_labelmap(self.classes)  # fails before any mask is read
        super().begin()
        self._names = self._open("default.txt")
        self._zip = zipfile.ZipFile(os.path.join(self.staging, "dataset.zip"), "w") if self.options.get("zip") else None

    def encode(self, item: ExportItem):
        key = check_key(item.key)
        if key != key.strip() or key.startswith("#"):
            raise DinosegError(
                f"the key '{key}' cannot be a line of CVAT's image list (leading '#' or spaces are dropped): rename the image."
            )
        buf = _png(self.lut[item.mask])
        write_bytes_atomic(f"{self.output}/SegmentationClass/{key}.png", buf, self.so)
        return key, (buf if self._zip is not None else None)

    def add(self, payload) -> None:
        key, png = payload
        self._names.write(key + "\n")
        if self._zip is not None:
            self._zip.writestr(f"SegmentationClass/{key}.png", png, zipfile.ZIP_STORED)  # PNG is compressed already

    def finish(self) -> list[str]:
        self._names.close()
        write_bytes_atomic(f"{self.output}/labelmap.txt", self.labelmap.encode(), self.so)
        self.published.append(f"{self.output}/labelmap.txt")
        if self._zip is not None:
            self._zip.writestr("labelmap.txt", self.labelmap, zipfile.ZIP_DEFLATED)
            self._zip.write(
                os.path.join(self.staging, "default.txt"), "ImageSets/Segmentation/default.txt", zipfile.ZIP_DEFLATED
            )
            self._zip.close()
        self._publish("default.txt", f"{self.output}/ImageSets/Segmentation/default.txt")
        if self._zip is not None:
            self._publish("dataset.zip", f"{self.output}.zip")
        self.abort()
        return self.published

    def abort(self) -> None:
        if getattr(self, "_zip", None) is not None and self._zip.fp is not None:
            self._zip.close()
        super().abort()


class LabelStudioExporter(_Exporter):
    """OUTPUT/tasks.json: one task per image with one brush prediction result per class present,
    and OUTPUT/labeling_config.xml with the matching BrushLabels."""

    def begin(self) -> None:
        names = self.classes.names
        if len(set(names)) != len(names):
            raise DinosegError(
                "the class map repeats a name and Label Studio tells labels apart by name: rename the duplicates and pass the file with --classes."
            )
        super().begin()
        self._tasks = self._open("tasks.json")
        self._tasks.write("[")
        self.n_tasks = 0

    def encode(self, item: ExportItem) -> str:
        o = self.options
        names = dict(enumerate(self.classes.names))  # the ignore index names no class: no region
        results = [
            r
            for _, r in brush_results(item.mask, item.key, names, o.get("from_name", "tag"), o.get("to_name", "image"))
        ]
        task = {
            "data": {"image": item.image, "key": item.key},
            "predictions": [{"model_version": o.get("model_version", "dinoseg"), "result": results}],
        }
        return json.dumps(task, separators=(",", ":"))

    def add(self, payload: str) -> None:
        self._tasks.write(("," if self.n_tasks else "") + "\n" + payload)
        self.n_tasks += 1

    def finish(self) -> list[str]:
        self._tasks.write("\n]\n")
        self._tasks.close()
        self._publish("tasks.json", f"{self.output}/tasks.json")
        config = labelstudio_config(
            self.classes, self.options.get("from_name", "tag"), self.options.get("to_name", "image")
        )
        write_bytes_atomic(f"{self.output}/labeling_config.xml", config.encode(), self.so)
        self.published.append(f"{self.output}/labeling_config.xml")
        self.abort()
        return self.published


def brush_results(
    mask: np.ndarray, key: str, labels: dict[int, str], from_name: str, to_name: str
) -> list[tuple[int, dict]]:
    """(class, Label Studio brushlabels result) for each class of `labels` present in the mask:
    its pixels in Label Studio's brush RLE at the mask's size, under the label `labels[class]`,
    with an id stable across runs. Shared by the export's predictions and the ML backend's."""
    h, w = mask.shape
    flat = mask.ravel()
    starts, ends, values = runs(flat)
    out = []
    for c in np.unique(values).tolist():
        if c not in labels:
            continue
        sel = values == c
        result = {
            "id": hashlib.sha1(f"{key}\0{c}".encode()).hexdigest()[:10],
            "from_name": from_name,
            "to_name": to_name,
            "type": "brushlabels",
            "original_width": int(w),
            "original_height": int(h),
            "image_rotation": 0,
            "value": {
                "format": "rle",
                "rle": brush_from_runs(starts[sel], ends[sel], flat.size).tolist(),
                "brushlabels": [labels[c]],
            },
        }
        out.append((c, result))
    return out


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def make_exporter(
    fmt: str, output: str, classes: ClassMap, storage_options: dict | None = None, **options
) -> _Exporter:
    """The exporter for `fmt` (one of FORMATS); options: zip (cvat), from_name, to_name, model_version (labelstudio)."""
    kinds = {"coco": CocoExporter, "cvat": CvatExporter, "labelstudio": LabelStudioExporter}
    if fmt not in kinds:
        raise DinosegError(f"unknown format '{fmt}': use one of {', '.join(FORMATS)}.")
    return kinds[fmt](output, classes, storage_options, **options)
