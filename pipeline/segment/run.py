"""`run_segment(config)`: the segment workflow (`dinoseg segment`, `python -m jobs.segment`).

Lists the inputs on the driver, resumes past the keys an earlier run of the same model finished,
hands the rest to the Ray Data graph (read + decode tasks -> predictor actors -> write tasks),
and streams the result rows into predictions/ and errors/ Parquet parts, then run.json.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace

from model.errors import DinosegError
from pipeline.segment.config import SegmentConfig, inference_config, shrink_for

log = logging.getLogger("dinoseg.segment")


def run_segment(config: SegmentConfig) -> dict:
    """Segment every image under config.input into config.output; returns the counts also
    written to run.json. Re-running resumes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from model.classes import save_class_map
    from model.weights import weights_env
    from pipeline import runtime
    from pipeline.data.decode import Decode, DecodeConfig
    from pipeline.data.schema import ERROR_SCHEMA, MASK_PNG_FIELD, PREDICTION_SCHEMA, RLE_FIELD
    from pipeline.data.sources import ReadBytes, list_inputs
    from pipeline.io.files import absolute_input
    from pipeline.io.parts import RollingParquetWriter
    from pipeline.io.records import versions, write_run_json
    from pipeline.segment.predict import Predict, PredictConfig
    from pipeline.segment.write import WriteConfig, WriteMasks

    started = time.time()
    so = config.storage_options or None
    out = config.output.rstrip("/")
    inference = inference_config(config)
    given = config  # what run.json records: the options as the user gave them
    if config.classes_text:  # the text tower runs here, once; the actors read the head file
        config = replace(config, head=_text_head(config, out, so), classes_text=None)
    # local files as absolute paths: the actors do not run in this process's folder
    predict_config = PredictConfig(
        config.model,
        config.backbone,
        absolute_input(config.head),
        absolute_input(config.backbone_weights),
        inference,
        config.device,
        keep_image=config.overlays,
        storage_options=so,
        weights_env=weights_env(),
    )
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
            listing_errors.append(
                {
                    "path": row["path"],
                    "key": row["key"],
                    "stage": row["error_stage"],
                    "error_type": row["error_type"],
                    "message": row["error_message"],
                }
            )
        elif row["key"] in done:
            counts["skipped"] += 1
        else:
            paths.append(row["path"])
            keys.append(row["key"])
    errors.write(pa.Table.from_pylist(listing_errors, schema=ERROR_SCHEMA))
    counts["failed"] += len(listing_errors)
    rows = pa.table(
        {
            "path": paths,
            "key": keys,
            "error_stage": [""] * len(keys),
            "error_type": [""] * len(keys),
            "error_message": [""] * len(keys),
        }
    )
    del paths, keys, listing_errors

    started_ray = False
    try:
        if len(rows):  # nothing left to do (a finished run re-run) needs no Ray at all
            started_ray = runtime.start_ray(config.address)
            resources = runtime.Resources(
                config.actors, config.gpus_per_actor, config.cpus_per_actor, config.decode_cpus, config.batch_size
            ).resolve(runtime.cluster_resources(joined=not started_ray))
            log.info("resources: %s", resources)
            write = WriteMasks(
                WriteConfig(
                    out,
                    classes,
                    config.masks,
                    config.rle,
                    config.overlays,
                    model_id,
                    checksum,
                    so,
                    confidence_bits=config.confidence,
                )
            )
            ds = runtime.build(
                rows,
                ReadBytes(so),
                Decode(DecodeConfig(config.max_megapixels, shrink_for(inference))),
                Predict,
                predict_config,
                write,
                resources,
            )
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
        "arguments": asdict(given) | {"storage_options": sorted(config.storage_options)},  # no secrets
        "head": config.head,
        "model": model_id,
        "head_checksum": checksum,
        "versions": versions(),
        "counts": counts,
        "wall_seconds": round(elapsed, 3),
        "images_per_second": round(counts["predicted"] / elapsed, 3) if elapsed else None,
    }
    write_run_json(out, info, so)
    if counts["inputs"] != counts["predicted"] + counts["skipped"] + counts["failed"]:
        raise RuntimeError(f"lost inputs: {counts}")  # must never happen; say so loudly
    return counts


def _text_head(config: SegmentConfig, out: str, so) -> str:
    """OUTPUT/text_head.pt for --classes-text: built on this machine, or the one an earlier run
    built for the same request (re-running resumes instead of rebuilding). Checked before it is
    written: the backbone's weights can be had, and OUTPUT holds no masks of another model (a head
    for other classes there is replaced only with --overwrite, whose run redoes every mask)."""
    import fsspec

    from model.checkpoint import save_head_checkpoint
    from model.dinotxt import BACKBONE
    from model.errors import WeightsError
    from model.hub import head_checksum
    from model.text_head import TextHeadRequest, build_text_head
    from model.weights import backbone_file, fetch_hub_file, load_checkpoint
    from pipeline.io.files import absolute_input

    url = f"{out}/text_head.pt"
    request = TextHeadRequest(config.classes_text, backbone=config.backbone)
    digest = request.digest(so)  # a bad class list or option fails here, before any weights are read
    fs, path = fsspec.core.url_to_fs(url, **(so or {}))
    if fs.exists(path):
        try:
            earlier = load_checkpoint(url, so)
        except WeightsError:
            earlier = None  # damaged: another head, as far as reuse goes
        meta = earlier.get("meta") if isinstance(earlier, dict) else None
        if isinstance(meta, dict) and meta.get("request") == digest:
            log.info("reusing %s (built for the same classes)", url)
            return url
        if not config.overwrite:
            raise DinosegError(
                f"{url} is a text head for other classes or options than --classes-text {config.classes_text!r}: "
                "pass --overwrite to rebuild it (every mask is redone), or give another OUTPUT."
            )
    if not config.backbone_weights:  # the backbone's file can be had, before minutes of text tower
        fetch_hub_file(backbone_file(request.backbone or BACKBONE), so)
    ckpt = build_text_head(request, storage_options=so)
    if not config.overwrite:  # masks of another model there: refused before the head is written
        _done_with_this_model(out, f"{ckpt.backbone}+{absolute_input(url)}", head_checksum(ckpt.state_dict), so)
    save_head_checkpoint(ckpt, url, so)
    return url


def _done_with_this_model(out: str, model_id: str, checksum: str, so) -> set[str]:
    """Keys an earlier run finished (resume). Masks of another model are not resumed into: a mix
    of two models' masks would pass for one run."""
    from pipeline.io.parts import read_parts

    table = read_parts(f"{out}/predictions", ["key", "model", "head_checksum"], so)
    if table is None:
        return set()
    seen = set(zip(table["model"].to_pylist(), table["head_checksum"].to_pylist(), strict=True))
    other = sorted(m for m in seen if m != (model_id, checksum))
    if other:
        raise DinosegError(
            f"{out} holds masks of another model ({other[0][0]}, head {other[0][1][:12]}) than this run's "
            f"({model_id}, head {checksum[:12]}): pass --overwrite to redo them, or give another OUTPUT."
        )
    return set(table["key"].to_pylist())
