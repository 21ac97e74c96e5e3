"""The Ray side of training: the check/feature pass (Ray Data), the training datasets, and the
Ray Train loop that each worker runs. With `pipeline.graph`, the only modules that import Ray.

    pairs -> ReadPair -> DecodePair -> [ComputeFeatures actors -> WriteFeatures] -> status rows
    cache parts -> CachedSamples (random crop + flip) -> TorchTrainer workers (DDP on the head)
    pairs -> ReadPair -> DecodePair -> AugmentPairs -> workers (frozen backbone + head), --no-cache
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from . import graph
from .features import CachedSamples, ComputeFeatures, FeatureConfig, SampleConfig, WriteFeatures, part_files
from .pairs import Pairs
from .schema import failed
from .trainset import AugmentConfig, AugmentPairs, DecodePair, PairConfig, ReadPair

if TYPE_CHECKING:
    from .training import Schedule

log = logging.getLogger("dinoseg.train")

STATUS = ("path", "key", "image", "mask", "width", "height", "error_stage", "error_type", "error_message")


def pairs_table(pairs: Pairs, cached: dict | None = None) -> pa.Table:
    sizes = [(cached or {}).get(url) for url in pairs.images]
    return pa.table({
        "path": pairs.images, "key": pairs.keys, "image": pairs.images, "mask": pairs.masks,
        "cached": [s is not None for s in sizes],
        "width": [s[0] if s else 0 for s in sizes], "height": [s[1] if s else 0 for s in sizes],
        **{f: [""] * len(pairs) for f in ("error_stage", "error_type", "error_message")},
    })


def _status(batch: dict) -> dict:
    return {k: batch[k] for k in STATUS}


def check_pass(rows: pa.Table, pair: PairConfig, storage_options: dict | None, resources: graph.Resources,
               features: FeatureConfig | None = None, folder: str | None = None):
    """Read and check every pair (and compute the features of uncached images); yields status
    tables (STATUS columns; failed rows have error fields)."""
    import ray.data

    if features is not None:
        ds = graph.build(rows, ReadPair(storage_options), DecodePair(pair), ComputeFeatures, features,
                         WriteFeatures(folder, storage_options), resources)
    else:
        step = 4 * resources.read_batch_size
        ds = ray.data.from_arrow([rows.slice(i, step) for i in range(0, max(len(rows), 1), step)])
        args = dict(batch_size=resources.read_batch_size, batch_format="numpy", num_cpus=resources.decode_cpus)
        ds = ds.map_batches(ReadPair(storage_options), **args).map_batches(DecodePair(pair), **args)
    ds = ds.map_batches(_status, batch_format="numpy", num_cpus=resources.decode_cpus)
    yield from graph.iter_results(ds)


def arrow_filesystem(url: str, storage_options: dict | None):
    """(pyarrow filesystem or None, paths' form) for Ray Data readers: fsspec's, so the same
    storage options (endpoints, credentials) apply."""
    if "://" not in url or url.startswith("file://"):
        return None
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return PyFileSystem(FSSpecHandler(fs))


def _strip(url: str) -> str:
    return url.split("://", 1)[1] if "://" in url else url


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
    max_megapixels: float = 100.0


def datasets(spec: DataSpec) -> dict:
    import ray.data

    so, cpus = spec.storage_options, spec.task_cpus
    args = dict(batch_format="numpy", num_cpus=cpus, batch_size=16)
    out = {}
    if spec.cache_folder:
        files = part_files(spec.cache_folder, so)
        fs = arrow_filesystem(spec.cache_folder, so)
        cells = max(1, round(spec.crop / 14))
        cache = ray.data.read_parquet([_strip(f) if fs else f for f in files], filesystem=fs, ray_remote_args={"num_cpus": cpus})
        # Reading the cache again every epoch is most of an epoch's time on a small set (a Ray
        # Data read per epoch and worker); a cache that fits easily in the object store is read
        # once and the epochs take their crops from memory. A large one streams every epoch.
        held = fits_in_memory(files, so, ray.cluster_resources().get("object_store_memory", 0))
        if held:
            cache = cache.materialize()
        for name, pairs, crop in (("train", spec.train, cells), ("val", spec.val, None)):
            if not len(pairs):
                continue
            cfg = SampleConfig(dict(zip(pairs.images, pairs.masks)), spec.num_classes, crop, storage_options=so)
            ds = (cache.randomize_block_order() if crop else cache).map_batches(CachedSamples(cfg), **args)
            out[name] = ds.materialize() if held and not crop else ds  # validation is the same every epoch
        return _quiet(out)
    pair = PairConfig(spec.num_classes, None, max_megapixels=spec.max_megapixels)
    for name, pairs in (("train", spec.train), ("val", spec.val)):
        if not len(pairs):
            continue
        rows = pairs_table(pairs)
        ds = ray.data.from_arrow([rows.slice(i, 16) for i in range(0, len(rows), 16)])
        if name == "train":
            ds = ds.randomize_block_order()
            steps = [ReadPair(so), DecodePair(pair), AugmentPairs(AugmentConfig(spec.crop, spec.resolution))]
        else:
            steps = [ReadPair(so), DecodePair(PairConfig(spec.num_classes, spec.resolution, max_megapixels=spec.max_megapixels)), _samples]
        for fn in steps:
            ds = ds.map_batches(fn, **args)
        out[name] = ds
    return _quiet(out)


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
    log.info("feature cache: %.1f MB on disk, %s", stored / 1e6, "held in memory" if stored <= budget else "read every epoch")
    return stored <= budget


def _quiet(named: dict) -> dict:
    """No progress bars for the epochs' data (a line an epoch says where training is)."""
    for ds in named.values():
        ds.context.enable_progress_bars = False
        ds.context.enable_operator_progress_bars = False
    return named


def _samples(batch: dict) -> dict:
    keep = np.flatnonzero(~failed(batch))
    return {"pixels": batch["pixels"][keep], "label": batch["label"][keep]}


@dataclass(frozen=True)
class LoopConfig:
    """Everything a worker needs (picklable). `head`/`classes` are their to_dict() forms."""

    output: str
    run_id: str
    head: dict
    classes: dict
    backbone: str
    backbone_weights: str | None
    resolution: int
    cached: bool
    epochs: int
    batch_size: int  # per worker
    steps_per_epoch: int
    schedule: Schedule
    class_weights: tuple[float, ...] | None = None
    precision: str = "auto"
    seed: int = 0
    settings: dict = field(default_factory=dict)  # the job's options, stored with the state
    storage_options: dict | None = None
    weights_env: dict = field(default_factory=dict)  # the driver's DINOSEG_HUB/CACHE (model.weights.weights_env)


def fit(loop: LoopConfig, data: dict, workers: int, use_gpu: bool, cpus_per_worker: float | None,
        max_failures: int = 2):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .train_loop import train_loop

    resources = {"CPU": cpus_per_worker} if cpus_per_worker else None
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"loop": loop},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"dinoseg-train-{loop.run_id}",
            storage_path=os.path.join(tempfile.gettempdir(), "dinoseg-ray-train"),
            failure_config=FailureConfig(max_failures=max_failures),  # workers resume from last.pt
        ),
        datasets=data,
        dataset_config=_data_config(),
    )
    return trainer.fit()


def _data_config():
    from ray.train import DataConfig

    # train is split evenly between workers (DDP needs equal steps); every worker reads the
    # whole validation set and evaluates every world_size-th batch of it, so the order of the
    # batches must be the same on every worker
    val = DataConfig.default_ingest_options()
    val.preserve_order = True
    return DataConfig(datasets_to_split=["train"], execution_options={"val": val})


def steps_per_epoch(n_train: int, workers: int, batch_size: int) -> int:
    return math.ceil((n_train // workers) / batch_size)


def describe(record: dict) -> str:
    miou = record.get("val_miou")
    val = f"val mIoU {miou:.4f}" if isinstance(miou, float) else "no validation"
    return (f"epoch {record['epoch']}/{record['epochs']}: loss {record['train_loss']:.4f}, {val}, "
            f"lr {record['lr']:.2e}, {record['seconds']:.1f}s")


def write_text(url: str, text: str, storage_options: dict | None) -> None:
    from .sinks import write_bytes_atomic

    write_bytes_atomic(url, text.encode(), storage_options)


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)
