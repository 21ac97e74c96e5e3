"""`run_segment(config)`: the segment workflow (`dinoseg segment`, `python -m jobs.segment`).

Lists the inputs on the driver, loads the model, takes OUTPUT's lease (`pipeline.io.lease`), then
resumes past the keys an earlier run with the same identity finished (`pipeline.segment.identity`),
hands the rest to the Ray Data graph (read + decode tasks -> predictor actors -> write tasks),
and streams the result rows into predictions/ and errors/ Parquet parts, then run.json.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace

from model.errors import DinosegError
from model.storage import options_for
from pipeline.segment.config import SegmentConfig, inference_config, shrink_for

log = logging.getLogger("dinoseg.segment")


def run_segment(config: SegmentConfig) -> dict:
    """Segment every image under config.input into config.output; returns the counts also
    written to run.json. Re-running resumes."""
    from model.storage import scope_config
    from pipeline.data.keys import recorded_keys
    from pipeline.data.sources import list_inputs
    from pipeline.io.lease import Lease
    from pipeline.io.places import refuse_nesting
    from pipeline.segment.identity import done_keys

    config = scope_config(config)  # plain storage options for the URLs it names, as on a command line

    started = time.time()
    so = config.storage_options or None
    out = config.output.rstrip("/")
    refuse_nesting(config.input, out)  # an OUTPUT inside INPUT: refused before anything is read or written
    inference = inference_config(config)
    given = config  # what run.json records: the options as the user gave them

    # Nothing is written before INPUT is listed (a typo'd INPUT fails here), the model is loaded
    # and the lease is held; resume's identity is checked before --overwrite removes anything.
    counts = {"inputs": 0, "predicted": 0, "skipped": 0, "failed": 0}
    paths, keys, listing_errors = [], [], []
    # an earlier run's path -> key: those paths keep their keys whatever siblings appeared since
    recorded, listing = ({} if config.overwrite else recorded_keys(out, so)), {}
    # overlays copy the image into OUTPUT: links out of INPUT are refused (pseudo-label runs this too)
    for row in list_inputs(config.input, so, recorded=recorded, stats=listing, refuse_outside_links=True):
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
        else:
            paths.append(row["path"])
            keys.append(row["key"])
    del recorded
    loaded = None if config.classes_text else _load_model(config, inference, so)  # a text head is built under the lease

    lease = Lease(out, "segment", so, take_over=config.take_over_lease)
    lease.acquire()
    try:
        new_head = None
        if config.classes_text:  # the text tower runs here, once; the actors read the head file
            url, new_head = _text_head(config, out, so)
            config = replace(config, head=url, classes_text=None)
            loaded = _load_model(config, inference, so, unsaved=new_head)
        predict_config, classes, model_id, checksum, identity = loaded
        inference = predict_config.inference
        # the one resume check; a new text head's masks included, before that head is written
        done = set() if config.overwrite else done_keys(out, identity, given, so)
        if new_head is not None:
            from model.checkpoint import save_head_checkpoint

            save_head_checkpoint(new_head, config.head, so)
        counts = _run_graph(
            config, given, out, so, started, counts, paths, keys, listing_errors, listing, done,
            predict_config, classes, model_id, checksum, identity, lease,
        )  # fmt: skip
    finally:
        lease.release()
    return counts


def _load_model(config: SegmentConfig, inference, so, unsaved=None):
    """The model loaded once on the driver: (predict config, classes, model id, head checksum, identity).
    A wrong name, path or weights file fails here in one sentence, before any cluster work.
    `unsaved`: the text head config.head names, not written there yet: loaded from a local copy,
    and named (model id, identity) as the file it will be."""
    from model.weights import weights_env
    from pipeline.io.files import absolute_input
    from pipeline.segment.identity import identity_of
    from pipeline.segment.predict import PredictConfig

    if unsaved is not None:
        import tempfile

        from model.checkpoint import save_head_checkpoint
        from model.redact import redact_text

        with tempfile.TemporaryDirectory(prefix="dinoseg-head-") as tmp:
            save_head_checkpoint(unsaved, f"{tmp}/text_head.pt")
            predict_config, classes, _, checksum, identity = _load_model(
                replace(config, head=f"{tmp}/text_head.pt", max_classes=None), inference, so
            )
        head = absolute_input(config.head)
        model_id = f"{unsaved.backbone}+{head}"  # as model.hub names a head file's model
        if config.max_classes and len(classes) > config.max_classes:
            raise DinosegError(f"{model_id} has {len(classes)} classes; {config.max_classes_reason}")
        identity = {**identity, "model": redact_text(model_id)}
        return replace(predict_config, head=head), classes, model_id, checksum, identity

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
    # On the CPU: the driver (a cluster's head node) may have no GPU even when the actors do.
    segmenter = replace(predict_config, device="cpu").build()
    classes, model_id, checksum = segmenter.classes, segmenter.model_id, segmenter.head_checksum
    predict_config = replace(
        predict_config, inference=segmenter.config, keep_confidence=bool(config.confidence)
    )  # with the resolution resolved
    identity = identity_of(segmenter, predict_config.backbone_weights, so)
    del segmenter
    if config.max_classes and len(classes) > config.max_classes:
        raise DinosegError(f"{model_id} has {len(classes)} classes; {config.max_classes_reason}")
    return predict_config, classes, model_id, checksum, identity


def _run_graph(
    config, given, out, so, started, counts, paths, keys, listing_errors, listing, done,
    predict_config, classes, model_id, checksum, identity, lease,
) -> dict:  # fmt: skip
    """Under the lease: OUTPUT prepared (temp files swept, --overwrite's removal, classes.yaml),
    the graph run, rows and run.json written."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from model.classes import class_map_text
    from pipeline import runtime
    from pipeline.data.decode import Decode, DecodeConfig
    from pipeline.data.error_log import compact_errors
    from pipeline.data.schema import (
        ERROR_SCHEMA,
        IDENTITY_FIELD,
        MASK_PNG_FIELD,
        PREDICTION_SCHEMA,
        RLE_FIELD,
        error_rows,
    )
    from pipeline.data.sources import ReadBytes
    from pipeline.io.files import sweep_temp_files
    from pipeline.io.parts import RollingParquetWriter
    from pipeline.io.records import versions, write_run_json, write_text
    from pipeline.segment.identity import digest, write_identity
    from pipeline.segment.predict import Predict
    from pipeline.segment.write import WriteConfig, WriteMasks

    inference = predict_config.inference
    ident = digest(identity)
    # writing starts here: the temp files a killed run left go first (the run holds OUTPUT)
    sweep_temp_files(out, so)
    if config.overwrite:  # the rows describe this run only: the earlier run's are dropped (its masks get redone)
        from pipeline.io.parts import remove_parts

        remove_parts(f"{out}/predictions", so)
        remove_parts(f"{out}/errors", so)
    # both tried again while the store fails transiently (write_text), atomically
    write_identity(out, identity, so)  # what a refusal names
    write_text(f"{out}/classes.yaml", class_map_text(classes, "classes.yaml"), so)  # export, train, evaluate read it

    schema = PREDICTION_SCHEMA
    if config.masks in ("parquet", "both"):
        schema = schema.append(MASK_PNG_FIELD)
    if config.rle:
        schema = schema.append(RLE_FIELD)
    # a run whose lease was taken over publishes no more parts: the new holder redoes their keys
    predictions = RollingParquetWriter(f"{out}/predictions", schema.append(IDENTITY_FIELD), so, guard=lease.check)
    errors = RollingParquetWriter(f"{out}/errors", ERROR_SCHEMA, so, max_rows=100_000, guard=lease.check)

    if done:
        kept = [i for i, k in enumerate(keys) if k not in done]
        counts["skipped"] += len(keys) - len(kept)
        paths, keys = [paths[i] for i in kept], [keys[i] for i in kept]
    errors.write(error_rows(pa.Table.from_pylist(listing_errors, schema=ERROR_SCHEMA)))
    counts["failed"] += len(listing_errors)
    if listing.get("unlisted_folders"):  # their images are unknown: the summary says the listing is incomplete
        counts["unlisted_folders"] = listing["unlisted_folders"]
        log.warning(
            "%d folders could not be listed: their images are missing from this run", counts["unlisted_folders"]
        )
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

    started_ray, failure = False, None
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
                lease.check()  # taken over by another run (this one was thought dead): stop writing rows
                ok = table["ok"]
                done_rows = table.filter(ok).select(schema.names)
                done_rows = done_rows.append_column(IDENTITY_FIELD, pa.array([ident] * len(done_rows), pa.string()))
                failed_rows = table.filter(pc.invert(ok)).select(ERROR_SCHEMA.names)
                predictions.write(done_rows)
                errors.write(failed_rows)
                counts["predicted"] += len(done_rows)
                counts["failed"] += len(failed_rows)
    except BaseException as e:
        failure = e  # what the user is told: a failure to close the writers after it does not replace it
        raise
    finally:
        try:
            # each part tried again; unpublished rows fail the run only here; dropped once the lease is lost
            _after(failure, lambda: lease.close_writers(predictions, errors))
        finally:
            if started_ray:
                runtime.stop_ray()
    lease.check()  # compaction removes parts: never another holder's
    compact_errors(f"{out}/errors", f"{out}/predictions", so, errors.run)  # errors/: the latest state
    elapsed = time.time() - started
    info = {
        "arguments": asdict(given) | {"storage_options": sorted(config.storage_options)},  # no secrets
        "head": config.head,
        "model": model_id,
        "head_checksum": checksum,
        "identity": identity,  # what resume checks (pipeline.segment.identity)
        "identity_digest": ident,
        "versions": versions(),
        "counts": counts,
        "listing": {"complete": not listing.get("unlisted_folders"), **listing},
        "wall_seconds": round(elapsed, 3),
        "images_per_second": round(counts["predicted"] / elapsed, 3) if elapsed else None,
    }
    lease.check()
    write_run_json(out, info, so)
    if counts["inputs"] != counts["predicted"] + counts["skipped"] + counts["failed"]:
        raise RuntimeError(f"lost inputs: {counts}")  # must never happen; say so loudly
    return counts


def _after(failure: BaseException | None, close) -> None:
    """close(); when the run already failed with `failure`, a failure of close() is logged, not
    raised, so that the first failure (a lease lost, a store down, Ctrl-C) is the one reported."""
    try:
        close()
    except Exception as e:
        if failure is None:
            raise
        if str(e) != str(failure):
            log.warning(
                "after %s, closing the result parts failed too: %s: %s", type(failure).__name__, type(e).__name__, e
            )


def _text_head(config: SegmentConfig, out: str, so):
    """(OUTPUT/text_head.pt, None) for --classes-text when an earlier run built it for the same
    request (re-running resumes instead of rebuilding); else (that URL, the head built on this
    machine), for the caller to write once resume's identity check passed (OUTPUT holds no masks
    of another model). The backbone's weights can be had before the text tower runs; a head for
    other classes there is replaced only with --overwrite, whose run redoes every mask."""
    import fsspec

    from model.dinotxt import BACKBONE
    from model.errors import WeightsError
    from model.text_head import TextHeadRequest, build_text_head
    from model.weights import backbone_file, fetch_hub_file, load_checkpoint

    url = f"{out}/text_head.pt"
    request = TextHeadRequest(config.classes_text, backbone=config.backbone)
    digest = request.digest(so)  # a bad class list or option fails here, before any weights are read
    fs, path = fsspec.core.url_to_fs(url, **options_for(url, so))
    if fs.exists(path):
        try:
            earlier = load_checkpoint(url, so)
        except WeightsError:
            earlier = None  # damaged: another head, as far as reuse goes
        meta = earlier.get("meta") if isinstance(earlier, dict) else None
        if isinstance(meta, dict) and meta.get("request") == digest:
            log.info("reusing %s (built for the same classes)", url)
            return url, None
        if not config.overwrite:
            raise DinosegError(
                f"{url} is a text head for other classes or options than --classes-text {config.classes_text!r}: "
                "pass --overwrite to rebuild it (every mask is redone), or give another OUTPUT."
            )
    if not config.backbone_weights:  # the backbone's file can be had, before minutes of text tower
        fetch_hub_file(backbone_file(request.backbone or BACKBONE))
    return url, build_text_head(request, storage_options=so)
