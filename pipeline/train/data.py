"""The data side of training: the datasets the workers read (through `pipeline.runtime.datasets`),
after the check pass (`pipeline.features.check`) has filled the feature cache.

    cache parts -> CachedSamples (random crop + flip) -> TorchTrainer workers (DDP on the head)
    pairs -> ReadPair -> DecodePair -> AugmentPairs -> workers (frozen backbone + head), --no-cache
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from model.classes import IGNORE_INDEX
from model.errors import DinosegError
from model.geometry import PATCH_SIZE
from model.storage import options_for
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
    storage_options: dict | None = field(default=None, repr=False)  # credentials: never in a repr
    task_cpus: float = 0.25
    max_megapixels: float = MAX_MEGAPIXELS
    ignore_index: int = IGNORE_INDEX  # the class map's mask values, mapped to 255 as masks are read
    first_id: int = 0


def refuse_unread_pairs(problems: list[dict]) -> None:
    """Raise DinosegError when the check pass could not read some pairs for a transient reason
    (after retries): training on fewer pairs than given, because the store hiccupped, would pass
    for a run on the whole set. Bad pairs themselves (corrupt, missing a half) are left out."""
    unread = [p for p in problems if p.get("retryable")]
    if unread:
        first = unread[0]
        raise DinosegError(
            f"{len(unread)} pairs could not be read because the storage failed (e.g. {first['key']}: {first['message']}): "
            "re-run once it answers (the feature cache keeps what was computed); nothing was trained."
        )


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
                dict(zip(pairs.images, pairs.masks, strict=True)),
                spec.num_classes,
                crop,
                storage_options=so,
                ignore_index=spec.ignore_index,
                first_id=spec.first_id,
            )
            ds = datasets.stages(datasets.shuffled(cache) if crop else cache, [CachedSamples(cfg)], 16, cpus)
            out[name] = datasets.held(ds) if held and not crop else ds  # validation is the same every epoch
        return datasets.quiet(out)
    values = {"max_megapixels": spec.max_megapixels, "ignore_index": spec.ignore_index, "first_id": spec.first_id}
    pair = PairConfig(spec.num_classes, None, **values)
    for name, pairs in (("train", spec.train), ("val", spec.val)):
        if not len(pairs):
            continue
        rows = pairs_table(pairs)
        ds = datasets.from_rows(rows, 16)
        if name == "train":
            ds = datasets.shuffled(ds)
            steps = [
                ReadPair(so, fail_reads=True),
                DecodePair(pair),
                AugmentPairs(AugmentConfig(spec.crop, spec.resolution)),
            ]
        else:
            steps = [
                ReadPair(so, fail_reads=True),
                DecodePair(PairConfig(spec.num_classes, spec.resolution, **values)),
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
    fs, _ = fsspec.core.url_to_fs(files[0], **options_for(files[0], storage_options))
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
