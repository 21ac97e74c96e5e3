"""What self-train's rounds run on a head: its pseudo-label pass and, with --start-head, its
score on the validation set (segment, then compare every mask with its ground truth), and the
start head's checks."""

from __future__ import annotations

import logging
from dataclasses import replace

from model.errors import DinosegError
from pipeline.label import run_pseudo_label
from pipeline.segment import SegmentConfig

log = logging.getLogger("dinoseg.self_train")


def check_start_head(start: str, base) -> None:
    """The start head loads, and predicts the classes --classes names (its pseudo-labels are
    indices into its own class map)."""
    from model.classes import load_class_map
    from model.hub import load_head

    so = base.storage_options or None
    head = load_head(start, storage_options=so)
    classes = load_class_map(base.classes, so)
    if tuple(head.classes.names) != tuple(classes.names):
        shown = lambda names: ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")  # noqa: E731
        raise DinosegError(
            f"the start head {start} predicts {len(head.classes)} classes ({shown(head.classes.names)}) but --classes "
            f"{base.classes} names {len(classes)} ({shown(classes.names)}): pass the class map the head was built "
            "with, or build the head for these classes."
        )


def segment_config(config, head: str, images: str, output: str, predictions: str, base):
    """Segment `images` with `head` into `output`; redone from scratch when `predictions` came
    from another head (an earlier round was retrained). Returns (config, the head's checksum)."""
    from model.hub import load_head
    from pipeline.io.parts import read_parts

    loaded = load_head(head, storage_options=base.storage_options or None)
    earlier = read_parts(predictions, ["head_checksum"], base.storage_options or None)
    overwrite = earlier is not None and set(earlier["head_checksum"].to_pylist()) != {loaded.checksum}
    # the training backbone's weights are this head's only when it is on that backbone (a start head
    # may be on another: a large model distilled into a small one)
    same = loaded.backbone == base.backbone or base.backbone_weights == "random"
    seg = SegmentConfig(
        images,
        output,
        model=None,
        head=head,
        backbone_weights=base.backbone_weights if same else None,
        max_megapixels=base.max_megapixels,
        storage_options=base.storage_options,
        address=base.address,
        overwrite=overwrite,
        **{k: v for k, v in config.scale.items() if v is not None},
    )
    return seg, loaded.checksum


def pseudo_label(config, rule, head: str, output: str, base) -> dict:
    seg, checksum = segment_config(config, head, config.unlabeled, output, f"{output}/raw/predictions", base)
    return run_pseudo_label(replace(rule, segment=seg)) | {"head_checksum": checksum}


def score(config, head: str, val, folder: str, base) -> float | None:
    """Validation mIoU of `head`: segment the validation images into FOLDER/val and compare
    every mask with its ground truth (pairs matched by image URL) as `evaluate` compares them."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from model.classes import load_class_map
    from pipeline.data.metrics import scores
    from pipeline.evaluate import compare_masks
    from pipeline.io.files import write_bytes_atomic
    from pipeline.io.masks import mask_url
    from pipeline.io.parts import read_parts
    from pipeline.segment import run_segment

    so = base.storage_options or None
    buf = pa.BufferOutputStream()
    pacsv.write_csv(pa.table({"path": pa.array(val.images, pa.string())}), buf)
    manifest = f"{folder}/val-images.csv"
    write_bytes_atomic(manifest, buf.getvalue().to_pybytes(), so)
    seg, _ = segment_config(config, head, manifest, f"{folder}/val", f"{folder}/val/predictions", base)
    run_segment(seg)
    rows = read_parts(f"{folder}/val/predictions", ["key", "path"], so)
    predicted = dict(zip(rows["path"].to_pylist(), rows["key"].to_pylist(), strict=True)) if rows else {}
    pairs = [  # an image that failed to segment is in FOLDER/val/errors
        (image, mask_url(f"{folder}/val", predicted[image]), mask)
        for image, mask in zip(val.images, val.masks, strict=True)
        if image in predicted
    ]

    def skip(reason: str, example: str) -> None:
        log.warning("a validation pair is left out of the score (%s): %s", reason.replace("_", " "), example)

    classes = load_class_map(base.classes, so)
    confusion, compared = compare_masks(pairs, classes, so, skip)
    return scores(confusion, classes.names)["miou"] if compared else None
