"""`run_prototypes(config)`: a prototype head from a few labeled images (`dinoseg prototypes`).

    pairs (masks, or a point file drawn as sparse masks) -> train's check + feature-cache pass
    (Ray Data, on GPUs where there are some) -> per class: its patches' normalised features,
    weighted by the share of the patch the class labels -> k=1: the weighted mean; k>1: weighted
    k-means (scikit-learn) -> head.pt of kind 'prototype' (`model.heads.PrototypeHead`)

No optimizer: seconds for tens of images once the features are cached (a re-run with another k
or temperature reads the cache). Labels are mapped to patches at the mask's own resolution, so
a click of a few pixels on a large photo still lands on its patch. `--from-clusters DIR` turns a
`dinoseg discover` folder whose classes.yaml a person edited (renamed, merged by giving two
clusters one name, removed) into a named head without touching the images.
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
from model.geometry import PATCH_SIZE
from pipeline.data.decode import max_megapixels_option
from pipeline.data.points import DEFAULT_RADIUS
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
    backbone: str = option("dinov2_vits14", "Frozen backbone (see `dinoseg models`).")
    backbone_weights: Optional[str] = option(None, "Backbone weights path/URL (default: the released ones).")
    layers: Optional[str] = option(None, "Block indices whose features are compared, e.g. 11 (default: the last).")
    resolution: int = option(512, "Short side images are resized to (and segmented at, by default).")
    prototypes: int = option(4, "Prototypes per class: k-means centroids of its patches (1: their mean).")
    temperature: Optional[float] = option(
        None,
        "Softmax temperature of the cosine logits, for confidences (default: model.heads', 0.05; with --from-clusters, the clusters').",
    )
    point_radius: float = option(DEFAULT_RADIUS, "Radius in pixels of the disc a point labels.")
    max_patches: int = option(20_000, "Patches per class that k-means sees at most (a seeded sample).")
    cache_dir: Optional[str] = option(None, "Where the feature cache lives (default: the head's folder/cache).")
    precision: str = option("auto", "auto (bf16 on a GPU, fp32 on the CPU), fp32, bf16.")
    seed: int = option(0, "Seed for the patch sample and k-means.")
    overwrite: bool = option(False, "Replace the head at --output if there is one.")
    max_megapixels: float = max_megapixels_option()
    storage_options: dict = storage_options_option()
    address: Optional[str] = address_option()


def patch_weights(label: np.ndarray, geometry: dict, num_classes: int) -> np.ndarray:
    """(num_classes, grid_h, grid_w): the share of each patch that each class labels.

    `label` is the mask at the image's size; `geometry` the cache row's resized size, padding and
    grid. A pixel belongs to the patch its centre lands in after the resize and padding, so
    labels are counted at their own resolution (no nearest-neighbour resize loses a click)."""
    h, w = label.shape
    rh, rw, gh, gw = (int(geometry[k]) for k in ("resized_h", "resized_w", "grid_h", "grid_w"))
    top, left = int(geometry["pad_top"]), int(geometry["pad_left"])
    ys, xs = np.nonzero(label != IGNORE_INDEX)
    cls = label[ys, xs].astype(np.int64)
    keep = cls < num_classes
    ys, xs, cls = ys[keep], xs[keep], cls[keep]
    py = np.clip(((ys + 0.5) * rh / h + top) // PATCH_SIZE, 0, gh - 1).astype(np.int64)
    px = np.clip(((xs + 0.5) * rw / w + left) // PATCH_SIZE, 0, gw - 1).astype(np.int64)
    counts = np.bincount((cls * gh + py) * gw + px, minlength=num_classes * gh * gw)
    area = (PATCH_SIZE * h / rh) * (PATCH_SIZE * w / rw)  # original pixels per patch
    return (counts.reshape(num_classes, gh, gw) / area).astype(np.float32)


class ClassAccumulator:
    """Per class: the weighted sum of its patches' unit features (the k=1 prototype), and a
    seeded uniform sample of at most `max_patches` of them with their weights (for k-means).
    Memory is bounded by classes x max_patches whatever the number of images."""

    def __init__(self, num_classes: int, dim: int, max_patches: int, seed: int, keep_samples: bool):
        self.sums = np.zeros((num_classes, dim), np.float64)
        self.weight = np.zeros(num_classes, np.float64)
        self.patches = np.zeros(num_classes, np.int64)
        self.images = np.zeros(num_classes, np.int64)
        self.max_patches, self.keep = max_patches, keep_samples
        self.rng = np.random.default_rng(seed)
        # per class: chunks of (unit features fp16, weights, random priorities), cut back to the
        # max_patches lowest priorities (a uniform sample) whenever they pass twice that
        self.samples: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in range(num_classes)]
        self.held = np.zeros(num_classes, np.int64)

    def add(self, features: np.ndarray, weights: np.ndarray) -> None:
        """features (D, gh, gw) of one image; weights (C, gh, gw) from `patch_weights`."""
        f = features.reshape(features.shape[0], -1).T.astype(np.float32)
        f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        w = weights.reshape(weights.shape[0], -1)
        for c in np.flatnonzero(w.any(axis=1)):
            rows = np.flatnonzero(w[c])
            self.sums[c] += w[c, rows] @ f[rows]
            self.weight[c] += w[c, rows].sum()
            self.patches[c] += len(rows)
            self.images[c] += 1
            if self.keep:
                self.samples[c].append((f[rows].astype(np.float16), w[c, rows], self.rng.random(len(rows))))
                self.held[c] += len(rows)
                if self.held[c] > 2 * self.max_patches:
                    self._cut(c)

    def _cut(self, c: int) -> None:
        x, wt, pri = (np.concatenate(parts) for parts in zip(*self.samples[c], strict=True))
        if len(pri) > self.max_patches:  # bottom-k of random priorities: a uniform sample
            top = np.argpartition(pri, self.max_patches)[: self.max_patches]
            x, wt, pri = x[top], wt[top], pri[top]
        self.samples[c], self.held[c] = [(x, wt, pri)], len(pri)

    def sample(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Class c's sampled unit features (float32) and their weights."""
        if not self.samples[c]:
            return np.zeros((0, self.sums.shape[1]), np.float32), np.zeros(0, np.float32)
        self._cut(c)
        x, wt, _ = self.samples[c][0]
        return x.astype(np.float32), wt

    def prototypes(self, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(C, k, D) unit prototypes and (C, k) validity: k-means centroids, the mean for k=1."""
        c, d = self.sums.shape
        protos, valid = np.zeros((c, k, d), np.float32), np.zeros((c, k), bool)
        for i in range(c):
            if self.weight[i] <= 0:
                continue
            if k == 1:
                centres = self.sums[i][None]
            else:
                x, wt = self.sample(i)
                centres = kmeans(x, min(k, len(x)), seed, wt)
            centres = centres / np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
            protos[i, : len(centres)], valid[i, : len(centres)] = centres, True
        return protos, valid


def kmeans(x: np.ndarray, k: int, seed: int, sample_weight: np.ndarray | None = None) -> np.ndarray:
    """Centroids of k-means on unit vectors (scikit-learn's Lloyd, k-means++ init, seeded)."""
    from sklearn.cluster import KMeans

    k = max(1, min(k, len(np.unique(x, axis=0))))
    # one k-means++ start: a seeded start is reproducible, and three cost 3x for no gain measured
    return KMeans(n_clusters=k, n_init=1, random_state=seed).fit(x, sample_weight=sample_weight).cluster_centers_


def run_prototypes(config: PrototypeConfig) -> dict:
    """Build and write the head; returns the record written beside it (OUTPUT's .json)."""
    from pipeline.io.files import absolute_input, absolute_output

    started = time.time()
    config = replace(
        config,
        output=absolute_output(config.output),
        backbone_weights=absolute_input(config.backbone_weights),
        cache_dir=absolute_output(config.cache_dir) if config.cache_dir else None,
    )
    _check(config)
    _refuse_to_replace(config.output, config.overwrite, config.storage_options or None)
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


def _refuse_to_replace(output: str, overwrite: bool, so) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(output, **(so or {}))
    if fs.exists(path) and not overwrite:
        raise DinosegError(f"{output} exists already: pass --overwrite to replace it, or another --output.")


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

    so = config.storage_options or None
    classes = load_class_map(config.classes, so)
    if len(classes) > IGNORE_INDEX:
        raise DinosegError(f"{config.classes} has {len(classes)} classes; prototype heads support at most 255.")
    bb = backbone_config(config.backbone)
    layers = parse_layers(config.layers, bb.depth)
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


def parse_layers(text: str | None, depth: int) -> tuple[int, ...]:
    if not text:
        return (depth - 1,)
    try:
        layers = [int(v) for v in text.split(",")]
    except ValueError:
        layers = []
    if not layers or any(not -depth <= i < depth for i in layers) or len({i % depth for i in layers}) != len(layers):
        raise DinosegError(
            f"--layers '{text}': give distinct block indices 0..{depth - 1} (or -{depth}..-1 from the end), e.g. {depth - 1}."
        )
    return tuple(sorted(i % depth for i in layers))


def _fill_cache(config, pairs, classes, layers, problems, cluster):
    """train's check pass: every pair read and checked, uncached features computed and stored.
    Returns the good pairs and the cache folder; the bad ones join `problems`."""
    from model.weights import weights_env
    from pipeline import runtime
    from pipeline.data.pairs import problem
    from pipeline.features.cache import FeatureConfig, cached_sizes
    from pipeline.features.check import check_pass, pairs_table
    from pipeline.features.pairs import PairConfig

    so = config.storage_options or None
    features = FeatureConfig(
        config.backbone,
        tuple(layers),
        config.resolution,
        config.backbone_weights,
        precision=config.precision,
        storage_options=so,
        weights_env=weights_env(),
    )
    cache = features.folder(config.cache_dir or f"{posixpath.dirname(config.output)}/cache")
    pair = PairConfig(len(classes), config.resolution, max_megapixels=config.max_megapixels)
    resources = runtime.Resources(decode_cpus=0.25).resolve(cluster)
    good = set()
    for table in check_pass(pairs_table(pairs, cached_sizes(cache, so)), pair, so, resources, features, cache):
        for row in table.to_pylist():
            if row["error_stage"]:
                problems.append(
                    problem(row["key"], row["image"], row["mask"], row["error_stage"], row["error_message"])
                )
            else:
                good.add(row["image"])
    return pairs.subset([i for i, url in enumerate(pairs.images) if url in good]), cache


def _accumulate(config, pairs, classes, cache, problems, dim) -> ClassAccumulator:
    """Read the cached features of the good pairs (one part at a time) and their masks."""
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
        with fsspec.open(url, "rb", **(so or {})) as f:
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
                label = decode_label(data["bytes"][0], len(classes))
                if label.shape != (row["height"], row["width"]):
                    raise DinosegError(f"the mask is {label.shape[::-1]}, its image {row['width']}x{row['height']}.")
            except DinosegError as e:  # changed since the check pass
                problems.append(problem(keys[image], image, masks[image], "mask", str(e)))
                continue
            f = np.frombuffer(row["features"], np.float16).reshape(row["channels"], row["grid_h"], row["grid_w"])
            acc.add(f, patch_weights(label, row, len(classes)))
    return acc


def _write_head(config, acc: ClassAccumulator, classes, layers, embed_dim, problems, images) -> dict:
    import torch

    from model.checkpoint import HeadCheckpoint, save_head_checkpoint
    from model.heads import prototype_config, prototype_state

    protos, valid = acc.prototypes(config.prototypes, config.seed)
    missing = [classes.names[i] for i in range(len(classes)) if not valid[i].any()]
    if len(missing) == len(classes):
        raise DinosegError(
            f"no labeled pixel of any class reached the head ({len(problems)} problems): check the masks or points."
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
    meta = {"source": "prototypes", "images": images, "per_class": per_class, "missing": missing}
    ckpt = HeadCheckpoint(
        config.backbone,
        prototype_config(layers, embed_dim, len(classes), config.prototypes),
        classes,
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


def from_clusters(config: PrototypeConfig) -> dict:
    """The discover folder's cluster head with its edited classes.yaml: every listed cluster
    becomes a prototype of the class its entry names (entries with one name merge; a cluster
    left out of the file is dropped); classes keep the order of their first entry."""
    import torch

    from model.checkpoint import HeadCheckpoint, save_head_checkpoint
    from model.classes import ClassMap, default_color
    from model.heads import KIND, prototype_config, prototype_state
    from model.hub import load_head

    so = config.storage_options or None
    folder = config.from_clusters.rstrip("/")
    loaded = load_head(f"{folder}/head.pt", storage_options=so)
    head = loaded.head
    if head.config.kind != KIND:
        raise DinosegError(f"{folder}/head.pt is a '{head.config.kind}' head, not a discover run's cluster head.")
    entries = _cluster_entries(f"{folder}/classes.yaml", len(loaded.classes), so)
    names: list[str] = []
    colors: list[tuple[int, int, int]] = []
    members: dict[str, list[int]] = {}
    for cluster, name, color in entries:
        if name not in members:
            names.append(name)
            colors.append(color or default_color(len(names)))
            members[name] = []
        members[name].append(cluster)
    # every valid prototype of a class's clusters (a discover head has one per cluster)
    vectors = {
        name: [head.prototypes[c, j] for c in members[name] for j in range(head.valid.shape[1]) if head.valid[c, j]]
        for name in names
    }
    k = max(1, max(len(v) for v in vectors.values()))
    d = head.prototypes.shape[-1]
    protos, valid = torch.zeros(len(names), k, d), torch.zeros(len(names), k, dtype=torch.bool)
    for i, name in enumerate(names):
        for j, vector in enumerate(vectors[name]):
            protos[i, j], valid[i, j] = vector, True
    classes = ClassMap(tuple(names), tuple(colors))
    temperature = config.temperature or float(head.temperature)
    ckpt = HeadCheckpoint(
        loaded.backbone,
        prototype_config(head.config.layers, head.config.embed_dim, len(names), k),
        classes,
        prototype_state(protos, valid, temperature),
        resolution=loaded.resolution,
        meta={"source": "clusters", "clusters": folder, "members": members},
    )
    save_head_checkpoint(ckpt, config.output, so)
    return {"head": config.output, "classes": names, "members": members, "from_clusters": folder}


def _cluster_entries(url: str, clusters: int, so) -> list[tuple[int, str, tuple | None]]:
    import fsspec
    import yaml

    try:
        with fsspec.open(url, "rt", **(so or {})) as f:
            data = yaml.safe_load(f.read())
        entries = data["classes"]
        out = []
        for e in entries:
            cluster, name = int(e["id"]), str(e["name"]).strip()
            if not 0 <= cluster < clusters:
                raise ValueError(f"id {cluster} is not a cluster 0..{clusters - 1}")
            if not name:
                raise ValueError(f"cluster {cluster} has an empty name")
            color = tuple(int(v) for v in e["color"]) if e.get("color") else None
            out.append((cluster, name, color))
    except FileNotFoundError:
        raise DinosegError(f"{url} does not exist: pass the OUTPUT folder of `dinoseg discover`.") from None
    except (KeyError, TypeError, ValueError, yaml.YAMLError) as e:
        raise DinosegError(
            f"{url} is not a cluster class map ({e}): keep entries {{id: <cluster>, name, color}}, one per cluster kept."
        ) from None
    if len({c for c, _, _ in out}) != len(out):
        raise DinosegError(f"{url} lists a cluster twice: give each cluster one entry (one name).")
    if not out:
        raise DinosegError(f"{url} keeps no cluster: leave at least one entry.")
    return out


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
