"""The data side of training: the datasets the workers read (through `pipeline.runtime.datasets`),
after the check pass (`pipeline.features.check`) has filled the feature cache.

    cache parts -> CachedSamples (random crop + flip) -> TorchTrainer workers (DDP on the head)
    pairs -> ReadPair -> DecodePair -> AugmentPairs -> workers (frozen backbone + head), --no-cache
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from model.geometry import PATCH_SIZE
from pipeline.data.decode import MAX_MEGAPIXELS
from pipeline.data.pairs import Pairs
from pipeline.data.schema import failed
from pipeline.features.cache import CachedSamples, SampleConfig, part_files
from pipeline.features.check import pairs_table
from pipeline.features.pairs import DecodePair, PairConfig, ReadPair
from pipeline.runtime import datasets
from pipeline.train.trainset import AugmentConfig, AugmentPairs

log = logging.getLogger("dinoseg.train")


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
