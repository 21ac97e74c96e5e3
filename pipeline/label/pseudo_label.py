"""`run_pseudo_label(config)`: `dinoseg pseudo-label INPUT OUTPUT` / `python -m jobs.pseudo_label`.

Two passes, both resumable:
1. the model pass: a `segment` run (the same inputs, model and scale options, resume and
   errors/ accounting) into OUTPUT/raw, which also keeps each image's 16-bit confidence map;
2. the selection pass (CPU tasks): the rule turns raw predictions into OUTPUT/masks/<key>.png
   with 255 where the model is unsure, and one row per image into OUTPUT/labels/*.parquet.
   A re-run with another rule redoes only this pass; with the same rule it skips finished keys.

Layout (what `dinoseg train OUTPUT/pairs.csv --classes OUTPUT/classes.yaml` reads):
    pairs.csv       image,mask per selected image; the images are referenced, not copied
    masks/<key>.png, confidence/<key>.png (--confidence), labels/, errors/ (selection),
    classes.yaml, thresholds.json, selection.json, run.json, raw/ (the model pass)
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

from model.classes import IGNORE_INDEX
from model.errors import DinosegError
from pipeline.io.records import read_json, versions, write_json
from pipeline.options import option
from pipeline.segment import SegmentConfig, run_segment, summary_table

log = logging.getLogger("dinoseg.pseudo_label")

DEFAULT_THRESHOLD = 0.9
SELECT_BATCH = 16
HISTOGRAM_BATCH = 256


@dataclass
class PseudoLabelConfig:
    segment: SegmentConfig  # the model pass (its output is replaced by OUTPUT/raw)
    # None and no class_balanced: DEFAULT_THRESHOLD
    threshold: Optional[float] = option(
        None, f"Keep a pixel's class when its confidence >= T (default {DEFAULT_THRESHOLD})."
    )
    class_balanced: Optional[float] = option(
        None,
        "Per-class thresholds: each class keeps its most confident fraction P of its predicted pixels, over the whole collection.",
    )
    min_coverage: float = option(
        0.0, "Images with a smaller labeled fraction are listed in labels/ but not written as training pairs."
    )
    confidence: bool = option(False, "Also write confidence/<key>.png (0-255) beside each mask, for soft weighting.")

    @property
    def output(self) -> str:
        return self.segment.output

    def validate(self) -> "PseudoLabelConfig":
        from pipeline.label.pseudo import threshold_cutoff

        if self.threshold is not None and self.class_balanced is not None:
            raise DinosegError(
                "give --threshold or --class-balanced, not both: they are two rules for the same choice."
            )
        if self.class_balanced is not None and not 0 < self.class_balanced <= 1:
            raise DinosegError(
                f"--class-balanced {self.class_balanced} must be in (0, 1]: e.g. 0.5 keeps each class's most confident half."
            )
        if self.threshold is not None:
            threshold_cutoff(self.threshold)  # raises on a value outside [0, 1]
        if not 0 <= self.min_coverage <= 1:
            raise DinosegError(
                f"--min-coverage {self.min_coverage} must be between 0 and 1 (a fraction of the image's pixels)."
            )
        return self

    def rule(self) -> dict:
        if self.class_balanced is not None:
            return {"rule": "class-balanced", "fraction": self.class_balanced}
        return {"rule": "threshold", "threshold": DEFAULT_THRESHOLD if self.threshold is None else self.threshold}


def run_pseudo_label(config: PseudoLabelConfig) -> dict:
    """Both passes; returns the run's record (also OUTPUT/run.json)."""
    from model.storage import scope_config
    from pipeline.io.files import absolute_output
    from pipeline.io.lease import Lease
    from pipeline.io.places import refuse_nesting
    from pipeline.io.records import write_run_json

    config = scope_config(config)  # plain storage options for the URLs it names, as on a command line

    config.validate()
    started = time.time()
    seg = config.segment
    so = seg.storage_options or None
    out = absolute_output(seg.output).rstrip("/")
    raw = f"{out}/raw"
    rule = config.rule()
    refuse_nesting(seg.input, out)  # before the lease: an OUTPUT inside INPUT gets nothing written
    with Lease(out, "pseudo-label", so, take_over=seg.take_over_lease) as lease:  # the model pass holds raw/'s too
        model_counts, thresholds, rows = _passes(config, seg, out, raw, rule, so, lease)
        lease.check()  # taken over by another run meanwhile: that run writes pairs.csv and run.json
        result = _finish(out, so, rows, thresholds)
        result.update(
            model=model_counts,
            rule=rule,
            min_coverage=config.min_coverage,
            wall_seconds=round(time.time() - started, 3),
        )
        lease.check()
        write_run_json(out, {"arguments": _arguments(config), "versions": versions(), **result}, so)
    return result


def _passes(config: PseudoLabelConfig, seg, out: str, raw: str, rule: dict, so, lease):
    """The model pass and the selection pass, under OUTPUT's `lease` (checked before each write)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from model.classes import load_class_map, save_class_map
    from pipeline import runtime
    from pipeline.data.schema import ERROR_SCHEMA, error_rows
    from pipeline.io.masks import existing_keys
    from pipeline.io.parts import RollingParquetWriter, read_parts, remove_parts
    from pipeline.label import pseudo

    started_ray = runtime.start_ray(seg.address)
    try:
        model_counts = run_segment(
            replace(
                seg,
                output=raw,
                confidence=16,
                masks="png",
                rle=False,
                overlays=False,
                max_classes=IGNORE_INDEX,
                max_classes_reason=f"pseudo-labels are 8-bit masks with {IGNORE_INDEX} = unsure: use a model with at most {IGNORE_INDEX} classes.",
            )
        )
        lease.check()  # the model pass takes long: another run may hold OUTPUT by now
        classes = load_class_map(f"{raw}/classes.yaml", so)
        save_class_map(classes, f"{out}/classes.yaml", so)
        rows = _raw_rows(raw, so)
        select = pseudo.SelectConfig(
            out, raw, classes, (0,) * len(classes), config.min_coverage, 8 if config.confidence else 0, so
        )
        histogram = None
        if config.class_balanced is not None:
            histogram = _histogram(rows, select, len(classes), seg.decode_cpus)
            cutoffs = pseudo.balanced_cutoffs(histogram, config.class_balanced)
        else:
            cutoffs = [pseudo.threshold_cutoff(rule["threshold"])] * len(classes)
        select = replace(select, cutoffs=tuple(int(c) for c in cutoffs))
        thresholds = {**rule, "images": len(rows), "classes": pseudo.summarise_cutoffs(cutoffs, histogram, classes)}
        write_json(f"{out}/thresholds.json", thresholds, so)

        # the selection is redone when anything that decides it changed; else finished keys are skipped
        record = {
            **rule,
            "min_coverage": config.min_coverage,
            "confidence": config.confidence,
            "cutoffs": list(select.cutoffs),
            "model": _model_of(raw, so),
        }
        if read_json(f"{out}/selection.json", so) != record or seg.overwrite:
            if remove_parts(f"{out}/labels", so):
                log.info("the selection rule changed: selecting every image again")
            write_json(f"{out}/selection.json", record, so)
        remove_parts(f"{out}/errors", so)  # the keys that failed are not done: they are tried again
        done = read_parts(f"{out}/labels", ["key"], so)
        todo = rows if done is None else rows.filter(pc.invert(pc.is_in(rows["key"], done["key"].combine_chunks())))
        del done
        masks_now = existing_keys(out, so) if len(todo) else set()
        todo = todo.append_column("was_selected", pa.array([k in masks_now for k in todo["key"].to_pylist()]))

        lease.check()
        labels = RollingParquetWriter(f"{out}/labels", pseudo.LABEL_SCHEMA, so, guard=lease.check)
        errors = RollingParquetWriter(f"{out}/errors", ERROR_SCHEMA, so, max_rows=100_000, guard=lease.check)
        try:
            if len(todo):
                ds = runtime.map_rows(todo, pseudo.SelectLabels(select), SELECT_BATCH, seg.decode_cpus)
                for table in runtime.iter_results(ds):
                    lease.check()  # taken over by another run (this one was thought dead): stop writing rows
                    ok = table["ok"]
                    labels.write(table.filter(ok).select(pseudo.LABEL_SCHEMA.names))
                    errors.write(error_rows(table.filter(pc.invert(ok))))  # + retryable, from stage and type
        finally:
            lease.close_writers(labels, errors)  # dropped, not published, once the lease is lost
    finally:
        if started_ray:
            runtime.stop_ray()
    return model_counts, thresholds, rows


def _raw_rows(raw: str, so):
    """The model pass's finished rows (one per key: --overwrite runs add rows for the same key)."""
    import pyarrow as pa

    from pipeline.io.parts import read_parts

    columns = ["path", "key", "width", "height", "mask"]
    table = read_parts(f"{raw}/predictions", columns, so)
    if table is None or not len(table):
        return pa.table(
            {
                c: pa.array([], t)
                for c, t in (
                    ("path", pa.string()),
                    ("key", pa.string()),
                    ("width", pa.int32()),
                    ("height", pa.int32()),
                    ("mask", pa.string()),
                )
            }
        )
    keys = table["key"].to_pylist()
    last = {k: i for i, k in enumerate(keys)}
    return table.take(sorted(last.values())) if len(last) < len(keys) else table


def _histogram(rows, select, num_classes: int, cpus: float):
    import numpy as np

    from pipeline import runtime
    from pipeline.label import pseudo

    histogram = np.zeros((num_classes, pseudo.LEVELS), dtype=np.int64)
    if len(rows):
        # big batches: a batch's histogram is summed in its task, so fewer, denser ones travel
        ds = runtime.map_rows(rows, pseudo.ConfidenceHistogram(select), HISTOGRAM_BATCH, cpus)
        for table in runtime.iter_results(ds, batch_size=1):
            index, count = table["index"].combine_chunks(), table["count"].combine_chunks()
            pseudo.add_histogram(histogram, index.values.to_numpy(), count.values.to_numpy())
    return histogram


def _finish(out: str, so, rows, thresholds: dict) -> dict:
    """pairs.csv from every labels/ row that is a pair, and the counts."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    from pipeline.io.files import write_bytes_atomic
    from pipeline.io.parts import read_parts
    from pipeline.label.pseudo import LABEL_SCHEMA

    labels = read_parts(f"{out}/labels", ["path", "key", "selected", "coverage"], so)
    labels = (
        labels if labels is not None else LABEL_SCHEMA.empty_table().select(["path", "key", "selected", "coverage"])
    )
    errors = read_parts(f"{out}/errors", ["key"], so)
    failed = 0 if errors is None else len(errors)
    pairs = labels.filter(labels["selected"])
    masks = pc.binary_join_element_wise("masks/", pairs["key"], ".png", "")
    buf = pa.BufferOutputStream()
    pacsv.write_csv(pa.table({"image": pairs["path"], "mask": masks}), buf)
    write_bytes_atomic(f"{out}/pairs.csv", buf.getvalue().to_pybytes(), so)
    coverage = pc.mean(labels["coverage"]).as_py() if len(labels) else None
    counts = {"images": len(rows), "pairs": len(pairs), "below_coverage": len(labels) - len(pairs), "failed": failed}
    if counts["images"] != len(labels) + failed:
        raise RuntimeError(f"lost images in the selection: {counts}, {len(labels)} label rows")  # must never happen
    return {
        "counts": counts,
        "mean_coverage": None if coverage is None else round(coverage, 6),
        "pairs_csv": f"{out}/pairs.csv",
        "output": out,
        "thresholds": {c["name"]: c["threshold"] for c in thresholds["classes"]},
    }


def _model_of(raw: str, so) -> list:
    info = read_json(f"{raw}/run.json", so) or {}
    # the identity digest: a model pass with other weights or settings (--overwrite) redoes the selection
    return [info.get("model"), info.get("head_checksum"), info.get("identity_digest")]


def _arguments(config: PseudoLabelConfig) -> dict:
    args = asdict(config)
    args["segment"]["storage_options"] = sorted(config.segment.storage_options)  # names only: no secrets
    return args


def summary(result: dict) -> str:
    m, c = result["model"], result["counts"]
    rule = result["rule"]
    how = (
        f"confidence >= {rule['threshold']}"
        if rule["rule"] == "threshold"
        else f"class-balanced, top {rule['fraction']:.0%} per class"
    )
    lines = [
        "model pass (raw/):",
        *("  " + line for line in summary_table(m).splitlines()),
        f"selection ({how}, min coverage {result['min_coverage']}):",
        f"  pairs          {c['pairs']:,}",
        f"  below coverage {c['below_coverage']:,}",
        f"  failed         {c['failed']:,}",
        f"  mean coverage  {'-' if result['mean_coverage'] is None else format(result['mean_coverage'], '.1%')}",
        f"train on it:     dinoseg train {result['pairs_csv']} --classes {result['output']}/classes.yaml --output ...",
    ]
    return "\n".join(lines)
