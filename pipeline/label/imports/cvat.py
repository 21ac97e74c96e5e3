"""CVAT's "Segmentation mask 1.1" (the Pascal VOC layout Datumaro reads and writes): labelmap.txt
maps colours to labels, SegmentationClass/<name>.png holds one colour per pixel (RGB, or a
palette image whose palette holds those colours), ImageSets/Segmentation/*.txt lists the names,
JPEGImages/ holds the images when the export includes them.

Colours. Every colour must be declared in labelmap.txt; an undeclared one is reported and its
pixels left unlabeled. Black (0,0,0) is CVAT's background, what unlabeled pixels become: it is
the class named 'background' when the class map has one (VOC), else 255 (no label); then our
export gives unsure pixels the label 'unlabeled' (VOC's void colour), which comes back as 255.
"""

from __future__ import annotations

import io
import posixpath
from typing import Iterator, Optional

import numpy as np

from model.classes import ClassMap, default_color
from model.errors import DinosegError
from pipeline.label.exporters import UNLABELED
from pipeline.label.imports.common import MAX_MEMBER_BYTES, MAX_PIXELS, Record, join

IMAGE_FOLDER = "JPEGImages"


def parse_labelmap(text: str) -> dict[tuple[int, int, int], str]:
    """{colour: label} of a labelmap.txt (`name:r,g,b:parts:actions`, '#' lines are comments; a
    label without a colour has Pascal VOC's colour for its place in the file)."""
    colours: dict[tuple[int, int, int], str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        spec = rest.split(":", 1)[0].strip()
        try:  # no colour: Pascal VOC's colour map by the label's place (what Datumaro then draws)
            colour = tuple(int(v) for v in spec.split(",")) if spec else default_color(len(colours))
            if len(colour) != 3 or not all(0 <= v <= 255 for v in colour):
                raise ValueError
        except ValueError:
            raise DinosegError(
                f"labelmap.txt line {n} ('{line}') is not 'name:r,g,b::': fix the file or re-export from CVAT."
            ) from None
        if colour in colours:
            raise DinosegError(
                f"labelmap.txt gives '{colours[colour]}' and '{name}' the colour {rest.split(':', 1)[0]}: CVAT tells labels apart by colour."
            )
        colours[colour] = name
    if not colours:
        raise DinosegError("labelmap.txt declares no labels: re-export from CVAT as 'Segmentation mask 1.1'.")
    return colours


def read_cvat(fs, root: str) -> tuple[list[str], Iterator[Record], Optional[str], dict]:
    """(label names in labelmap order, records, the images folder inside the export or None,
    {label: colour} as labelmap.txt declares them)."""
    labelmap = join(root, "labelmap.txt")
    if not fs.isfile(labelmap):
        raise DinosegError(
            f"'{root}' has no labelmap.txt: pass CVAT's 'Segmentation mask 1.1' export (a zip or its folder)."
        )
    with fs.open(labelmap, "rb") as f:
        colours = parse_labelmap(f.read().decode("utf-8-sig"))
    masks_root = join(root, "SegmentationClass")
    if not fs.isdir(masks_root):
        raise DinosegError(f"'{root}' has no SegmentationClass/ folder: export with masks ('Segmentation mask 1.1').")
    masks = {_rel(p, masks_root)[: -len(".png")]: p for p in fs.find(masks_root) if p.lower().endswith(".png")}
    listed = _listed(fs, join(root, "ImageSets/Segmentation"))
    images = join(root, IMAGE_FOLDER) if fs.isdir(join(root, IMAGE_FOLDER)) else None
    labels = [name for name in colours.values() if name.lower() != "background" and name != UNLABELED[0]]
    by_name = {name: colour for colour, name in colours.items()}
    return labels, _records(fs, masks, listed, colours), images, by_name


def _rel(path: str, root: str) -> str:
    return path[len(root.rstrip("/")) + 1 :] if root else path


def _listed(fs, folder: str) -> list[str]:
    if not fs.isdir(folder):
        return []
    names: list[str] = []
    for path in sorted(fs.ls(folder, detail=False)):
        if path.endswith(".txt"):
            with fs.open(path, "rb") as f:
                names += [ln.strip() for ln in f.read().decode("utf-8-sig").splitlines() if ln.strip()]
    return list(dict.fromkeys(names))


def _records(fs, masks: dict[str, str], listed: list[str], colours: dict) -> Iterator[Record]:
    for name in sorted(masks):
        yield Record(name=name, key=name, raster=_raster(fs, masks[name], colours))
    for name in listed:
        if name not in masks:
            yield Record(
                name=name, key=name, skip=("not annotated", f"'{name}' is listed but has no SegmentationClass mask")
            )


def _raster(fs, path: str, colours: dict):
    def decode(classes: ClassMap) -> tuple[np.ndarray, list[str]]:
        from PIL import Image

        from pipeline.label.imports.common import class_lookup

        if fs.info(path).get("size", 0) > MAX_MEMBER_BYTES:  # what an archive says it unpacks to
            raise ValueError(f"the mask file is over {MAX_MEMBER_BYTES >> 20} MiB")
        with fs.open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:  # PNG only: no other decoder is reached
            if im.width * im.height > MAX_PIXELS:  # from the header, before the pixels are decoded
                raise ValueError(f"a {im.width}x{im.height} mask is past the {MAX_PIXELS:,}-pixel limit")
            if im.mode == "P":
                index = np.asarray(im)
                palette = np.asarray(im.getpalette("RGB") or [], dtype=np.int64).reshape(-1, 3)
                palette = np.concatenate([palette, np.zeros((256 - len(palette), 3), dtype=np.int64)])
                packed_of_index = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
                values, inverse = np.unique(packed_of_index[index], return_inverse=True)
            else:
                rgb = np.asarray(im.convert("RGB"), dtype=np.int64)
                values, inverse = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2], return_inverse=True)
        shape = im.height, im.width
        lookup = class_lookup(classes)
        background = next((i for n, i in lookup.items() if n.lower() == "background"), classes.ignore_index)
        lut = np.full(values.size, classes.ignore_index, dtype=np.int64)
        problems: list[str] = []
        for j, packed in enumerate(values.tolist()):
            colour = (packed >> 16, (packed >> 8) & 255, packed & 255)
            label = colours.get(colour)
            if colour == (0, 0, 0):
                lut[j] = background
            elif label == UNLABELED[0] and label not in lookup:
                continue  # what our export gives unsure pixels when black is a class: 255 again
            elif label is None:
                problems.append(
                    f"colour {','.join(map(str, colour))} is not in labelmap.txt: its pixels are left unlabeled"
                )
            elif label not in lookup:
                problems.append(
                    f"label '{label}' is not in the class map: its pixels are left unlabeled (add it to --classes)"
                )
            else:
                lut[j] = lookup[label]
        dtype = np.uint8 if len(classes) <= 256 and classes.ignore_index < 256 else np.uint16
        return lut[inverse.reshape(shape)].astype(dtype), problems

    return decode


def image_names(fs, folder: Optional[str]) -> dict[str, str]:
    """{name without extension: path} of the images under the export's JPEGImages/."""
    if not folder:
        return {}
    from pipeline.data.sources import is_image_name

    return {posixpath.splitext(_rel(p, folder))[0]: p for p in sorted(fs.find(folder)) if is_image_name(p)}
