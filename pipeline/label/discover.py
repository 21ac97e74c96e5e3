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

import heapq
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import numpy as np

from model.errors import DinosegError
from model.storage import options_for
from pipeline.data.decode import max_megapixels_option
from pipeline.features.config import backbone_option, backbone_weights_option, layers_option, precision_option
from pipeline.label.patches import RESULT_COLUMNS, DecodeResized, SampleConfig, SampleFeatures, results, sample_rank
from pipeline.label.sheets import cluster_colors, write_contact_sheets
from pipeline.options import address_option, argument, option, storage_options_option

log = logging.getLogger("dinoseg.discover")


@dataclass
class DiscoverConfig:
    input: str = argument("Folder, fsspec URL prefix, glob, or manifest of the collection.")
    output: str = argument("Folder or URL for head.pt, classes.yaml, clusters/*.jpg, discover.json.")
    clusters: int = option(8, "How many clusters (classes to discover).")
    backbone: str = backbone_option()
    backbone_weights: Optional[str] = backbone_weights_option()
    layers: Optional[str] = layers_option("the last block")
    resolution: int = option(448, "Short side images are resized to.")
    patches_per_image: int = option(64, "Patch features sampled per image (memory: max-images x this).")
    max_images: int = option(2000, "Images sampled from the collection at most (seeded).")
    sheet_images: int = option(64, "Images the contact sheets choose from.")
    sheet_tiles: int = option(12, "Tiles per contact sheet.")
    seed: int = option(0, "Seed of the image and patch samples and of k-means.")
    overwrite: bool = option(False, "Replace OUTPUT's head.pt and classes.yaml (names you gave them are lost).")
    precision: str = precision_option()
    actors: Optional[int] = option(None, "Feature actors (default: one per GPU, or one on the CPU).")
    max_megapixels: float = max_megapixels_option()
    storage_options: dict = storage_options_option()
    address: Optional[str] = address_option()


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
    from model.storage import scope_config
    from pipeline import runtime
    from pipeline.data.sources import ReadBytes, list_inputs
    from pipeline.features.cache import feature_config
    from pipeline.features.config import parse_layers
    from pipeline.io.files import absolute_input, absolute_output
    from pipeline.label.accumulate import kmeans, unit_rows

    config = scope_config(config)  # plain storage options for the URLs it names, as on a command line

    started = time.time()
    _check(config)
    config = replace(
        config, output=absolute_output(config.output), backbone_weights=absolute_input(config.backbone_weights)
    )
    so = config.storage_options or None
    out = config.output.rstrip("/")
    bb = backbone_config(config.backbone)
    layers = parse_layers(config.layers, bb.depth, (bb.depth - 1,))
    load_backbone(config.backbone, config.backbone_weights, so)  # a wrong name or file fails here
    collected = _Collected()
    _refuse_to_replace(out, config.overwrite, so)  # before any work

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
    features = feature_config(config.backbone, layers, config.resolution, config.backbone_weights, config.precision, so)
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
            results,
            resources,
        )
        for table in runtime.iter_results(ds):
            _collect(table, collected)
    finally:
        if started_ray:
            runtime.stop_ray()
    if not collected.samples:
        where = _report_problems(out, collected.problems, so)
        first = f", e.g. {collected.problems[0]['error_message']}" if collected.problems else ""
        raise DinosegError(
            f"no image of '{config.input}' could be read ({len(collected.problems)} problems{first}{where})."
        )
    # in key order, whatever order Ray returned them in: k-means++ seeds by row order
    x = np.concatenate([sample for _, sample in sorted(collected.samples, key=lambda s: s[0])]).astype(np.float32)
    k = config.clusters
    if len(x) < k:
        raise DinosegError(f"{len(x)} patches sampled for {k} clusters: use fewer --clusters or more images.")
    centres = unit_rows(kmeans(x, k, config.seed))
    share = np.bincount(np.argmax(x @ centres.T, axis=1), minlength=len(centres)) / len(x)
    info = _write(config, out, centres, share, layers, bb.embed_dim, collected, so)
    info["wall_seconds"] = round(time.time() - started, 3)
    from pipeline.io.records import write_json

    write_json(f"{out}/discover.json", info, so)
    return info


OWN_FILES = ("head.pt", "classes.yaml", "discover.json", "problems.jsonl")


def _refuse_to_replace(out: str, overwrite: bool, so) -> None:
    """A discover OUTPUT holds names a person gave the clusters, and another command's OUTPUT a
    class map of its own: neither is replaced silently."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(out, **options_for(out, so))
    taken = [name for name in ("head.pt", "classes.yaml") if fs.exists(f"{root}/{name}")]
    if taken and not overwrite:
        raise DinosegError(
            f"{out} holds {' and '.join(taken)} already (a discover run, and any names you gave its clusters, or "
            "another command's output): pass --overwrite to replace them, or another OUTPUT."
        )


def _clear_earlier_run(out: str, so) -> None:
    """With --overwrite, an earlier run's files go before the new ones are written (after the
    new clustering succeeded): no stale sheet of a cluster that no longer exists."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(out, **options_for(out, so))
    stale = [f"{root}/{name}" for name in OWN_FILES if fs.exists(f"{root}/{name}")]
    if fs.exists(f"{root}/clusters"):
        stale += [p for p in fs.find(f"{root}/clusters") if p.rsplit("/", 1)[-1].startswith("cluster_")]
    for path in stale:
        fs.rm(path)


def _report_problems(out: str, problems: list[dict], so) -> str:
    from pipeline.io.records import jsonl, write_text

    if not problems:
        return ""
    write_text(f"{out}/problems.jsonl", jsonl(problems), so)
    return f"; all in {out}/problems.jsonl"


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
        collected.samples.append((row["key"], np.frombuffer(row["sample"], np.float16).reshape(-1, row["channels"])))
        if row["sheet"] and row["features"]:
            f = np.frombuffer(row["features"], np.float16).reshape(row["channels"], row["grid_h"], row["grid_w"])
            collected.sheets.append((row["key"], row["path"], f, {k: row[k] for k in RESULT_COLUMNS[6:12]}))


def _write(config, out, centres, share, layers, embed_dim, collected: _Collected, so) -> dict:
    import torch

    from model.checkpoint import HeadCheckpoint, save_head_checkpoint
    from model.classes import ClassMap, save_class_map
    from model.heads import prototype_config, prototype_state

    k = len(centres)
    classes = ClassMap(tuple(f"cluster_{i}" for i in range(k)), tuple(cluster_colors(k)))
    protos = torch.from_numpy(centres.astype(np.float32))[:, None, :]
    ckpt = HeadCheckpoint(
        config.backbone,
        prototype_config(layers, embed_dim, k, 1),
        classes,
        prototype_state(protos, torch.ones(k, 1, dtype=torch.bool)),
        resolution=config.resolution,
        meta={
            "source": "discover",
            "input": config.input,
            "images": collected.images,
            "seed": config.seed,
            "backbone_weights": config.backbone_weights or "released",
        },
    )
    if config.overwrite:
        _clear_earlier_run(out, so)
    save_head_checkpoint(ckpt, f"{out}/head.pt", so)
    save_class_map(classes, f"{out}/classes.yaml", so)
    sheets = write_contact_sheets(config, out, centres, classes, collected.sheets, so)
    _report_problems(out, collected.problems, so)
    settings = asdict(config) | {"layers": list(layers)}
    settings["storage_options"] = sorted(config.storage_options)  # names only: no secrets in files
    return {
        "arguments": settings,
        "images": collected.images,
        "patches": int(sum(len(s) for _, s in collected.samples)),
        "problems": len(collected.problems),
        "clusters": [
            {"name": classes.names[i], "color": list(classes.colors[i]), "patch_share": round(float(share[i]), 4)}
            for i in range(k)
        ],
        "head": f"{out}/head.pt",
        "classes": f"{out}/classes.yaml",
        "sheets": sheets,
    }


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
