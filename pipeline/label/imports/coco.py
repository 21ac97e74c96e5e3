"""COCO and COCO-Stuff JSON (and CVAT's "COCO 1.0", which is the same file in a zip): images,
categories, and annotations whose `segmentation` is polygons, an uncompressed RLE (counts as a
list) or a compressed one (counts as a string). pycocotools rasterises and decodes, as every
COCO tool does, so our masks are the ones COCO's own evaluation sees.

Categories become classes by name (`match=name`, the default) or by id (`match=id`: category id
c is class c - 1, as COCO's ids start at 1 and COCO-Stuff's label PNGs hold id - 1).
"""

from __future__ import annotations

import json
import posixpath
from typing import Iterator, Optional

import numpy as np

from model.errors import DinosegError
from pipeline.label.imports.common import Record, Shape, join, polygon_pixels

MATCHES = ("name", "id")


def find_annotation_files(fs, root: str) -> list[str]:
    """The COCO JSON files of a SOURCE: the file itself, else annotations/*.json (CVAT's COCO
    1.0 layout), else the .json files at the top of the folder."""
    if fs.isfile(root):
        return [root]
    for folder in (join(root, "annotations"), root):
        if fs.isdir(folder):
            found = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".json"))
            if found:
                return found
    raise DinosegError(
        f"'{root}' holds no COCO annotation file (a .json, or annotations/*.json): pass the file or the export's folder."
    )


def read_coco(fs, files: list[str], images_root: Optional[str], match: str) -> tuple[list[str], Iterator[Record]]:
    """(label names in category-id order, records). A shape's label is its category's name, or
    with match=id the class index its category id stands for."""
    if match not in MATCHES:
        raise DinosegError(f"unknown --match '{match}': use one of {', '.join(MATCHES)}.")
    documents = []
    for path in files:
        try:
            with fs.open(path, "rb") as f:
                doc = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise DinosegError(f"'{path}' is not valid JSON ({e}): pass a COCO annotation file.") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
            raise DinosegError(f"'{path}' is not a COCO file (no 'images' list): pass a COCO annotation file.")
        documents.append(doc)
    categories: dict[int, str] = {}
    for doc in documents:
        for c in doc.get("categories") or []:
            try:
                cid, name = int(c["id"]), str(c["name"])
            except (KeyError, TypeError, ValueError):
                raise DinosegError(f"a COCO category has no integer id or no name: {c!r}.") from None
            if categories.setdefault(cid, name) != name:
                raise DinosegError(
                    f"COCO category id {cid} is '{categories[cid]}' in one file and '{name}' in another: import them separately."
                )
    if match == "id" and any(cid < 1 for cid in categories):
        raise DinosegError("--match id needs category ids from 1 (id c is class c - 1): use --match name.")
    label_of = {cid: (cid - 1 if match == "id" else name) for cid, name in categories.items()}
    labels = [categories[c] for c in sorted(categories)]
    return labels, _records(documents, label_of, images_root)


def _records(documents: list[dict], label_of: dict, images_root: Optional[str]) -> Iterator[Record]:
    for doc in documents:
        by_image: dict = {}
        for a in doc.get("annotations") or []:
            if isinstance(a, dict) and isinstance(a.get("image_id"), (int, str)):
                by_image.setdefault(a["image_id"], []).append(a)
        for n, im in enumerate(doc["images"]):
            if not isinstance(im, dict) or not isinstance(im.get("file_name"), str) or not im["file_name"]:
                yield Record(
                    name=f"image entry {n}", skip=("malformed", f"image entry {n} has no file_name: {str(im)[:200]}")
                )
                continue
            yield _record(
                im, by_image.get(im.get("id")) if isinstance(im.get("id"), (int, str)) else None, label_of, images_root
            )


def _record(im: dict, annotations: Optional[list], label_of: dict, images_root: Optional[str]) -> Record:
    from pipeline.label.imports.common import resolve_image

    name = im["file_name"]
    key = im.get("dinoseg_key")  # our own export names the key
    record = Record(
        name=name, key=key if isinstance(key, str) and key else None, image=resolve_image(name, images_root)
    )
    try:
        record.size = (int(im["height"]), int(im["width"]))
    except (KeyError, TypeError, ValueError):
        record.size = None  # read from the image's header
    if not annotations:
        record.skip = ("not annotated", f"'{name}' has no annotations in the COCO file")
    for a in annotations or []:
        cid = a.get("category_id")
        if not isinstance(cid, int) or cid not in label_of:
            record.notes.append(f"an annotation names category {cid!r}, which the file does not declare")
            continue
        if not a.get("segmentation"):
            record.notes.append(f"a '{label_of[cid]}' annotation has no segmentation (a box only) and was left out")
            continue
        record.shapes.append(Shape(label_of[cid], _pixels(a["segmentation"]), bool(a.get("iscrowd"))))
    return record


def _pixels(segmentation):
    def draw(h: int, w: int) -> np.ndarray:
        from pycocotools import mask as coco_mask

        if isinstance(segmentation, list):  # polygons [[x0, y0, x1, y1, ...], ...]
            if not all(isinstance(p, list) for p in segmentation):
                raise ValueError("polygons must be lists of coordinates")
            return polygon_pixels(segmentation, h, w)
        elif isinstance(segmentation, dict):
            size = [int(v) for v in segmentation.get("size", ())]
            if size != [h, w]:
                raise ValueError(f"the RLE is {size[1:]}x{size[:1]} (w x h) but the image is {w}x{h}")
            counts = segmentation["counts"]
            if isinstance(counts, list):  # uncompressed: run lengths, column-major
                counts = [int(c) for c in counts]
                if any(c < 0 for c in counts) or sum(counts) != h * w:
                    raise ValueError(f"the RLE's run lengths sum to {sum(counts)}, not {h}x{w}")
                rle = coco_mask.frPyObjects({"size": size, "counts": counts}, h, w)
            else:
                if not isinstance(counts, (str, bytes)):
                    raise ValueError(f"RLE counts must be a list or a string, not {type(counts).__name__}")
                rle = {"size": size, "counts": counts.encode() if isinstance(counts, str) else counts}
                _check_compressed(rle, h * w)
        else:
            raise ValueError(f"a segmentation must be polygons or an RLE, not {type(segmentation).__name__}")
        return coco_mask.decode(rle).astype(bool)

    return draw


def _check_compressed(rle: dict, n: int) -> None:
    """pycocotools decodes a compressed RLE whose runs overshoot the image without a word; our
    own decoder of the same strings checks that they cover the image exactly."""
    from pipeline.io.rle import string_to_counts

    counts = string_to_counts(rle["counts"])
    if any(c < 0 for c in counts) or sum(counts) != n:
        raise ValueError(f"the compressed RLE covers {sum(counts)} pixels, not {n}")


def coco_name_root(source_root: str, fs) -> Optional[str]:
    """Where relative file_names live when --images is not given: the export's images/ folder
    (CVAT's COCO 1.0 zip with images), else none."""
    folder = source_root if fs.isdir(source_root) else posixpath.dirname(source_root)
    return join(folder, "images") if fs.isdir(join(folder, "images")) else None
