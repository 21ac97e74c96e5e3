"""`run_import(config)`: `dinoseg import SOURCE OUTPUT --format cvat|coco|labelstudio`.

Corrected labels come back from the labeling tools as a labeled set in the layout `train`,
`evaluate` and `self-train` read:

    OUTPUT/masks/<key>.png    index PNGs with the class map's palette, 255 = no label
    OUTPUT/pairs.csv          key, image (URL), mask (relative to OUTPUT): `dinoseg train OUTPUT/pairs.csv`
    OUTPUT/classes.yaml       the class map the masks index
    OUTPUT/problems.jsonl     one line per image skipped, or imported with something left out
    OUTPUT/import.json        the arguments, the counts and the time taken

The formats are `pipeline.label.imports`' readers; this is the command around them. Everything
is checked (SOURCE read, the class map, OUTPUT free or --overwrite) before anything is removed
or written. Keys follow `segment`'s rules, so an import of an export of `segment`'s masks gives
the same keys; a key that two images would share is a problem row for the second, never an
overwrite. An image with no labeled pixel is skipped (it would teach nothing).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import dataclass
from typing import Optional

from model.classes import ClassMap, default_color
from model.errors import DinosegError
from model.storage import options_for
from pipeline.io.files import bounded_map
from pipeline.label.imports import CROWDS, FORMATS, MATCHES, OVERLAPS
from pipeline.options import REQUIRED, argument, option, storage_options_option

log = logging.getLogger("dinoseg.import")
MAX_EXAMPLES = 5
OUTPUT_FILES = ("pairs.csv", "problems.jsonl", "classes.yaml", "import.json")
OTHER_RUNS = ("run.json", "predictions", "labels", "raw", "errors")  # segment / pseudo-label outputs


@dataclass
class ImportConfig:
    source: str = argument("The tool's export: a folder, a .zip or a .json file (local or any fsspec URL).")
    output: str = argument("Folder or fsspec URL prefix for the labeled set (masks/, pairs.csv, classes.yaml).")
    format: str = option(
        REQUIRED,
        "cvat: 'Segmentation mask 1.1' (labelmap.txt + SegmentationClass/). coco: COCO / COCO-Stuff JSON, or CVAT's "
        "'COCO 1.0'. labelstudio: Label Studio's JSON export.",
        choices=FORMATS,
    )
    classes: Optional[str] = option(
        None,
        "Class map (YAML/JSON, or voc2012, ade20k) whose names the labels are matched to and whose order the masks "
        "take. Default: the export's labels (CVAT labelmap order, COCO category-id order, Label Studio first use).",
    )
    images: Optional[str] = option(
        None,
        "Folder or prefix the export's image names are under (Label Studio uploads and local files, COCO relative "
        "file_names, CVAT names). Default: the export's own images/ or JPEGImages/ when it has them.",
    )
    overlap: str = option(
        "default",
        "Where shapes of different classes overlap: smaller (the smaller wins), later (the one drawn later wins), "
        "unsure (255). default: later for Label Studio (the annotator's last stroke), smaller for COCO.",
        choices=("default", *OVERLAPS),
    )
    crowd: str = option(
        "class", "COCO iscrowd regions: their class, beneath other shapes, or ignore (255).", choices=CROWDS
    )
    match: str = option(
        "name", "COCO categories to classes: by name, or by id (category id c = class c - 1).", choices=MATCHES
    )
    predictions: bool = option(False, "Label Studio: a task with no annotation takes its latest prediction.")
    image_field: Optional[str] = option(None, "Label Studio: the task data field holding the image (default: image).")
    overwrite: bool = option(False, "Replace a labeled set already in OUTPUT.")
    storage_options: dict = storage_options_option()
    threads: int = 8  # images decoded and written at once


def summary(result: dict) -> str:
    c = result["counts"]
    lines = [f"{'seen':<16} {c['seen']:>8,}", f"{'imported':<16} {c['imported']:>8,}"]
    lines += [f"{'skipped: ' + why:<16} {n:>8,}" for why, n in sorted(result["skipped"].items())]
    if c["with_problems"]:
        lines.append(f"{'with problems':<16} {c['with_problems']:>8,}  (imported, something left out)")
    lines += [f"    {e}" for e in result["examples"]]
    lines.append(f"wrote {result['pairs']} ({c['imported']:,} pairs) and {result['problems']}")
    return "\n".join(lines)


def run_import(config: ImportConfig) -> dict:
    """The whole import; returns {counts, skipped, examples, pairs, problems, classes, arguments}."""
    from model.storage import scope_config
    from pipeline.io.files import absolute_output
    from pipeline.label.imports import open_source, read_records

    config = scope_config(config)  # plain storage options for the URLs it names, as on a command line

    started = time.monotonic()
    so = config.storage_options or None
    output = absolute_output(config.output).rstrip("/")
    source = open_source(absolute_output(config.source), so)
    if source.url.rstrip("/") == output:
        raise DinosegError("OUTPUT is SOURCE: import into another folder (the export stays as it is).")
    images_root = absolute_output(config.images) if config.images else None
    labels, records, inner_images = read_records(source, config.format, images_root, config)
    classes = _classes(config, labels, source)
    copies = source.archive and inner_images is not None  # images inside a zip go to OUTPUT/images/
    earlier = _check_output(output, config.overwrite, copies, so)  # read and checked: OUTPUT may change now
    overlap = (
        config.overlap if config.overlap != "default" else ("later" if config.format == "labelstudio" else "smaller")
    )
    from pipeline.label.imports.write import Writer

    writer = Writer(output, classes, source, images_root, inner_images, overlap, config.crowd, so)
    counts = {"seen": 0, "imported": 0, "with_problems": 0}
    skipped: dict[str, int] = {}
    examples: list[str] = []
    pairs: list[dict] = []
    problems: list[dict] = []
    for outcome in bounded_map(writer, writer.keyed(records), max(1, config.threads), "dinoseg-import"):
        counts["seen"] += 1
        if outcome.get("skip"):
            skipped[outcome["skip"]] = skipped.get(outcome["skip"], 0) + 1
            problems.append(outcome)
        else:
            counts["imported"] += 1
            pairs.append({"key": outcome["key"], "image": outcome["image"], "mask": outcome["mask"]})
            if outcome["problems"]:
                counts["with_problems"] += 1
                problems.append(outcome)
        if (outcome.get("skip") or outcome.get("problems")) and len(examples) < MAX_EXAMPLES:
            examples.append(outcome["message"])
        if counts["seen"] % 1000 == 0:
            log.info("imported %d of %d images seen", counts["imported"], counts["seen"])
    if not counts["imported"]:
        hint = f" (e.g. {examples[0]})" if examples else ""
        raise DinosegError(
            f"none of the {counts['seen']} images in '{source.url}' could be imported{hint}: check --format, --classes and --images."
        )
    if config.overwrite:  # the new set is whole: what the earlier import left and this one did not write goes
        _remove_stale(output, {p["key"] for p in pairs}, {p["image"] for p in pairs}, earlier, so)
    copied = writer.copied_images
    return _finish(config, output, classes, pairs, problems, counts, skipped, examples, started, so, copied)


def _classes(config: ImportConfig, labels: list[str], source) -> ClassMap:
    from model.classes import load_class_map

    if config.classes:
        classes = load_class_map(config.classes, config.storage_options or None)
        return classes.require_own_values(config.classes, "import writes", ignore_too=False)
    if config.match == "id":
        raise DinosegError("--match id maps category ids to class indices: pass the class map with --classes.")
    if not labels:
        raise DinosegError(f"'{source.url}' names no labels: pass the class map with --classes.")
    twice = sorted({n for n in labels if labels.count(n) > 1})
    if twice:
        raise DinosegError(
            f"'{source.url}' names the labels {twice} more than once (two COCO categories of one name?): "
            "pass a class map with --classes, which matches them by name."
        )
    colours = source.colours or {}
    return ClassMap(tuple(labels), tuple(colours.get(n, default_color(i)) for i, n in enumerate(labels)))


def _check_output(output: str, overwrite: bool, copies: bool, so: dict | None) -> dict:
    """Refuse an OUTPUT this import must not write into; returns the earlier import's record ({} if none)."""
    from fsspec.core import url_to_fs

    from pipeline.io.records import read_json

    fs, root = url_to_fs(output, **options_for(output, so))
    if fs.exists(root) and not fs.isdir(root):
        raise DinosegError(f"OUTPUT '{output}' is a file: give a folder.")
    other = [name for name in OTHER_RUNS if fs.exists(f"{root}/{name}")]
    if other:  # --overwrite would delete another command's masks: never
        raise DinosegError(
            f"'{output}' holds the output of another command ({', '.join(other)}): import into a folder of its own."
        )
    taken = [name for name in ("masks", *OUTPUT_FILES) if fs.exists(f"{root}/{name}")]
    if taken and not overwrite:
        raise DinosegError(
            f"'{output}' holds a labeled set already ({', '.join(taken)}): pass --overwrite to replace it, or another OUTPUT."
        )
    earlier = (read_json(f"{output}/import.json", so) or {}) if taken else {}
    if copies and fs.exists(f"{root}/images") and not earlier.get("copied_images"):
        raise DinosegError(
            f"'{output}/images' exists and this import copies the export's images there: import into another OUTPUT "
            "(the folder is not an earlier import's, so it is left as it is)."
        )
    return earlier


def _remove_stale(output: str, keys: set[str], images: set[str], earlier: dict, so: dict | None) -> None:
    """After an --overwrite import: masks of keys it did not import, and images an earlier import
    copied out of an archive that this one does not pair (never anything else)."""
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(output, **options_for(output, so))
    fs.invalidate_cache(root)
    prefix = f"{root}/masks/"
    stale = [p for p in _files(fs, f"{root}/masks") if p[len(prefix) : -len(".png")] not in keys]
    if earlier.get("copied_images"):
        kept = {url_to_fs(i, **options_for(i, so))[1] for i in images}
        stale += [p for p in _files(fs, f"{root}/images") if p not in kept]
    for path in stale:
        fs.rm(path)


def _files(fs, folder: str) -> list[str]:
    return sorted(fs.find(folder)) if fs.isdir(folder) else []


def _finish(config, output, classes, pairs, problems, counts, skipped, examples, started, so, copied) -> dict:
    from model.classes import save_class_map
    from pipeline.io.records import jsonl, versions, write_json, write_text

    pairs.sort(key=lambda p: p["key"])
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=["key", "image", "mask"], lineterminator="\n")
    w.writeheader()
    w.writerows(pairs)
    save_class_map(classes, f"{output}/classes.yaml", so)
    write_text(f"{output}/problems.jsonl", jsonl(problems), so)
    write_text(f"{output}/pairs.csv", text.getvalue(), so)  # last: the set is complete once it exists
    arguments = {k: v for k, v in vars(config).items() if k != "storage_options"} | {
        "storage_options": sorted(config.storage_options)  # names only: values may be credentials
    }
    result = {
        "counts": counts,
        "skipped": skipped,
        "examples": examples,
        "pairs": f"{output}/pairs.csv",
        "problems": f"{output}/problems.jsonl",
        "classes": list(classes.names),
        "arguments": arguments,
        "copied_images": copied,  # OUTPUT/images/ is this import's (an --overwrite may remove it)
        "seconds": round(time.monotonic() - started, 2),
        "versions": versions(),
    }
    write_json(f"{output}/import.json", result, so, indent=2)
    return result
