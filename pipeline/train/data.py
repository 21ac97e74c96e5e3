"""The data side of training: the check/feature pass over every pair, and the datasets the
workers read (through `pipeline.runtime.datasets`).

    pairs -> ReadPair -> DecodePair -> [ComputeFeatures actors -> WriteFeatures] -> status rows
    cache parts -> CachedSamples (random crop + flip) -> TorchTrainer workers (DDP on the head)
    pairs -> ReadPair -> DecodePair -> AugmentPairs -> workers (frozen backbone + head), --no-cache
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from model.geometry import PATCH_SIZE
from pipeline import runtime
from pipeline.data.decode import MAX_MEGAPIXELS
from pipeline.data.pairs import Pairs
from pipeline.data.schema import failed
from pipeline.runtime import datasets
from pipeline.train.features import (
    CachedSamples,
    ComputeFeatures,
    FeatureConfig,
    SampleConfig,
    WriteFeatures,
    part_files,
)
from pipeline.train.trainset import (
    AugmentConfig,
    AugmentPairs,
    DecodePair,
    PairConfig,
    ReadPair,
)

log = logging.getLogger("dinoseg.train")


STATUS = ("path", "key", "image", "mask", "width", "height", "error_stage", "error_type", "error_message")


def pairs_table(pairs: Pairs, cached: dict | None = None) -> pa.Table:
    sizes = [(cached or {}).get(url) for url in pairs.images]
    return pa.table(
        {
            "path": pairs.images,
            "key": pairs.keys,
            "image": pairs.images,
            "mask": pairs.masks,
            "cached": [s is not None for s in sizes],
            "width": [s[0] if s else 0 for s in sizes],
            "height": [s[1] if s else 0 for s in sizes],
            **{f: [""] * len(pairs) for f in ("error_stage", "error_type", "error_message")},
        }
    )


def _status(batch: dict) -> dict:
    return {k: batch[k] for k in STATUS}


def check_pass(
    rows: pa.Table,
    pair: PairConfig,
    storage_options: dict | None,
    resources: runtime.Resources,
    features: FeatureConfig | None = None,
    folder: str | None = None,
):
    """Read and check every pair (and compute the features of uncached images); yields status
    tables (STATUS columns; failed rows have error fields)."""
    read, decode = ReadPair(storage_options), DecodePair(pair)
    # every image cached (a re-run, another round on the same images): no model to load, and no
    # actor pool to start, only the masks to check
    if features is not None and not all(rows.column("cached").to_pylist()):
        ds = runtime.build(
            rows, read, decode, ComputeFeatures, features, WriteFeatures(folder, storage_options), resources
        )
    else:
        batch = resources.read_batch_size
        ds = datasets.stages(datasets.from_rows(rows, 4 * batch), [read, decode], batch, resources.decode_cpus)
    yield from runtime.iter_results(datasets.stages(ds, [_status], None, resources.decode_cpus))


@dataclass(frozen=True)
class DataSpec:
    train: Pairs
    val: Pairs
    num_classes: int
    resolution: int
    crop: int
    cache_folder: str | None  # None: --no-cache
    storage_options: dict | None = None
    task_cpus: float = 0.25
    max_megapixels: float = MAX_MEGAPIXELS


def training_datasets(spec: DataSpec) -> dict:
    """The "train" (and "val") datasets the workers read: crops of the feature cache, or decoded
    and augmented pairs with --no-cache."""
    so, cpus = spec.storage_options, spec.task_cpus
    out = {}
    if spec.cache_folder:
        files = part_files(spec.cache_folder, so)
        cells = max(1, round(spec.crop / PATCH_SIZE))
        cache = datasets.read_parquet(files, so, cpus)
        # Reading the cache again every epoch is most of an epoch's time on a small set (a Ray
        # Data read per epoch and worker); a cache that fits easily in the object store is read
        # once and the epochs take their crops from memory. A large one streams every epoch.
        held = fits_in_memory(files, so, datasets.object_store_bytes())
        if held:
            cache = datasets.held(cache)
        for name, pairs, crop in (("train", spec.train, cells), ("val", spec.val, None)):
            if not len(pairs):
                continue
            cfg = SampleConfig(
                dict(zip(pairs.images, pairs.masks, strict=True)), spec.num_classes, crop, storage_options=so
            )
            ds = datasets.stages(datasets.shuffled(cache) if crop else cache, [CachedSamples(cfg)], 16, cpus)
            out[name] = datasets.held(ds) if held and not crop else ds  # validation is the same every epoch
        return datasets.quiet(out)
    pair = PairConfig(spec.num_classes, None, max_megapixels=spec.max_megapixels)
    for name, pairs in (("train", spec.train), ("val", spec.val)):
        if not len(pairs):
            continue
        rows = pairs_table(pairs)
        ds = datasets.from_rows(rows, 16)
        if name == "train":
            ds = datasets.shuffled(ds)
            steps = [ReadPair(so), DecodePair(pair), AugmentPairs(AugmentConfig(spec.crop, spec.resolution))]
        else:
            steps = [
                ReadPair(so),
                DecodePair(PairConfig(spec.num_classes, spec.resolution, max_megapixels=spec.max_megapixels)),
                _samples,
            ]
        out[name] = datasets.stages(ds, steps, 16, cpus)
    return datasets.quiet(out)


MEMORY_SHARE = 0.25  # of the cluster's object store that a cache may hold for a whole run


def fits_in_memory(files: list[str], storage_options: dict | None, object_store_bytes: float) -> bool:
    """Whether the cache parts `files` may be held in the object store for the whole run."""
    import fsspec

    if not files:
        return False
    fs, _ = fsspec.core.url_to_fs(files[0], **(storage_options or {}))
    stored = sum(fs.size(f) for f in files)
    # features are fp16 Parquet with little to compress: in memory about their size on disk
    budget = MEMORY_SHARE * object_store_bytes
    log.info(
        "feature cache: %.1f MB on disk, %s", stored / 1e6, "held in memory" if stored <= budget else "read every epoch"
    )
    return stored <= budget


def _samples(batch: dict) -> dict:
    keep = np.flatnonzero(~failed(batch))
    return {"pixels": batch["pixels"][keep], "label": batch["label"][keep]}
