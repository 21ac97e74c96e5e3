"""A small synthetic labelled segmentation set: colour-coded shapes on textured backgrounds.

For tests and the offline demo, so that training and evaluation need no download. The demo's
backbone is a randomly initialised ViT, whose patch features carry little beyond local colour, so
each class has its own hue and the background stays muted grey/brown: a linear head on 14x14-patch
features can then tell the classes apart, while occlusion, ignore outlines and non-square images
still exercise the real code paths.

Layout under OUTPUT: {train,val}/images/0000.png, {train,val}/masks/0000.png, classes.yaml.
"""

from __future__ import annotations

import io
import shlex
from dataclasses import dataclass

import numpy as np
from PIL import Image

from model.classes import IGNORE_INDEX, ClassMap, save_class_map
from model.errors import DinosegError
from pipeline.io.files import absolute_output, write_bytes_atomic
from pipeline.io.masks import encode_mask_png
from pipeline.options import argument, option, storage_options_option

SYNTHETIC_CLASSES = ClassMap(
    names=("background", "disc", "square", "triangle", "ring"),
    colors=((0, 0, 0), (220, 50, 50), (50, 180, 70), (50, 80, 220), (230, 200, 40)),
)
# The hue each shape class is painted in is its palette colour, so overlays look like the images.
_HUES = np.asarray(SYNTHETIC_CLASSES.colors, dtype=np.float32)
DISC, SQUARE, TRIANGLE, RING = 1, 2, 3, 4
MIN_SIZE = 28  # two 14 px patches: below that a shape would be smaller than one patch
SPLITS = ("train", "val")


def make_sample(rng: np.random.Generator, height: int = 112, width: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """One (image (H, W, 3) uint8, mask (H, W) uint8) pair; the same rng state gives the same pair.

    1-4 shapes of random classes; later shapes occlude earlier ones; each visible shape edge is
    outlined in the mask by a 1-pixel band of the ignore index, like VOC's void outlines."""
    if min(height, width) < MIN_SIZE:
        raise DinosegError(f"a synthetic image of {height}x{width} is too small: give sides of at least {MIN_SIZE} px.")
    image = _background(rng, height, width)
    mask = np.zeros((height, width), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5  # pixel centres
    short = min(height, width)
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(1, len(SYNTHETIC_CLASSES)))
        size = rng.uniform(0.25, 0.5) * short
        cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
        region = _shape(cls, xx - cx, yy - cy, size, rng)
        colour = _HUES[cls] + rng.uniform(-25, 25, 3)
        image[region] = colour + rng.normal(0, 6, (int(region.sum()), 3))
        mask[region] = cls
        mask[region & ~_interior(region)] = SYNTHETIC_CLASSES.ignore_index
    return np.clip(image, 0, 255).round().astype(np.uint8), mask


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Muted grey-to-brown, smooth low-frequency blotches plus fine grain, different per image.
    Kept low in saturation so that no background pixel is nearer a class hue than to grey."""
    grey, tint = rng.uniform(80, 160), rng.uniform(0, 1)
    base = np.array([grey + 20 * tint, grey, grey - 25 * tint], dtype=np.float32)
    cells = int(rng.integers(3, 7))
    light = rng.normal(0, 18, (cells, cells, 1))  # blotches mostly vary in lightness ...
    chroma = rng.normal(0, 5, (cells, cells, 3))  # ... and only a little in colour
    coarse = (light + chroma).astype(np.float32)
    smooth = np.stack(
        [
            np.asarray(Image.fromarray(np.ascontiguousarray(coarse[..., c])).resize((width, height), Image.BICUBIC))
            for c in range(3)
        ],
        axis=-1,
    )
    return base + smooth + rng.normal(0, 4, (height, width, 3)).astype(np.float32)


def _shape(cls: int, dx: np.ndarray, dy: np.ndarray, size: float, rng: np.random.Generator) -> np.ndarray:
    """The pixels of a shape of diameter/side `size` centred at dx = dy = 0, at a random angle."""
    angle = rng.uniform(0, 2 * np.pi)
    radius = size / 2
    if cls == DISC:
        return dx**2 + dy**2 <= radius**2
    if cls == RING:  # the hole shows what lies below, so rings also exercise occlusion
        inner = radius * rng.uniform(0.45, 0.6)
        d2 = dx**2 + dy**2
        return (d2 <= radius**2) & (d2 >= inner**2)
    # A regular polygon is the intersection of half-planes at its inradius from the centre.
    sides = 4 if cls == SQUARE else 3
    inradius = radius if cls == SQUARE else size / (2 * np.sqrt(3))
    inside = np.ones(dx.shape, dtype=bool)
    for k in range(sides):
        a = angle + 2 * np.pi * k / sides
        inside &= dx * np.cos(a) + dy * np.sin(a) <= inradius
    return inside


def _interior(region: np.ndarray) -> np.ndarray:
    """Pixels of `region` whose four neighbours are in it too. The image border counts as inside,
    so a shape cut by the border gets no outline there (VOC outlines objects, not the frame)."""
    p = np.pad(region, 1, mode="edge")
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def sample_size(index: int, size: int) -> tuple[int, int]:
    """(height, width) of image `index`: mostly square, every 4th wide and every 4th tall, so
    that code assuming square images fails on the synthetic set too."""
    long = round(1.25 * size)
    return {1: (size, long), 3: (long, size)}.get(index % 4, (size, size))


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def sample_points(mask: np.ndarray, per_class: int, rng: np.random.Generator) -> list[tuple[float, float, int]]:
    """Clicks a person might make: up to `per_class` pixels of every class in `mask`, away from
    its edges where the class is big enough (pixel centres, as (x, y, class))."""
    out = []
    for c in np.unique(mask[mask != IGNORE_INDEX]):
        region = mask == c
        inner = _interior(_interior(region))
        ys, xs = np.nonzero(inner if inner.any() else region)
        for j in rng.choice(len(ys), size=min(per_class, len(ys)), replace=False):
            out.append((float(xs[j]) + 0.5, float(ys[j]) + 0.5, int(c)))
    return out


def write_synthetic(
    output: str,
    train: int = 48,
    val: int = 16,
    size: int = 112,
    seed: int = 0,
    storage_options: dict | None = None,
    points: int = 0,
) -> dict:
    """Write the set under OUTPUT (local folder or fsspec URL) and return where it is:
    {"train": n, "val": n, "classes": url, "images": {split: url}, "masks": {split: url}}
    (a split with no images is left out of "images" and "masks"). With `points`, also
    train/points.csv: that many clicks per class per training image, drawn from its mask
    (`pipeline.data.points`' format, images by file name); info["points"] is its URL.

    Each image has its own generator seeded by (seed, split, index): the same seed writes the
    same files, and changing `train` does not change the validation images."""
    if train < 1:
        raise DinosegError(f"train={train}: the synthetic set needs at least 1 training image.")
    if val < 0:
        raise DinosegError(f"val={val}: give 0 or more validation images.")
    if size < MIN_SIZE:
        raise DinosegError(f"size={size} is too small: give at least {MIN_SIZE} px (two 14 px patches).")
    if seed < 0:
        raise DinosegError(f"seed={seed}: give a seed of 0 or more.")
    root = absolute_output(output).rstrip("/")
    info: dict = {"train": train, "val": val, "classes": f"{root}/classes.yaml", "images": {}, "masks": {}}
    clicks = ["image,x,y,class"]
    for split, count in zip(SPLITS, (train, val), strict=True):
        if not count:
            continue
        images, masks = f"{root}/{split}/images", f"{root}/{split}/masks"
        digits = max(4, len(str(count - 1)))
        for i in range(count):
            rng = np.random.default_rng([seed, SPLITS.index(split), i])
            image, mask = make_sample(rng, *sample_size(i, size))
            name = f"{i:0{digits}d}.png"
            write_bytes_atomic(f"{images}/{name}", _png(image), storage_options)
            write_bytes_atomic(f"{masks}/{name}", encode_mask_png(mask, SYNTHETIC_CLASSES), storage_options)
            if points and split == "train":
                picks = sample_points(mask, points, np.random.default_rng([seed, 2, i]))
                clicks += [f"{name},{x},{y},{SYNTHETIC_CLASSES.names[c]}" for x, y, c in picks]
        info["images"][split], info["masks"][split] = images, masks
    if points:
        info["points"] = f"{root}/train/points.csv"
        write_bytes_atomic(info["points"], ("\n".join(clicks) + "\n").encode(), storage_options)
    # Last, into a folder that exists by now: a complete set is one with classes.yaml.
    save_class_map(SYNTHETIC_CLASSES, info["classes"], storage_options)
    return info


@dataclass
class SyntheticConfig:
    output: str = argument("Folder or fsspec URL prefix for train/, val/ and classes.yaml.")
    train: int = option(48, "Training images.")
    val: int = option(16, "Validation images (0 for none).")
    size: int = option(112, "Short side of the images in pixels (at least 28).")
    seed: int = option(0, "Random seed: the same seed writes the same files.")
    points: int = option(0, "Also write train/points.csv: this many clicks per class per image (0: none).")
    storage_options: dict = storage_options_option()


def run_synthetic(config: SyntheticConfig) -> dict:
    """Write the set `config` describes (`dinoseg synthetic`); returns where its parts went."""
    return write_synthetic(
        config.output, config.train, config.val, config.size, config.seed, config.storage_options or None, config.points
    )


def describe(info: dict) -> str:
    """Where the set went, and the `dinoseg train` command to try on it."""
    lines = []
    for split in ("train", "val"):
        if split in info["images"]:
            lines.append(f"{split:<8}{info[split]:>4} images  {info['images'][split]}")
            lines.append(f"{'':<8}{info[split]:>4} masks   {info['masks'][split]}")
    lines.append(f"{'classes':<8}{'':>4}         {info['classes']}")
    if "points" in info:
        lines.append(f"{'points':<8}{'':>4}         {info['points']}")
    train = ["dinoseg", "train", info["images"]["train"], info["masks"]["train"]]
    if "val" in info["images"]:
        train += ["--val-images", info["images"]["val"], "--val-masks", info["masks"]["val"]]
    train += ["--classes", info["classes"], "--output", "OUT"]
    lines += ["", "next, train a head on it (OUT: where the head goes):", "  " + shlex.join(train)]
    return "\n".join(lines)
