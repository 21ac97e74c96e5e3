"""`run_segment(config)`: the segment workflow (`dinoseg segment`, `python -m jobs.segment`).

Lists the inputs on the driver, loads the model, takes OUTPUT's lease (`pipeline.io.lease`), then
resumes past the keys an earlier run with the same identity finished (`pipeline.segment.identity`),
hands the rest to the Ray Data graph (read + decode tasks -> predictor actors -> write tasks ->
publish tasks, which write predictions/), counts the keys that come back and streams the failed
rows into errors/ Parquet parts, then run.json.
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
    import pyarrow as pa

    from model.storage import scope_config
    from pipeline.io.lease import Lease
    from pipeline.io.places import refuse_nesting
    from pipeline.segment.resume import Resume, list_todo

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
    # one read of OUTPUT's parts: an earlier run's path -> key (those paths keep their keys whatever
    # siblings appeared since) and its done keys, which the listing drops as it goes
    resume, listing = (None if config.overwrite else Resume(out, so)), {}
    listed = list_todo(config.input, so, resume, listing)  # unsafe paths, key collisions...: error rows
    counts["inputs"] = listed.inputs
    if resume is not None:
        resume.release()  # the recorded keys: what remains is the rows to do
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
        # the one resume check; a new text head's masks included, before that head is written; the
        # keys of parts published since OUTPUT was read (by the run that held the lease) are done too
        done = pa.array([], pa.string()) if resume is None else resume.check(identity, given)
        if new_head is not None:
            from model.checkpoint import save_head_checkpoint

            save_head_checkpoint(new_head, config.head, so)
        counts = _run_graph(
            config, given, out, so, started, counts, listed, listing, done,
            predict_config, classes, model_id, checksum, identity, lease,
        )  # fmt: skip
    finally:
        lease.release()
    return counts


def _load_model(config: SegmentConfig, inference, so, unsaved=None):
    """The model checked once on the driver: (predict config, classes, model id, head checksum, identity).
    A wrong name, path or weights file fails here in one sentence, before any cluster work.
    `unsaved`: the text head config.head names, not written there yet: loaded from a local copy,
    and named (model id, identity) as the file it will be."""
    from model.describe import describe_segmenter
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
    # Described, not built: the head file and the backbone file's keys and shapes are checked
    # (model.describe), no backbone is made on the driver (a cluster's head node, often without
    # the actors' GPU or memory); the actors build the model.
    described = describe_segmenter(
        None if predict_config.head else predict_config.model,
        backbone=predict_config.backbone,
        head=predict_config.head,
        backbone_weights=predict_config.backbone_weights,
        config=predict_config.inference,
        storage_options=so,
    )
    classes, model_id, checksum = described.classes, described.model_id, described.head_checksum
    predict_config = replace(
        predict_config,
        inference=described.config,
        keep_confidence=bool(config.confidence),
        mean_confidence=config.mean_confidence,
    )  # with the resolution resolved
    identity = identity_of(described, predict_config.backbone_weights, so)
    if config.max_classes and len(classes) > config.max_classes:
        raise DinosegError(f"{model_id} has {len(classes)} classes; {config.max_classes_reason}")
    return predict_config, classes, model_id, checksum, identity


def _run_graph(
    config, given, out, so, started, counts, listed, listing, done,
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
    from pipeline.data.schema import ERROR_FIELDS, ERROR_SCHEMA, error_rows
    from pipeline.data.sources import ReadBytes
    from pipeline.io.files import sweep_temp_files
    from pipeline.io.parts import RollingParquetWriter
    from pipeline.io.records import versions, write_run_json, write_text
    from pipeline.segment.identity import digest, write_identity
    from pipeline.segment.predict import Predict
    from pipeline.segment.publish import PublishParts, account, part_batch_rows
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

    # predictions/ parts are published by the graph's own tasks (pipeline.segment.publish), each after
    # reading the lease; the driver writes errors/. A run whose lease was taken over publishes no more
    # parts: the new holder redoes their keys
    errors = RollingParquetWriter(f"{out}/errors", ERROR_SCHEMA, so, max_rows=100_000, guard=lease.check)

    todo = listed.todo  # the listing's rows whose keys are not done (`pipeline.segment.resume`)
    counts["skipped"] += listed.done
    if len(done):  # done since OUTPUT was read (`Resume.check`): an anti-join in Arrow
        left = pc.invert(pc.is_in(todo["key"], value_set=done))
        counts["skipped"] += len(todo) - pc.sum(left).as_py()
        todo = todo.filter(left)
    errors.write(error_rows(listed.errors))
    counts["failed"] += len(listed.errors)
    if listing.get("unlisted_folders"):  # their images are unknown: the summary says the listing is incomplete
        counts["unlisted_folders"] = listing["unlisted_folders"]
        log.warning(
            "%d folders could not be listed: their images are missing from this run", counts["unlisted_folders"]
        )
    rows = todo.combine_chunks()
    for name in ERROR_FIELDS:
        rows = rows.append_column(name, pa.repeat(pa.scalar("", pa.string()), len(rows)))
    del todo, listed

    started_ray, failure = False, None
    try:
        if len(rows):  # nothing left to do (a finished run re-run) needs no Ray at all
            started_ray = runtime.start_ray(config.address)
            resources = runtime.Resources(
                config.actors, config.gpus_per_actor, config.cpus_per_actor, config.decode_cpus, config.batch_size
            ).resolve(runtime.cluster_resources(joined=not started_ray))
            log.info("resources: %s", resources)
            write_config = WriteConfig(
                out,
                classes,
                config.masks,
                config.rle,
                config.overlays,
                model_id,
                checksum,
                so,
                confidence_bits=config.confidence,
                identity=ident,
                run_id=lease.run_id,
            )
            ds = runtime.build(
                rows,
                ReadBytes(so),
                Decode(DecodeConfig(config.max_megapixels, shrink_for(inference))),
                Predict,
                predict_config,
                WriteMasks(write_config),
                resources,
                publish=PublishParts(write_config),
                part_rows=part_batch_rows(config.masks),
            )
            for table in runtime.iter_results(ds):  # keys and errors only: the rows are published
                account(table, errors, counts, lease)  # stops once another run took OUTPUT over
    except BaseException as e:
        failure = e  # what the user is told: a failure to close the writers after it does not replace it
        raise
    finally:
        try:
            # each part tried again; unpublished rows fail the run only here; dropped once the lease is lost
            _after(failure, lambda: lease.close_writers(errors))
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
