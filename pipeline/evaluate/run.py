"""`run_evaluate(config)`: `dinoseg evaluate PRED GT --classes FILE` / `python -m jobs.evaluate`.

Scores predicted index masks against ground-truth masks with the same keys (path relative to
PRED or GT, without extension). Thin: lists both sides, reads and decodes each pair in a thread
pool, sums one confusion matrix (`pipeline.data.metrics`), and writes the scores, the counts of what
was skipped and why, and the arguments to a JSON report (default PRED/evaluation.json).
A pair that cannot be compared is counted and skipped, never fatal, unless none is left.

A prediction pixel equal to the ignore index (a pseudo-label's 'unsure' 255) is a miss: a false
negative of the ground truth's class, a false positive of none; the report's
`unlabeled_fraction` is the share of scored pixels predicted so. Pixels whose ground truth is
the ignore index are not scored at all.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from model.errors import DinosegError
from model.storage import options_for
from pipeline.io.files import bounded_map
from pipeline.options import REQUIRED, argument, option, storage_options_option

log = logging.getLogger("dinoseg.evaluate")

SKIPPED = {  # count name -> how the summary says it
    "only_pred": "only in PRED",
    "only_gt": "only in GT",
    "size_mismatch": "sizes differ",
    "unreadable": "unreadable",
    "out_of_range": "values out of range",
}
MAX_EXAMPLES = 5


@dataclass
class EvaluateConfig:
    pred: str = argument("Folder or fsspec URL prefix of predicted index-mask PNGs.")
    gt: str = argument("Folder or fsspec URL prefix of ground-truth index-mask PNGs.")
    # class-map file (YAML/JSON, any fsspec URL) or a bundled name: voc2012, ade20k
    classes: str = option(REQUIRED, "Class-map file (YAML/JSON) or a bundled name: voc2012, ade20k.")
    output: Optional[str] = option(None, "Where the JSON report goes (default PRED/evaluation.json).")
    storage_options: dict = storage_options_option()
    threads: int = 16  # pairs read at once: object-store GETs mostly wait on the network


def summary(result: dict) -> str:
    """The scores table, what was compared and skipped, and where the report went."""
    from pipeline.data.metrics import format_table

    return "\n".join([format_table(result), counts_summary(result), f"report: {result['arguments']['output']}"])


def counts_summary(result: dict) -> str:
    """How many pairs were compared, how many skipped for each reason, with examples."""
    counts, examples = result["counts"], result["examples"]
    lines = [f"pairs compared: {counts['pairs']:,}"]
    for name, label in SKIPPED.items():
        lines.append(f"skipped, {label}: {counts[name]:,}")
        lines += [f"    {example}" for example in examples[name]]
    return "\n".join(lines)


def run_evaluate(config: EvaluateConfig) -> dict:
    """The whole job; returns the report also written as JSON: `scores()` + counts, examples, arguments."""
    from model.classes import load_class_map
    from model.storage import scope_config
    from pipeline.data.metrics import scores
    from pipeline.io.files import absolute_output, write_bytes_atomic

    config = scope_config(config)  # plain storage options for the URLs it names, as on a command line

    so = config.storage_options or None
    classes = load_class_map(config.classes, so)
    pred_paths, pred_errors = _list(config.pred, "PRED", so)
    gt_paths, gt_errors = _list(config.gt, "GT", so)
    output = absolute_output(config.output or _default_output(config.pred, so))

    counts = {"pairs": 0, **dict.fromkeys(SKIPPED, 0)}
    examples: dict[str, list[str]] = {name: [] for name in SKIPPED}

    def skip(reason: str, example: str) -> None:
        counts[reason] += 1
        if len(examples[reason]) < MAX_EXAMPLES:
            examples[reason].append(example)

    for message in pred_errors + gt_errors:
        skip("unreadable", message)
    for key in sorted(pred_paths.keys() - gt_paths.keys()):
        skip("only_pred", key)
    for key in sorted(gt_paths.keys() - pred_paths.keys()):
        skip("only_gt", key)
    common = sorted(pred_paths.keys() & gt_paths.keys())
    if not common:
        hint = f" (e.g. '{next(iter(sorted(pred_paths)), '')}' and '{next(iter(sorted(gt_paths)), '')}')"
        raise DinosegError(
            f"no key is in both PRED '{config.pred}' ({len(pred_paths)} masks) and GT '{config.gt}' "
            f"({len(gt_paths)} masks){hint}: point both at folders whose masks have the same relative "
            "paths (for a segment OUTPUT, PRED is OUTPUT/masks)."
        )

    confusion, counts["pairs"] = compare_masks(
        [(key, pred_paths[key], gt_paths[key]) for key in common], classes, so, skip, config.threads
    )
    if not counts["pairs"]:
        first = next(e for name in ("unreadable", "size_mismatch", "out_of_range") for e in examples[name])
        raise DinosegError(
            f"none of the {len(common)} pairs with a key in both PRED and GT could be compared "
            f"({counts['unreadable']} unreadable, {counts['size_mismatch']} of different sizes, "
            f"{counts['out_of_range']} with values out of range; e.g. {first}): fix the masks or the class map."
        )

    arguments = asdict(config) | {"output": output, "storage_options": sorted(config.storage_options)}  # no secrets
    result = scores(confusion, classes.names) | {
        "ignore_index": classes.ignore_index,
        "counts": counts,
        "examples": examples,
        "arguments": arguments,
    }
    try:
        write_bytes_atomic(output, (json.dumps(result, indent=2) + "\n").encode(), so)
    except OSError as e:
        raise DinosegError(
            f"cannot write the report to '{output}' ({e}): pass --output with a writable place."
        ) from None
    return result


def compare_masks(pairs, classes, storage_options: dict | None, skip, threads: int = 16) -> tuple[np.ndarray, int]:
    """The summed confusion matrix of (key, predicted mask URL, ground-truth URL) pairs, read in
    a thread pool, and how many were compared; a pair that cannot be compared (unreadable, sizes
    differ, values out of range) goes to `skip(reason, example)`. What evaluate and self-train's
    scoring share."""
    from pipeline.data.sources import ReadBytes

    n = len(classes)
    # predictions are dinoseg's masks (classes 0..n-1): unsure pixels hold the ignore index of the
    # map, or of its 0-based form when the map numbers its classes from 1 (its 0 is unlabeled)
    unlabeled = classes.ignore_index if classes.first_id == 0 else classes.internal().ignore_index
    confusion = np.zeros((n, n + (unlabeled is not None)), dtype=np.int64)
    reader = ReadBytes(storage_options)

    def compare(pair):
        return _compare(*pair, reader, n, classes.ignore_index, unlabeled, classes.first_id)

    compared = 0
    for done, outcome in enumerate(bounded_map(compare, pairs, max(1, threads), "dinoseg-evaluate"), 1):
        if isinstance(outcome, np.ndarray):
            confusion += outcome
            compared += 1
        else:
            skip(*outcome)
        if done % 1000 == 0:
            log.info("compared %d of %d pairs", done, len(pairs))
    return confusion, compared


def _list(root: str, side: str, storage_options: dict | None) -> tuple[dict[str, str], list[str]]:
    """{key: path} of the masks under `root`, and the messages of the files that cannot be keyed."""
    from pipeline.data.sources import list_inputs

    paths, errors = {}, []
    try:
        for row in list_inputs(root, storage_options):
            if row["error_stage"]:  # an unsafe path or a key collision: never read
                errors.append(f"{side}: {row['error_message']}")
            else:
                paths[row["key"]] = row["path"]
    except DinosegError as e:
        raise DinosegError(f"{side}: {e}") from None
    return paths, errors


def _default_output(pred: str, storage_options: dict | None) -> str:
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(pred, **options_for(pred, storage_options))
    if not fs.isdir(path.rstrip("/") or "/"):
        raise DinosegError(f"PRED '{pred}' is not a folder, so the report has no default place: pass --output.")
    return pred.rstrip("/") + "/evaluation.json"


def _compare(
    key: str, pred_path: str, gt_path: str, reader, n: int, ignore_index: int, unlabeled: int | None, first_id: int = 0
):
    """The pair's confusion matrix, or (reason, example) when it is skipped. The ground truth is
    in the class map's values (classes from `first_id`, `ignore_index`); the prediction 0-based."""
    from pipeline.data.metrics import confusion_matrix
    from pipeline.data.schema import object_array

    batch = reader({"path": object_array([pred_path, gt_path]), "key": object_array([key, key])})
    masks = []
    for i, path in enumerate((pred_path, gt_path)):
        if batch["error_stage"][i]:
            return "unreadable", str(batch["error_message"][i])
        mask = _decode(path, batch["bytes"][i])
        if isinstance(mask, str):
            return "unreadable", mask
        masks.append(mask)
    pred, gt = masks
    if pred.shape != gt.shape:
        return (
            "size_mismatch",
            f"{key}: the prediction is {pred.shape[1]}x{pred.shape[0]}, the ground truth {gt.shape[1]}x{gt.shape[0]}.",
        )
    stray = _stray(gt, n, ignore_index, first_id)
    if stray:
        return (
            "out_of_range",
            f"{key}: the ground truth has values {stray} that are not classes "
            f"{first_id}..{n - 1 + first_id} or the ignore index {ignore_index}.",
        )
    if first_id:  # classes 1..n and 0 = unlabeled: to 0-based, with the predictions' unsure value
        gt = np.where(gt == ignore_index, unlabeled, gt.astype(np.int64) - first_id)
        ignore_index = unlabeled
    stray = _stray(pred, n, unlabeled)
    if stray:
        also = f" or the unsure value {unlabeled}" if unlabeled is not None else ""
        return "out_of_range", f"{key}: the prediction has values {stray} that are not classes 0..{n - 1}{also}."
    return confusion_matrix(pred, gt, n, ignore_index, unlabeled)


def _decode(path: str, data: bytes) -> np.ndarray | str:
    """The mask, or why it is not one (corrupt, truncated, not a PNG, RGB: the pair is skipped)."""
    from pipeline.io.masks import decode_mask_png

    try:
        return decode_mask_png(data)
    except DinosegError as e:
        return f"'{path}' cannot be decoded as an index mask: {e}"


def _stray(mask: np.ndarray, n: int, ignore_index: int | None, first_id: int = 0) -> list[int]:
    """Up to 5 values in the mask that are neither a class (first_id..) nor the ignore index."""
    present = np.flatnonzero(np.bincount(mask.ravel()))
    outside = (present < first_id) | (present >= n + first_id)
    stray = present[outside & (present != (-1 if ignore_index is None else ignore_index))]
    return [int(v) for v in stray[:MAX_EXAMPLES]]
