"""`run_discover(config)`: the recurring regions of a collection, before anyone named them
(`dinoseg discover INPUT OUTPUT --clusters K`).

    list INPUT -> a seeded sample of at most --max-images -> read + decode + resize (CPU tasks)
    -> SampleFeatures actors (the backbone, on GPUs where there are some): a seeded random
    sample of --patches-per-image unit patch features per image (and the whole grid for the
    few images the contact sheets show) -> driver: k-means (scikit-learn) on the samples
    -> OUTPUT/head.pt (a prototype head, classes cluster_0..K-1), classes.yaml, clusters/*.jpg
    (one contact sheet per cluster: crops of the images it covers most around its patches, the
    cluster tinted, the rest dimmed), discover.json, problems.jsonl

Memory is bounded by max_images x patches_per_image whatever the collection's size. Rename
clusters in OUTPUT/classes.yaml (merge them by giving two the same name, drop one by deleting
its entry) and run `dinoseg prototypes --from-clusters OUTPUT --output head.pt` for a named head.

k-means is scikit-learn's (Lloyd with k-means++ seeding, `random_state`): deterministic under a
seed, wheels for every platform, and the sample is small enough for one CPU; faiss would be
faster on a GPU, but its GPU build is not on PyPI and its results vary with the thread count.
"""

from __future__ import annotations

import colorsys
import hashlib
import heapq
import io
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import numpy as np

from model.errors import DinosegError
from model.geometry import PATCH_SIZE, resized_size
from pipeline.data.decode import max_megapixels_option
from pipeline.data.schema import failed, object_array
from pipeline.options import address_option, argument, option, storage_options_option

log = logging.getLogger("dinoseg.discover")


@dataclass
class DiscoverConfig:
    input: str = argument("Folder, fsspec URL prefix, glob, or manifest of the collection.")
    output: str = argument("Folder or URL for head.pt, classes.yaml, clusters/*.jpg, discover.json.")
    clusters: int = option(8, "How many clusters (classes to discover).")
    backbone: str = option("dinov2_vits14", "Frozen backbone (see `dinoseg models`).")
    backbone_weights: Optional[str] = option(None, "Backbone weights path/URL (default: the released ones).")
    layers: Optional[str] = option(None, "Block indices whose features are clustered (default: the last).")
    resolution: int = option(448, "Short side images are resized to.")
    patches_per_image: int = option(64, "Patch features sampled per image (memory: max-images x this).")
    max_images: int = option(2000, "Images sampled from the collection at most (seeded).")
    sheet_images: int = option(64, "Images the contact sheets choose from.")
    sheet_tiles: int = option(12, "Tiles per contact sheet.")
    seed: int = option(0, "Seed of the image and patch samples and of k-means.")
    overwrite: bool = option(False, "Replace OUTPUT's head.pt and classes.yaml (names you gave them are lost).")
    precision: str = option("auto", "auto (bf16 on a GPU, fp32 on the CPU), fp32, bf16.")
    actors: Optional[int] = option(None, "Feature actors (default: one per GPU, or one on the CPU).")
    max_megapixels: float = max_megapixels_option()
    storage_options: dict = storage_options_option()
    address: Optional[str] = address_option()


def sample_rank(seed: int, key: str) -> str:
    """A key's place in the seeded sample: the same seed samples the same images."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def cluster_colors(k: int) -> list[tuple[int, int, int]]:
    """k distinct colours: hues spread evenly, two lightness levels alternating."""
    out = []
    for i in range(k):
        r, g, b = colorsys.hls_to_rgb(i / k, 0.5 if i % 2 == 0 else 0.35, 0.85)
        out.append((round(r * 255), round(g * 255), round(b * 255)))
    return out


@dataclass(frozen=True)
class SampleConfig:
    features: object  # pipeline.features.cache.FeatureConfig
    patches: int
    seed: int


class DecodeResized:
    """{path, bytes} -> + pixels (resized to the short side `resolution`), width, height."""

    def __init__(self, resolution: int, max_megapixels: float):
        from pipeline.data.decode import Decode, DecodeConfig

        self.resolution = resolution
        self.decode = Decode(DecodeConfig(max_megapixels))

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        out = self.decode(batch)
        images = out.pop("image")
        pixels = []
        for i, rgb in enumerate(images):
            if failed(out)[i]:
                pixels.append(np.zeros((0, 0, 3), np.uint8))
                continue
            h, w = resized_size(*rgb.shape[:2], self.resolution, 4 * self.resolution)
            if (h, w) != rgb.shape[:2]:
                rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))
            pixels.append(rgb)
        out["pixels"] = object_array(pixels)
        return out


class SampleFeatures:
    """Actor: rows with pixels -> + `sample` (n, D) float16 unit features of n random patches
    inside the image, seeded by the key; rows flagged `sheet` keep their whole grid as `features`."""

    def __init__(self, config: SampleConfig):
        from pipeline.features.cache import ComputeFeatures

        self.config = config
        self.compute = ComputeFeatures(config.features)

    def __call__(self, batch: dict) -> dict:
        out = self.compute(batch)
        samples = []
        for i, data in enumerate(out["features"]):
            if not len(data):
                samples.append(b"")
                continue
            c, gh, gw = (int(out[k][i]) for k in ("channels", "grid_h", "grid_w"))
            f = np.frombuffer(data, np.float16).reshape(c, gh, gw)
            cells = inside_cells(out, i)
            rng = np.random.default_rng(int(sample_rank(self.config.seed, str(out["key"][i]))[:12], 16))
            take = rng.choice(cells, size=min(self.config.patches, len(cells)), replace=False)
            x = f.reshape(c, -1)[:, take].T.astype(np.float32)
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
            samples.append(x.astype(np.float16).tobytes())
            if not out["sheet"][i]:
                out["features"][i] = b""
        out["sample"] = object_array(samples)
        return out


def inside_cells(row: dict, i: int) -> np.ndarray:
    """Flat indices of the grid cells whose centre lies on the image, not on its padding."""
    gh, gw = int(row["grid_h"][i]), int(row["grid_w"][i])
    top, left, rh, rw = (int(row[k][i]) for k in ("pad_top", "pad_left", "resized_h", "resized_w"))
    centres_y = np.arange(gh) * PATCH_SIZE + PATCH_SIZE / 2 - top
    centres_x = np.arange(gw) * PATCH_SIZE + PATCH_SIZE / 2 - left
    ok = ((centres_y >= 0) & (centres_y < rh))[:, None] & ((centres_x >= 0) & (centres_x < rw))[None, :]
    return np.flatnonzero(ok)


RESULT_COLUMNS = (
    "key",
    "path",
    "sheet",
    "sample",
    "features",
    "channels",
    "grid_h",
    "grid_w",
    "pad_top",
    "pad_left",
    "resized_h",
    "resized_w",
    "error_stage",
    "error_message",
)


def _results(batch: dict) -> dict:
    return {k: batch[k] for k in RESULT_COLUMNS}


@dataclass
class _Collected:
    samples: list = field(default_factory=list)
    sheets: list = field(default_factory=list)  # (key, path, grid features, geometry)
    problems: list = field(default_factory=list)
    images: int = 0


def run_discover(config: DiscoverConfig) -> dict:
    """Sample, cluster, write; returns what OUTPUT/discover.json holds."""
    from model.backbone import backbone_config
    from model.hub import load_backbone
    from model.weights import weights_env
    from pipeline import runtime
    from pipeline.data.sources import ReadBytes, list_inputs
    from pipeline.features.cache import FeatureConfig
    from pipeline.io.files import absolute_input, absolute_output
    from pipeline.label.prototypes import parse_layers

    started = time.time()
    _check(config)
    config = replace(
        config, output=absolute_output(config.output), backbone_weights=absolute_input(config.backbone_weights)
    )
    so = config.storage_options or None
    out = config.output.rstrip("/")
    bb = backbone_config(config.backbone)
    layers = parse_layers(config.layers, bb.depth)
    load_backbone(config.backbone, config.backbone_weights, so)  # a wrong name or file fails here
    collected = _Collected()
    _refuse_to_replace(out, config.overwrite, so)

    def ranked():
        for row in list_inputs(config.input, so):
            if row["error_stage"]:
                collected.problems.append({k: row[k] for k in ("key", "path", "error_stage", "error_message")})
            else:
                yield sample_rank(config.seed, row["key"]), row["key"], row["path"]

    # the max_images lowest ranks, kept in a heap while the listing streams: bounded memory
    sample = heapq.nsmallest(config.max_images, ranked())
    if not sample:
        raise DinosegError(f"'{config.input}' has no image that could be listed: see the problems above.")
    import pyarrow as pa

    rows = pa.table(
        {
            "path": [p for _, _, p in sample],
            "key": [k for _, k, _ in sample],
            "sheet": [i < config.sheet_images for i in range(len(sample))],
        }
    )
    features = FeatureConfig(
        config.backbone,
        layers,
        config.resolution,
        config.backbone_weights,
        precision=config.precision,
        storage_options=so,
        weights_env=weights_env(),
    )
    started_ray = runtime.start_ray(config.address)
    try:
        cluster = runtime.cluster_resources(joined=not started_ray)
        resources = runtime.Resources(actors=config.actors, decode_cpus=0.25).resolve(cluster)
        ds = runtime.build(
            rows,
            ReadBytes(so),
            DecodeResized(config.resolution, config.max_megapixels),
            SampleFeatures,
            SampleConfig(features, config.patches_per_image, config.seed),
            _results,
            resources,
        )
        for table in runtime.iter_results(ds):
            _collect(table, collected)
    finally:
        if started_ray:
            runtime.stop_ray()
    if not collected.samples:
        raise DinosegError(f"no image of '{config.input}' could be read ({len(collected.problems)} problems).")
    x = np.concatenate(collected.samples).astype(np.float32)
    from pipeline.label.prototypes import kmeans

    k = config.clusters
    if len(x) < k:
        raise DinosegError(f"{len(x)} patches sampled for {k} clusters: use fewer --clusters or more images.")
    centres = kmeans(x, k, config.seed)
    centres /= np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    share = np.bincount(np.argmax(x @ centres.T, axis=1), minlength=len(centres)) / len(x)
    info = _write(config, out, centres, share, layers, bb.embed_dim, collected, so)
    info["wall_seconds"] = round(time.time() - started, 3)
    from pipeline.io.records import write_json

    write_json(f"{out}/discover.json", info, so)
    return info


def _refuse_to_replace(out: str, overwrite: bool, so) -> None:
    """A discover OUTPUT holds names a person gave the clusters: never replaced silently."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(f"{out}/head.pt", **(so or {}))
    if fs.exists(path) and not overwrite:
        raise DinosegError(
            f"{out} holds a discover run already (head.pt, classes.yaml and any names you gave the clusters): "
            "pass --overwrite to replace it, or another OUTPUT."
        )


def _check(config: DiscoverConfig) -> None:
    bad = [
        (config.clusters >= 2, f"--clusters {config.clusters} must be at least 2"),
        (config.clusters <= 255, f"--clusters {config.clusters}: at most 255 (masks are 8-bit)"),
        (config.patches_per_image >= 1, "--patches-per-image must be at least 1"),
        (config.max_images >= 1, "--max-images must be at least 1"),
        (config.sheet_tiles >= 1 and config.sheet_images >= 0, "--sheet-tiles must be at least 1"),
        (config.resolution >= 14, f"--resolution {config.resolution} must be at least 14 pixels"),
    ]
    for ok, message in bad:
        if not ok:
            raise DinosegError(message + ".")


def _collect(table, collected: _Collected) -> None:
    for row in table.to_pylist():
        if row["error_stage"]:
            collected.problems.append({k: row[k] for k in ("key", "path", "error_stage", "error_message")})
            continue
        collected.images += 1
        collected.samples.append(np.frombuffer(row["sample"], np.float16).reshape(-1, row["channels"]))
        if row["sheet"] and row["features"]:
            f = np.frombuffer(row["features"], np.float16).reshape(row["channels"], row["grid_h"], row["grid_w"])
            collected.sheets.append((row["key"], row["path"], f, {k: row[k] for k in RESULT_COLUMNS[6:12]}))


def _write(config, out, centres, share, layers, embed_dim, collected: _Collected, so) -> dict:
    import torch

    from model.checkpoint import HeadCheckpoint, save_head_checkpoint
    from model.classes import ClassMap, save_class_map
    from model.heads import prototype_config, prototype_state
    from pipeline.io.records import jsonl, write_text

    k = len(centres)
    classes = ClassMap(tuple(f"cluster_{i}" for i in range(k)), tuple(cluster_colors(k)))
    protos = torch.from_numpy(centres.astype(np.float32))[:, None, :]
    ckpt = HeadCheckpoint(
        config.backbone,
        prototype_config(layers, embed_dim, k, 1),
        classes,
        prototype_state(protos, torch.ones(k, 1, dtype=torch.bool)),
        resolution=config.resolution,
        meta={"source": "discover", "input": config.input, "images": collected.images, "seed": config.seed},
    )
    save_head_checkpoint(ckpt, f"{out}/head.pt", so)
    save_class_map(classes, f"{out}/classes.yaml", so)
    sheets = write_contact_sheets(config, out, centres, classes, collected.sheets, so)
    if collected.problems:
        write_text(f"{out}/problems.jsonl", jsonl(collected.problems), so)
    settings = asdict(config) | {"layers": list(layers)}
    settings["storage_options"] = sorted(config.storage_options)  # names only: no secrets in files
    return {
        "arguments": settings,
        "images": collected.images,
        "patches": int(sum(len(s) for s in collected.samples)),
        "problems": len(collected.problems),
        "clusters": [
            {"name": classes.names[i], "color": list(classes.colors[i]), "patch_share": round(float(share[i]), 4)}
            for i in range(k)
        ],
        "head": f"{out}/head.pt",
        "classes": f"{out}/classes.yaml",
        "sheets": sheets,
    }


TILE = 160  # pixels a side of a contact-sheet tile
COLUMNS = 4


def write_contact_sheets(config, out, centres, classes, sheets, so) -> list[str]:
    """One JPEG per cluster: the sheet images it covers most (share of their patches), the
    cluster's patches tinted with its colour and the rest dimmed. Returns their URLs."""
    from PIL import Image

    from pipeline.data.decode import DecodeConfig, decode_image
    from pipeline.data.sources import ReadBytes
    from pipeline.io.files import write_bytes_atomic

    if not sheets:
        return []
    read, decode = ReadBytes(so), DecodeConfig(config.max_megapixels)
    assigned, pictures = [], []
    for _key, path, f, g in sheets:
        c, gh, gw = f.shape
        x = f.reshape(c, -1).T.astype(np.float32)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        labels = np.argmax(x @ centres.T, axis=1).reshape(gh, gw)
        data = read({"path": np.asarray([path], dtype=object)})
        if data["error_stage"][0]:
            continue
        try:
            rgb, _, _ = decode_image(data["bytes"][0], decode)
        except DinosegError:
            continue  # changed since the pass: one tile fewer
        rgb = np.asarray(Image.fromarray(rgb).resize((g["resized_w"], g["resized_h"]), Image.Resampling.BILINEAR))
        canvas = np.zeros((gh * PATCH_SIZE, gw * PATCH_SIZE, 3), np.uint8)
        canvas[g["pad_top"] : g["pad_top"] + rgb.shape[0], g["pad_left"] : g["pad_left"] + rgb.shape[1]] = rgb
        assigned.append(labels)
        pictures.append(canvas)
    urls = []
    for i, color in enumerate(classes.colors):
        shares = np.array([(a == i).mean() for a in assigned])
        order = [j for j in np.argsort(-shares, kind="stable") if shares[j] > 0][: config.sheet_tiles]
        tiles = [_tile(pictures[j], assigned[j] == i, color) for j in order]
        rows = max(1, -(-len(tiles) // COLUMNS))
        sheet = np.full((rows * TILE, COLUMNS * TILE, 3), 32, np.uint8)
        for t, tile in enumerate(tiles):
            y, x = divmod(t, COLUMNS)
            sheet[y * TILE : y * TILE + tile.shape[0], x * TILE : x * TILE + tile.shape[1]] = tile
        buf = io.BytesIO()
        Image.fromarray(sheet).save(buf, format="JPEG", quality=85)
        url = f"{out}/clusters/{classes.names[i]}.jpg"
        write_bytes_atomic(url, buf.getvalue(), so)
        urls.append(url)
    return urls


MIN_CROP_CELLS = 6  # a crop shows at least this many patches a side of context


def _tile(picture: np.ndarray, cells: np.ndarray, color) -> np.ndarray:
    """A crop around the cluster's cells (one patch of margin, at least MIN_CROP_CELLS a side),
    the cells tinted and the rest dimmed, fit into TILE x TILE: a small region of a large photo
    stays visible."""
    from PIL import Image

    on = np.kron(cells, np.ones((PATCH_SIZE, PATCH_SIZE), bool))[..., None]
    x = picture.astype(np.float32)
    x = np.where(on, 0.55 * x + 0.45 * np.asarray(color, np.float32), 0.3 * x)
    (y0, y1), (x0, x1) = (_span(np.flatnonzero(cells.any(axis=a)), cells.shape[1 - a]) for a in (1, 0))
    crop = x[y0 * PATCH_SIZE : y1 * PATCH_SIZE, x0 * PATCH_SIZE : x1 * PATCH_SIZE]
    img = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8))
    img.thumbnail((TILE, TILE), Image.Resampling.BILINEAR)
    return np.asarray(img)


def _span(indices: np.ndarray, n: int) -> tuple[int, int]:
    """[start, stop) of the cells `indices` with a margin of one, widened to MIN_CROP_CELLS."""
    if not len(indices):
        return 0, n
    start, stop = max(0, int(indices[0]) - 1), min(n, int(indices[-1]) + 2)
    width = max(stop - start, min(n, MIN_CROP_CELLS))
    start = min(max(0, (start + stop - width) // 2), n - width)  # centred, then moved inside
    return start, start + width


def summary(info: dict) -> str:
    lines = [f"{'cluster':<12}  {'patches':>8}"]
    lines += [f"{c['name']:<12}  {c['patch_share']:>8.1%}" for c in info["clusters"]]
    lines.append(
        f"images: {info['images']} sampled, {info['problems']} problems; {info['patches']:,} patches clustered"
    )
    lines.append(f"contact sheets: {len(info['sheets'])} in {info['classes'].rsplit('/', 1)[0]}/clusters/")
    lines.append(
        f"name the clusters in {info['classes']} (same name = merged; delete an entry to drop it), then: "
        f"dinoseg prototypes --from-clusters {info['classes'].rsplit('/', 1)[0]} --output head.pt"
    )
    return "\n".join(lines)
