"""`run_prototypes(config)`: a prototype head from a few labeled images (`dinoseg prototypes`).

    pairs (masks, or a point file drawn as sparse masks) -> the check + feature-cache pass that
    train runs too (`pipeline.features`; Ray Data, on GPUs where there are some) -> per class:
    its patches' normalised features, weighted by the share of the patch the class labels
    (`accumulate`) -> k=1: the weighted mean; k>1: weighted k-means (scikit-learn) -> head.pt
    of kind 'prototype' (`model.heads.PrototypeHead`) and head.json beside it

No optimizer: seconds for tens of images once the features are cached (a re-run with another k
or temperature reads the cache). Labels are mapped to patches at the mask's own resolution, so
a click of a few pixels on a large photo still lands on its patch. `--from-clusters DIR` turns a
`dinoseg discover` folder whose classes.yaml a person edited into a named head (`clusters`).
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np

from model.classes import IGNORE_INDEX
from model.errors import DinosegError
from model.storage import options_for
from pipeline.data.decode import max_megapixels_option
from pipeline.data.points import DEFAULT_RADIUS
from pipeline.features.config import (
    backbone_option,
    backbone_weights_option,
    cache_dir_option,
    layers_option,
    precision_option,
)
from pipeline.label.accumulate import ClassAccumulator, patch_weights
from pipeline.options import REQUIRED, address_option, argument, option, storage_options_option

log = logging.getLogger("dinoseg.prototypes")


@dataclass
class PrototypeConfig:
    images: Optional[str] = argument(
        "Labeled images: folder/URL prefix, or a .csv/.parquet image,mask manifest.", cli_default=None
    )
    masks: Optional[str] = argument(
        "Index-mask PNGs paired by key (full or sparse, 255 = unlabeled), or a point file (.csv/.json: image,x,y,class).",
        cli_default=None,
    )
    output: str = option(REQUIRED, "Where the head goes (head.pt; a record beside it: head.json).")
    classes: Optional[str] = option(None, "Class map file (YAML/JSON) or a bundled name; needed with IMAGES.")
    from_clusters: Optional[str] = option(
        None, "A `dinoseg discover` OUTPUT whose classes.yaml you edited: its clusters as named classes."
    )
    backbone: str = backbone_option()
    backbone_weights: Optional[str] = backbone_weights_option()
    layers: Optional[str] = layers_option("the last block")
    resolution: int = option(512, "Short side images are resized to (and segmented at, by default).")
    prototypes: int = option(4, "Prototypes per class: k-means centroids of its patches (1: their mean).")
    temperature: Optional[float] = option(
        None,
        "Softmax temperature of the cosine logits, for confidences (default: model.heads', 0.05; with --from-clusters, the clusters').",
    )
    point_radius: float = option(DEFAULT_RADIUS, "Radius in pixels of the disc a point labels.")
    max_patches: int = option(20_000, "Patches per class that k-means sees at most (a seeded sample).")
    cache_dir: Optional[str] = cache_dir_option("the head's folder/cache")
    precision: str = precision_option()
    seed: int = option(0, "Seed for the patch sample and k-means.")
    overwrite: bool = option(False, "Replace the head at --output if there is one.")
    max_megapixels: float = max_megapixels_option()
    storage_options: dict = storage_options_option()
    address: Optional[str] = address_option()


def run_prototypes(config: PrototypeConfig) -> dict:
    """Build and write the head; returns the record written beside it (OUTPUT's .json)."""
    from model.storage import scope_config
    from pipeline.io.files import absolute_input, absolute_output, refuse_to_replace
    from pipeline.label.clusters import from_clusters

    config = scope_config(config)  # plain storage options for the URLs it names, as on a command line

    started = time.time()
    config = replace(
        config,
        output=absolute_output(config.output),
        backbone_weights=absolute_input(config.backbone_weights),
        cache_dir=absolute_output(config.cache_dir) if config.cache_dir else None,
        from_clusters=absolute_input(config.from_clusters),
    )
    _check(config)
    refuse_to_replace(config.output, config.overwrite, config.storage_options or None, "--output")
    if config.from_clusters:
        info = from_clusters(config)
    else:
        info = _from_labels(config)
    info["wall_seconds"] = round(time.time() - started, 3)
    from pipeline.io.records import write_json

    write_json(record_url(config.output), info, config.storage_options or None)
    return info


def record_url(output: str) -> str:
    return posixpath.splitext(output)[0] + ".json"


def _check(config: PrototypeConfig) -> None:
    bad = [
        (config.output.endswith(".pt"), f"--output {config.output} must name a .pt file, e.g. OUT/head.pt"),
        (config.prototypes >= 1, f"--prototypes {config.prototypes} must be at least 1"),
        (config.temperature is None or config.temperature > 0, f"--temperature {config.temperature} must be positive"),
        (config.point_radius > 0, f"--point-radius {config.point_radius} must be positive"),
        (config.max_patches >= config.prototypes, "--max-patches must be at least --prototypes"),
        (config.resolution >= 14, f"--resolution {config.resolution} must be at least 14 pixels"),
        (not (config.from_clusters and config.images), "give IMAGES MASKS or --from-clusters, not both"),
        (bool(config.from_clusters or config.images), "give the labeled IMAGES and MASKS (or --from-clusters DIR)"),
        (bool(config.from_clusters or config.classes), "--classes is needed with IMAGES"),
        (
            not (config.from_clusters and config.classes),
            "--from-clusters names its classes in its classes.yaml: leave --classes out",
        ),
        (
            not config.from_clusters or config.output.rstrip("/") != f"{config.from_clusters.rstrip('/')}/head.pt",
            "--output would replace the cluster head --from-clusters reads: write the named head elsewhere",
        ),
    ]
    for ok, message in bad:
        if not ok:
            raise DinosegError(message + ".")


def _from_labels(config: PrototypeConfig) -> dict:
    from model.backbone import backbone_config
    from model.classes import load_class_map
    from model.hub import load_backbone
    from pipeline import runtime
    from pipeline.data.points import labeled_pairs
    from pipeline.features.config import parse_layers

    so = config.storage_options or None
    classes = load_class_map(config.classes, so)
    if len(classes) > IGNORE_INDEX:
        raise DinosegError(f"{config.classes} has {len(classes)} classes; prototype heads support at most 255.")
    bb = backbone_config(config.backbone)
    layers = parse_layers(config.layers, bb.depth, (bb.depth - 1,))
    load_backbone(config.backbone, config.backbone_weights, so)  # a wrong name or file fails here, in one sentence
    folder = posixpath.dirname(config.output)
    pairs = labeled_pairs(
        config.images, config.masks, classes, f"{folder}/point-masks", so, config.max_megapixels, config.point_radius
    )
    problems = list(pairs.problems)
    started_ray = runtime.start_ray(config.address)
    try:
        cluster = runtime.cluster_resources(joined=not started_ray)
        pairs, cache = _fill_cache(config, pairs, classes, layers, problems, cluster)
    finally:
        if started_ray:
            runtime.stop_ray()
    acc = _accumulate(config, pairs, classes, cache, problems, bb.embed_dim * len(layers))
    info = _write_head(config, acc, classes, layers, bb.embed_dim, problems, len(pairs))
    return info


def _fill_cache(config, pairs, classes, layers, problems, cluster):
    """The check pass: every pair read and checked, uncached features computed and stored.
    Returns the good pairs and the cache folder; the bad ones join `problems`."""
    from pipeline import runtime
    from pipeline.features.cache import feature_config
    from pipeline.features.check import check_pairs
    from pipeline.features.pairs import PairConfig

    so = config.storage_options or None
    features = feature_config(config.backbone, layers, config.resolution, config.backbone_weights, config.precision, so)
    cache = features.folder(config.cache_dir or f"{posixpath.dirname(config.output)}/cache")
    pair = PairConfig.of(classes, config.resolution, max_megapixels=config.max_megapixels)
    resources = runtime.Resources(decode_cpus=0.25).resolve(cluster)
    good, bad = check_pairs(pairs, pair, so, resources, features, cache)
    problems += bad
    return pairs.subset([i for i, url in enumerate(pairs.images) if url in good]), cache


def _accumulate(config, pairs, classes, cache, problems, dim) -> ClassAccumulator:
    """Read the cached features of the good pairs and their masks, one part at a time; a part
    is read whole only when it holds one of them (a shared cache may hold many other images)."""
    import fsspec
    import pyarrow.parquet as pq

    from pipeline.data.pairs import problem
    from pipeline.data.sources import ReadBytes
    from pipeline.features.cache import part_files
    from pipeline.features.pairs import decode_label

    so = config.storage_options or None
    acc = ClassAccumulator(len(classes), dim, config.max_patches, config.seed, config.prototypes > 1)
    masks = dict(zip(pairs.images, pairs.masks, strict=True))
    keys = dict(zip(pairs.images, pairs.keys, strict=True))
    seen, read = set(), ReadBytes(so)
    for url in part_files(cache, so):
        with fsspec.open(url, "rb", **options_for(url, so)) as f:
            if not set(pq.read_table(f, columns=["image"])["image"].to_pylist()) & (masks.keys() - seen):
                continue
            table = pq.read_table(f)
        for row in table.to_pylist():
            image = row["image"]
            if image not in masks or image in seen:
                continue
            seen.add(image)
            data = read({"path": np.asarray([masks[image]], dtype=object)})
            try:
                if data["error_stage"][0]:
                    raise DinosegError(str(data["error_message"][0]))
                label = decode_label(
                    data["bytes"][0], len(classes), ignore_index=classes.ignore_index, first_id=classes.first_id
                )
                if label.shape != (row["height"], row["width"]):
                    raise DinosegError(f"the mask is {label.shape[::-1]}, its image {row['width']}x{row['height']}.")
            except DinosegError as e:  # changed since the check pass
                problems.append(problem(keys[image], image, masks[image], "mask", str(e)))
                continue
            f = np.frombuffer(row["features"], np.float16).reshape(row["channels"], row["grid_h"], row["grid_w"])
            acc.add(f, patch_weights(label, row, len(classes)), image)
    return acc


def _write_head(config, acc: ClassAccumulator, classes, layers, embed_dim, problems, images) -> dict:
    import torch

    from model.checkpoint import HeadCheckpoint, save_head_checkpoint
    from model.heads import prototype_config, prototype_state

    protos, valid = acc.prototypes(config.prototypes, config.seed)
    missing = [classes.names[i] for i in range(len(classes)) if not valid[i].any()]
    if len(missing) == len(classes):
        where = _report_problems(config, problems)
        first = f", e.g. {problems[0]['message']}" if problems else ""
        raise DinosegError(
            f"no labeled pixel of any class reached the head ({len(problems)} problems{first}{where}): "
            "check the masks or points."
        )
    for name in missing:
        log.warning("class '%s' has no labeled pixel: the head never predicts it (label a few of its pixels)", name)
    per_class = [
        {
            "class": name,
            "images": int(acc.images[i]),
            "patches": int(acc.patches[i]),
            "labeled_patch_area": round(float(acc.weight[i]), 2),
            "prototypes": int(valid[i].sum()),
        }
        for i, name in enumerate(classes.names)
    ]
    meta = {
        "source": "prototypes",
        "images": images,
        "per_class": per_class,
        "missing": missing,
        "backbone_weights": config.backbone_weights or "released",
    }
    ckpt = HeadCheckpoint(
        config.backbone,
        prototype_config(layers, embed_dim, len(classes), config.prototypes),
        classes.internal(),  # the head's outputs are 0-based, whatever values the masks gave
        prototype_state(torch.from_numpy(protos), torch.from_numpy(valid), config.temperature),
        resolution=config.resolution,
        meta=meta,
    )
    save_head_checkpoint(ckpt, config.output, config.storage_options or None)
    settings = asdict(config) | {"layers": list(layers)}
    settings["storage_options"] = sorted(config.storage_options)  # names only: no secrets in files
    return {
        "head": config.output,
        "arguments": settings,
        "images": images,
        "per_class": per_class,
        "missing": missing,
        "problems": problems,
        "digest": hashlib.sha256(protos.tobytes()).hexdigest()[:16],
    }


def _report_problems(config, problems: list[dict]) -> str:
    """Problems beside the head (OUTPUT's stem + .problems.jsonl) when no head can be written."""
    from pipeline.io.records import jsonl, write_text

    if not problems:
        return ""
    url = posixpath.splitext(config.output)[0] + ".problems.jsonl"
    write_text(url, jsonl(problems), config.storage_options or None)
    return f"; all in {url}"


def summary(info: dict) -> str:
    if "members" in info:
        lines = [f"{'class':<20}  clusters"]
        lines += [f"{name:<20}  {', '.join(map(str, info['members'][name]))}" for name in info["classes"]]
        return "\n".join(lines + [f"head: {info['head']}"])
    lines = [f"{'class':<20}  {'images':>6}  {'patches':>8}  {'prototypes':>10}"]
    for r in info["per_class"]:
        lines.append(f"{r['class']:<20}  {r['images']:>6}  {r['patches']:>8}  {r['prototypes']:>10}")
    lines.append(f"images: {info['images']} labeled, {len(info['problems'])} problems left out")
    if info["missing"]:
        lines.append(f"no labeled pixel (never predicted): {', '.join(info['missing'])}")
    return "\n".join(lines + [f"head: {info['head']}"])
