"""`run_export(config)`: `dinoseg export LABELS OUTPUT --format coco|cvat|labelstudio`.

Turns a mask folder (the OUTPUT of `segment` or `pseudo-label`) into what labeling tools import
(`pipeline.label.exporters` has the formats). Thin: finds the masks, the class map and each image's
reference, reads and decodes masks in a thread pool, and feeds them to the exporter in listing
order. A mask that cannot be read or holds values outside the class map is counted, reported and
skipped, never fatal, unless none is left.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import repeat
from typing import Optional

from model.errors import DinosegError
from model.storage import options_for
from pipeline.io.files import bounded_map
from pipeline.options import argument, option, storage_options_option

log = logging.getLogger("dinoseg.export")
MAX_EXAMPLES = 5


@dataclass
class ExportConfig:
    # a segment / pseudo-label OUTPUT (masks under masks/), or a folder of masks
    labels: str = argument(
        "OUTPUT folder (or fsspec URL) of `dinoseg segment` or `pseudo-label`; masks are LABELS/masks/<key>.png, or LABELS itself when it has no masks/."
    )
    output: str = argument("Folder or fsspec URL prefix to write the export to.")
    format: str = option(
        "coco",
        "coco: OUTPUT/annotations.json (one RLE per class per image). "
        "cvat: 'Segmentation mask 1.1' (labelmap.txt, ImageSets/Segmentation/default.txt, SegmentationClass/<key>.png). "
        "labelstudio: OUTPUT/tasks.json (brush predictions) + OUTPUT/labeling_config.xml.",
    )
    classes: Optional[str] = option(
        None, "Class-map file (YAML/JSON) or a bundled name: voc2012, ade20k. Default: LABELS/classes.yaml."
    )
    images: Optional[str] = option(
        None,
        "Folder or prefix of the original images, paired with the masks by key. "
        "Default: the `path` column of LABELS/predictions/*.parquet and LABELS/labels/*.parquet; "
        "a mask without one is named by its key (e.g. 'a/b', no extension).",
    )
    zip: bool = option(
        False, "cvat: also write OUTPUT.zip, the archive CVAT's 'Upload annotations' takes.", flag="--zip"
    )
    from_name: str = option("tag", "labelstudio: the BrushLabels name in the labeling config.")
    to_name: str = option("image", "labelstudio: the Image name in the labeling config.")
    model_version: str = option("dinoseg", "labelstudio: the predictions' model_version.")
    storage_options: dict = storage_options_option()
    threads: int = 16  # masks read at once: object-store GETs mostly wait on the network


def summary(result: dict) -> str:
    counts = result["counts"]
    lines = [f"{k:<9} {counts[k]:>10,}" for k in ("masks", "exported", "failed")]
    lines += [f"    {example}" for example in result["examples"]]
    if result["unnamed"]:
        lines.append(
            f"{result['unnamed']:,} masks had no image reference and are named by their key: pass --images to pair them."
        )
    lines += [f"wrote {url}" for url in result["files"]]
    return "\n".join(lines)


def run_export(config: ExportConfig) -> dict:
    """The whole job; returns {counts: {masks, exported, failed}, examples, unnamed, files, arguments}."""
    from model.storage import scope_config
    from pipeline.io.files import absolute_output
    from pipeline.label.exporters import make_exporter

    config = scope_config(config)  # plain storage options for the URLs it names, as on a command line

    so = config.storage_options or None
    labels = absolute_output(config.labels).rstrip("/")
    output = absolute_output(config.output).rstrip("/")
    mask_root = _mask_root(labels, so)
    classes = _classes(config.classes, labels, so)
    exporter = make_exporter(
        config.format,
        output,
        classes,
        so,
        zip=config.zip,
        from_name=config.from_name,
        to_name=config.to_name,
        model_version=config.model_version,
    )
    exporter.begin()  # checks the class map against the format before any listing or reading
    try:
        return _export(config, exporter, mask_root, labels, classes)
    except BaseException:
        exporter.abort()
        raise


def _export(config: ExportConfig, exporter, mask_root: str, labels: str, classes) -> dict:
    from pipeline.data.sources import ReadBytes
    from pipeline.label.exporters import ExportItem, stray_values

    so = config.storage_options or None
    masks, failures = _list_masks(mask_root, so)
    refs = _image_refs(config.images, labels, so)
    counts = {"masks": len(masks) + len(failures), "exported": 0, "failed": 0}
    examples: list[str] = []
    unnamed = 0

    def fail(message: str) -> None:
        counts["failed"] += 1
        if len(examples) < MAX_EXAMPLES:
            examples.append(message)

    for message in failures:
        fail(message)
    reader = ReadBytes(so)

    def prepare(row: tuple[str, str]):
        key, path = row
        mask = _read_mask(reader, key, path)
        if isinstance(mask, str):
            return mask
        stray = stray_values(mask, classes)
        if stray:
            return f"{key}: values {stray} are neither classes 0..{len(classes) - 1} nor the ignore index {classes.ignore_index}."
        ref = refs.get(key)
        if ref and ref[1] is not None and ref[1] != mask.shape:
            return f"{key}: the mask is {mask.shape[1]}x{mask.shape[0]} but its image is {ref[1][1]}x{ref[1][0]}: re-run segment for it."
        try:
            return exporter.encode(ExportItem(key, ref[0] if ref else key, mask)), ref is None
        except (DinosegError, OSError) as e:
            return f"{key}: {e}"

    for done, outcome in enumerate(bounded_map(prepare, masks, max(1, config.threads), "dinoseg-export"), 1):
        if isinstance(outcome, str):
            fail(outcome)
        else:
            exporter.add(outcome[0])
            counts["exported"] += 1
            unnamed += outcome[1]
        if done % 1000 == 0:
            log.info("exported %d of %d masks", done, len(masks))
    if not counts["exported"]:
        raise DinosegError(
            f"none of the {counts['masks']} masks under '{mask_root}' could be exported (e.g. {examples[0]}): fix the masks or the class map."
        )
    files = exporter.finish()
    arguments = {k: v for k, v in vars(config).items() if k != "storage_options"} | {
        "storage_options": sorted(config.storage_options)
    }
    return {"counts": counts, "examples": examples, "unnamed": unnamed, "files": files, "arguments": arguments}


def _mask_root(labels: str, storage_options: dict | None) -> str:
    from fsspec.core import url_to_fs

    try:
        fs, root = url_to_fs(labels, **options_for(labels, storage_options))
        if fs.isdir(f"{root}/masks"):
            return f"{labels}/masks"
        if fs.isdir(root):
            return labels
    except (OSError, ValueError, ImportError) as e:
        raise DinosegError(f"cannot open LABELS '{labels}' ({e}): check the URL and the storage options.") from None
    raise DinosegError(
        f"LABELS '{labels}' is not a folder: pass the OUTPUT folder of `dinoseg segment` or `dinoseg pseudo-label`."
    )


def _classes(classes: Optional[str], labels: str, storage_options: dict | None):
    from fsspec.core import url_to_fs

    from model.classes import load_class_map

    if classes:
        return load_class_map(classes, storage_options).require_own_values(classes, "export reads", ignore_too=False)
    default = f"{labels}/classes.yaml"
    fs, path = url_to_fs(default, **options_for(default, storage_options))
    if not fs.isfile(path):
        raise DinosegError(
            f"'{default}' does not exist, so the class names are unknown: pass --classes with a class-map file or a bundled name (ade20k, voc2012)."
        )
    return load_class_map(default, storage_options)


def _list_masks(mask_root: str, storage_options: dict | None) -> tuple[list[tuple[str, str]], list[str]]:
    """[(key, path)] of the mask PNGs, and the messages of the files that cannot be keyed."""
    from pipeline.data.sources import list_inputs

    masks, failures = [], []
    try:
        for row in list_inputs(mask_root, storage_options):
            if row["error_stage"]:
                failures.append(str(row["error_message"]))
            elif row["path"].lower().endswith(".png"):
                masks.append((row["key"], row["path"]))
    except DinosegError as e:
        raise DinosegError(f"LABELS: {e}") from None
    if not masks and not failures:
        raise DinosegError(
            f"'{mask_root}' holds no mask PNGs: pass the OUTPUT folder of `dinoseg segment` or `dinoseg pseudo-label`."
        )
    return masks, failures


def _image_refs(images: Optional[str], labels: str, storage_options: dict | None) -> dict[str, tuple]:
    """{key: (image URL, (height, width) or None)}: from --images, else the Parquet rows of LABELS."""
    if images:
        from pipeline.data.sources import list_inputs

        return {r["key"]: (r["path"], None) for r in list_inputs(images, storage_options) if not r["error_stage"]}
    import pyarrow.parquet as pq
    from fsspec.core import url_to_fs

    refs: dict[str, tuple] = {}
    for folder in ("predictions", "labels"):
        fs, root = url_to_fs(f"{labels}/{folder}", **options_for(f"{labels}/{folder}", storage_options))
        if not fs.isdir(root):
            continue
        for path in sorted(fs.find(root)):
            name = path.rsplit("/", 1)[-1]
            if not name.endswith(".parquet") or name.startswith("."):
                continue
            with fs.open(path, "rb") as f:
                parquet = pq.ParquetFile(f)
                columns = [c for c in ("key", "path", "height", "width") if c in parquet.schema_arrow.names]
                if "key" not in columns or "path" not in columns:
                    log.warning("%s has no key/path columns; its rows give no image references", path)
                    continue
                table = parquet.read(columns=columns).to_pydict()
            sizes = (
                zip(table["height"], table["width"], strict=True)
                if "height" in table and "width" in table
                else repeat(None)
            )
            # sizes is repeat(None) when the rows have no size: only key and path are parallel lists
            for key, url, size in zip(table["key"], table["path"], sizes, strict=False):
                refs[key] = (url, tuple(size) if size and None not in size else None)
    return refs


def _read_mask(reader, key: str, path: str):
    """The decoded mask, or why it is not one."""
    from pipeline.data.schema import object_array
    from pipeline.io.masks import decode_mask_png

    batch = reader({"path": object_array([path]), "key": object_array([key])})
    if batch["error_stage"][0]:
        return f"{key}: {batch['error_message'][0]}"
    try:
        return decode_mask_png(batch["bytes"][0])
    except Exception as e:  # corrupt, truncated, RGB, not an image at all: the mask is skipped
        why = "not an image" if type(e).__name__ == "UnidentifiedImageError" else f"{type(e).__name__}: {e}"
        return f"{key}: '{path}' cannot be decoded as an index mask ({why})."
