"""`dinoseg segment INPUT OUTPUT` / `python -m jobs.segment INPUT OUTPUT` (what `ray job submit` runs).

Thin: turns options into configs, lists inputs on the driver, hands the graph to Ray Data, and
streams the result rows into predictions/ and errors/ Parquet files, then run.json and a summary.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Optional

import typer

from jobs.options import storage_options as parse_storage_options
from jobs.options import versions
from model.errors import DinosegError

log = logging.getLogger("dinoseg.segment")


class MaskFormat(str, Enum):
    png = "png"
    parquet = "parquet"
    both = "both"


class Mode(str, Enum):
    whole = "whole"
    slide = "slide"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass
class SegmentConfig:
    input: str
    output: str
    model: Optional[str] = "dinov2_vits14_voc2012_linear"
    backbone: Optional[str] = None
    head: Optional[str] = None
    backbone_weights: Optional[str] = None
    resolution: Optional[int] = None
    mode: str = "whole"
    crop: int = 512
    stride: int = 341
    tta: bool = False
    precision: str = "auto"
    batch_size: int = 8
    device: Optional[str] = None
    actors: Optional[int] = None
    gpus_per_actor: Optional[float] = None
    cpus_per_actor: Optional[float] = None
    decode_cpus: float = 0.5
    masks: str = "png"
    rle: bool = False
    overlays: bool = False
    confidence: int = 0  # bits of the confidence/<key>.png maps (8 or 16); 0: none
    overwrite: bool = False
    max_megapixels: float = 100.0
    storage_options: dict = field(default_factory=dict)
    address: Optional[str] = None
    max_classes: Optional[int] = None  # for callers whose outputs hold fewer classes (pseudo-labels: 255)
    max_classes_reason: str = ""


def command(
    input: str = typer.Argument(..., help="Folder, fsspec URL prefix, glob, or manifest (.txt/.csv/.parquet)."),
    output: str = typer.Argument(..., help="Folder or fsspec URL prefix for masks/, predictions/, errors/, run.json."),
    model: str = typer.Option("dinov2_vits14_voc2012_linear", help="Named segmentation model (see `dinoseg models`)."),
    backbone: Optional[str] = typer.Option(None, help="Backbone name, with --head of one of Meta's head files."),
    head: Optional[str] = typer.Option(None, help="Head checkpoint URL (trained by dinoseg; it names its backbone)."),
    backbone_weights: Optional[str] = typer.Option(None, help="Where the backbone's weights come from (path or URL)."),
    resolution: Optional[int] = typer.Option(None, help="Short side the image is resized to (default: the head's training resolution; 512 for Meta's)."),
    mode: Mode = typer.Option(Mode.whole, help="whole image, or Meta's sliding window."),
    crop: int = typer.Option(512, help="Sliding-window crop."),
    stride: int = typer.Option(341, help="Sliding-window stride."),
    tta: bool = typer.Option(False, help="Flip and Meta's multi-scale test-time augmentation (about 10x the work)."),
    precision: Precision = typer.Option(Precision.auto, help="auto: bf16 on a GPU, fp32 on the CPU."),
    batch_size: int = typer.Option(8, help="Images per predictor call."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda (default auto)."),
    actors: Optional[int] = typer.Option(None, help="Predictor actors (default: one per GPU, or one on the CPU)."),
    gpus_per_actor: Optional[float] = typer.Option(None, help="GPUs per predictor actor (default 1 with GPUs)."),
    cpus_per_actor: Optional[float] = typer.Option(None, help="CPUs reserved per predictor actor."),
    decode_cpus: float = typer.Option(0.5, help="CPUs per read/decode/write task."),
    masks: MaskFormat = typer.Option(MaskFormat.png, help="png files, rows in Parquet, or both."),
    rle: bool = typer.Option(False, help="Add per-class COCO RLE to the prediction rows."),
    overlays: bool = typer.Option(False, help="Write overlays/<key>.jpg to look at."),
    confidence: bool = typer.Option(False, help="Write confidence/<key>.png: the winning class's probability, 0-255."),
    overwrite: bool = typer.Option(False, help="Redo keys that an earlier run finished."),
    max_megapixels: float = typer.Option(100.0, help="Decompression-bomb limit."),
    storage_options: str = typer.Option("{}", help="JSON of fsspec storage options (endpoint, credentials...)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default RAY_ADDRESS, else local Ray)."),
) -> None:
    """Segment every image under INPUT; masks and rows go under OUTPUT. Re-running resumes."""
    config = segment_config(**locals())
    counts = run(config)
    typer.echo(summary(counts))


def segment_config(**options) -> SegmentConfig:
    """The config of the command's options (also what `pseudo-label`, which shares them, builds)."""
    options = {k: v.value if isinstance(v, Enum) else v for k, v in options.items()}
    options["storage_options"] = parse_storage_options(options.get("storage_options") or "{}")
    if options.get("head"):
        options["model"] = None  # a head names its own backbone and classes
    if "confidence" in options:
        options["confidence"] = 8 if options["confidence"] is True else int(options["confidence"] or 0)
    return SegmentConfig(**options)


def summary(counts: dict) -> str:
    from pipeline.segment.write import summary_table

    return summary_table(counts)


def inference_config(config: SegmentConfig):
    from model.segmenter import META_MS_SCALES, InferenceConfig

    extra = {"resolution": config.resolution}  # None: the head's (a dinoseg head names it; Meta's: 512)
    tta = {"flip": True, "scales": META_MS_SCALES} if config.tta else {}
    return InferenceConfig(mode=config.mode, crop=config.crop, stride=config.stride, precision=config.precision,
                           batch_size=config.batch_size, **extra, **tta).validate()


def run(config: SegmentConfig) -> dict:
    """The whole job; returns the counts also written to run.json."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from model.classes import save_class_map
    from pipeline import runtime
    from pipeline.data.decode import Decode, DecodeConfig
    from model.weights import weights_env
    from pipeline.segment.predict import Predict, PredictConfig
    from pipeline.io.parts import RollingParquetWriter
    from pipeline.data.schema import ERROR_SCHEMA, MASK_PNG_FIELD, PREDICTION_SCHEMA, RLE_FIELD
    from pipeline.segment.write import WriteConfig, WriteMasks
    from pipeline.io.files import absolute_input
    from pipeline.io.records import write_run_json
    from pipeline.data.sources import ReadBytes, list_inputs

    started = time.time()
    so = config.storage_options or None
    out = config.output.rstrip("/")
    inference = inference_config(config)
    # local files as absolute paths: the actors do not run in this process's folder
    predict_config = PredictConfig(config.model, config.backbone, absolute_input(config.head),
                                   absolute_input(config.backbone_weights), inference,
                                   config.device, keep_image=config.overlays, storage_options=so,
                                   weights_env=weights_env())
    # Load the model once on the driver first: a wrong name, path or weights file fails here in one
    # sentence, before any cluster work, and the classes are known for writing masks.
    # On the CPU: the driver (a cluster's head node) may have no GPU even when the actors do.
    segmenter = replace(predict_config, device="cpu").build()
    classes, model_id, checksum = segmenter.classes, segmenter.model_id, segmenter.head_checksum
    inference = segmenter.config  # with the resolution resolved
    predict_config = replace(predict_config, inference=inference, keep_confidence=bool(config.confidence))
    del segmenter
    if config.max_classes and len(classes) > config.max_classes:
        raise DinosegError(f"{model_id} has {len(classes)} classes; {config.max_classes_reason}")
    if config.overwrite:  # the rows describe this run only: the earlier run's are dropped (its masks get redone)
        from pipeline.io.parts import remove_parts

        remove_parts(f"{out}/predictions", so)
        remove_parts(f"{out}/errors", so)
    done = set() if config.overwrite else _done_with_this_model(out, model_id, checksum, so)
    save_class_map(classes, f"{out}/classes.yaml", so)  # what export, train and evaluate read

    schema = PREDICTION_SCHEMA
    if config.masks in ("parquet", "both"):
        schema = schema.append(MASK_PNG_FIELD)
    if config.rle:
        schema = schema.append(RLE_FIELD)
    predictions = RollingParquetWriter(f"{out}/predictions", schema, so)
    errors = RollingParquetWriter(f"{out}/errors", ERROR_SCHEMA, so, max_rows=100_000)

    counts = {"inputs": 0, "predicted": 0, "skipped": 0, "failed": 0}
    paths, keys, listing_errors = [], [], []
    for row in list_inputs(config.input, so):
        counts["inputs"] += 1
        if row["error_stage"]:  # unsafe path, key collision...: an error row, never read
            listing_errors.append({"path": row["path"], "key": row["key"], "stage": row["error_stage"],
                                   "error_type": row["error_type"], "message": row["error_message"]})
        elif row["key"] in done:
            counts["skipped"] += 1
        else:
            paths.append(row["path"])
            keys.append(row["key"])
    errors.write(pa.Table.from_pylist(listing_errors, schema=ERROR_SCHEMA))
    counts["failed"] += len(listing_errors)
    rows = pa.table({"path": paths, "key": keys, "error_stage": [""] * len(keys),
                     "error_type": [""] * len(keys), "error_message": [""] * len(keys)})
    del paths, keys, listing_errors

    started_ray = False
    try:
        if len(rows):  # nothing left to do (a finished run re-run) needs no Ray at all
            started_ray = runtime.start_ray(config.address)
            resources = runtime.Resources(config.actors, config.gpus_per_actor, config.cpus_per_actor, config.decode_cpus,
                                        config.batch_size).resolve(runtime.cluster_resources(joined=not started_ray))
            log.info("resources: %s", resources)
            write = WriteMasks(WriteConfig(out, classes, config.masks, config.rle, config.overlays, model_id, checksum, so,
                                           confidence_bits=config.confidence))
            ds = runtime.build(rows, ReadBytes(so), Decode(DecodeConfig(config.max_megapixels, shrink_for(inference))),
                             Predict, predict_config, write, resources)
            for table in runtime.iter_results(ds):
                ok = table["ok"]
                done_rows = table.filter(ok).select(schema.names)
                failed_rows = table.filter(pc.invert(ok)).select(ERROR_SCHEMA.names)
                predictions.write(done_rows)
                errors.write(failed_rows)
                counts["predicted"] += len(done_rows)
                counts["failed"] += len(failed_rows)
    finally:
        predictions.close()
        errors.close()
        if started_ray:
            runtime.stop_ray()
    elapsed = time.time() - started
    info = {
        "arguments": asdict(config) | {"storage_options": sorted(config.storage_options)},  # no secrets
        "model": model_id, "head_checksum": checksum, "versions": versions(),
        "counts": counts, "wall_seconds": round(elapsed, 3),
        "images_per_second": round(counts["predicted"] / elapsed, 3) if elapsed else None,
    }
    write_run_json(out, info, so)
    if counts["inputs"] != counts["predicted"] + counts["skipped"] + counts["failed"]:
        raise RuntimeError(f"lost inputs: {counts}")  # must never happen; say so loudly
    return counts


def _done_with_this_model(out: str, model_id: str, checksum: str, so) -> set[str]:
    """Keys an earlier run finished (resume). Masks of another model are not resumed into: a mix
    of two models' masks would pass for one run."""
    from pipeline.io.parts import read_parts

    table = read_parts(f"{out}/predictions", ["key", "model", "head_checksum"], so)
    if table is None:
        return set()
    seen = set(zip(table["model"].to_pylist(), table["head_checksum"].to_pylist()))
    other = sorted(m for m in seen if m != (model_id, checksum))
    if other:
        raise DinosegError(
            f"{out} holds masks of another model ({other[0][0]}, head {other[0][1][:12]}) than this run's "
            f"({model_id}, head {checksum[:12]}): pass --overwrite to redo them, or give another OUTPUT."
        )
    return set(table["key"].to_pylist())


def shrink_for(inference) -> int:
    """The short side decoding may shrink an image to: what the largest TTA view needs."""
    return int(round(inference.resolution * max(inference.scales)))


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.segment INPUT OUTPUT [options]`: the same options as `dinoseg segment`."""
    from jobs.cli import run_job

    return run_job(command, argv, "python -m jobs.segment")


if __name__ == "__main__":
    sys.exit(main())
