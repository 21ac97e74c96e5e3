"""Pseudo-labels: which predicted pixels become training labels, and the per-image label rows.

The model pass is a `segment` run into OUTPUT/raw that also writes 16-bit confidence maps
(`confidence/<key>.png`, q = round(c * 65535)). Selection is a separate CPU pass over those
files, so the rule can be changed (or the class-balanced thresholds recomputed as the collection
grows) without running the model again. Rules, on the stored confidence c = q / 65535:

- threshold T: a pixel keeps its predicted class when c >= T, else it becomes 255 (unsure);
- class-balanced P: class k keeps the most confident fraction P of the pixels predicted as k,
  over the whole collection (Zou et al., ECCV 2018). Its threshold is read off an exact
  histogram of q per predicted class (65,536 bins: the quantised values themselves), summed over
  batches as sparse (class, q, count) triples, so no pixel list is ever held in memory. Ties at
  the threshold are kept, so a class keeps at least P.

Steps (numpy-dict batches in, Arrow tables out, as `pipeline.segment.write.WriteMasks`):
    raw rows {path, key, width, height, mask, was_selected} -> SelectLabels -> LABEL rows
    raw rows -> ConfidenceHistogram -> one {index, count} row per batch
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa

from model.classes import IGNORE_INDEX, ClassMap
from model.errors import DinosegError
from model.storage import options_for
from pipeline.io.files import absolute_output, write_bytes_atomic
from pipeline.io.masks import (
    CONFIDENCE_SCALE,
    confidence_url,
    decode_mask_png,
    encode_confidence_png,
    encode_mask_png,
    mask_url,
)

log = logging.getLogger(__name__)

LEVELS = CONFIDENCE_SCALE + 1  # histogram bins: every stored value q in 0..65535
NEVER = LEVELS  # the cutoff of a class that keeps nothing

LABEL_SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # the image's URL
        ("key", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mask", pa.string()),  # URL of OUTPUT/masks/<key>.png; '' when not selected
        ("selected", pa.bool_()),  # written as a training pair (coverage > 0 and >= --min-coverage)
        ("coverage", pa.float32()),  # fraction of the image's pixels that kept a class
        ("labeled_counts", pa.list_(pa.int64())),  # kept pixels per class, index = class id
        ("mean_confidence", pa.float32()),  # over all pixels
        ("labeled_confidence", pa.float32()),  # over the kept pixels (null when none)
    ]
)
RESULT_SCHEMA = (
    LABEL_SCHEMA.append(pa.field("ok", pa.bool_()))
    .append(pa.field("stage", pa.string()))
    .append(pa.field("error_type", pa.string()))
    .append(pa.field("message", pa.string()))
)
HISTOGRAM_SCHEMA = pa.schema([("index", pa.list_(pa.int64())), ("count", pa.list_(pa.int64()))])


# --- the rules ---------------------------------------------------------------------------------


def threshold_cutoff(threshold: float) -> int:
    """The smallest stored q with q / 65535 >= threshold (the comparison as float64 division)."""
    if not 0.0 <= threshold <= 1.0:
        raise DinosegError(
            f"--threshold {threshold} must be between 0 and 1: e.g. 0.9 keeps pixels at 90% confidence or more."
        )
    q = min(LEVELS - 1, math.ceil(threshold * CONFIDENCE_SCALE))
    while q > 0 and (q - 1) / CONFIDENCE_SCALE >= threshold:
        q -= 1
    while q < LEVELS and q / CONFIDENCE_SCALE < threshold:
        q += 1
    return q


def balanced_cutoffs(histogram: np.ndarray, fraction: float) -> np.ndarray:
    """Per class, the largest q such that pixels at q or above are at least `fraction` of the
    pixels predicted as that class; NEVER for a class nothing was predicted as."""
    if not 0.0 < fraction <= 1.0:
        raise DinosegError(
            f"--class-balanced {fraction} must be in (0, 1]: e.g. 0.5 keeps each class's most confident half."
        )
    hist = np.asarray(histogram, dtype=np.int64)
    above = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # above[k, q] = pixels of class k at q or more
    need = np.ceil(fraction * above[:, 0] - 1e-9).astype(np.int64)
    cutoffs = np.full(len(hist), NEVER, dtype=np.int64)
    for k in np.flatnonzero(above[:, 0]):
        cutoffs[k] = int(np.flatnonzero(above[k] >= max(need[k], 1))[-1])
    return cutoffs


def select_pixels(mask: np.ndarray, quantized: np.ndarray, cutoffs: np.ndarray) -> np.ndarray:
    """The pseudo-label: the predicted class where q >= that class's cutoff, else 255."""
    if mask.dtype not in (np.uint8, np.uint16):
        raise DinosegError(f"a predicted mask must be uint8 or uint16, not {mask.dtype}.")
    # a lookup table over every value the mask's dtype can hold (values past the map: never kept),
    # so the per-pixel work is one gather and one compare, in 4-byte temporaries
    limit = np.full(np.iinfo(mask.dtype).max + 1, NEVER, dtype=np.int32)
    limit[: len(cutoffs)] = np.asarray(cutoffs, dtype=np.int32)[: len(limit)]
    return np.where(quantized >= limit[mask], mask, np.asarray(IGNORE_INDEX, mask.dtype))


def summarise_cutoffs(cutoffs, histogram: np.ndarray | None, classes: ClassMap) -> list[dict]:
    """thresholds.json's per-class rows: threshold (stored-confidence units), pixels predicted/kept."""
    rows = []
    for k, name in enumerate(classes.names):
        q = int(cutoffs[k])
        row = {"id": k, "name": name, "threshold": None if q >= NEVER else round(q / CONFIDENCE_SCALE, 6)}
        if histogram is not None:
            predicted = int(histogram[k].sum())
            kept = int(histogram[k, q:].sum()) if q < NEVER else 0
            row.update(
                predicted_pixels=predicted,
                kept_pixels=kept,
                kept_fraction=round(kept / predicted, 6) if predicted else None,
            )
        rows.append(row)
    return rows


# --- the steps ---------------------------------------------------------------------------------


@dataclass
class SelectConfig:
    output: str  # OUTPUT of the pseudo-label job
    raw: str  # OUTPUT/raw: the model pass
    classes: ClassMap
    cutoffs: tuple[int, ...]  # per class
    min_coverage: float = 0.0
    confidence_bits: int = 0  # write OUTPUT/confidence/<key>.png (8 bits) beside each mask
    storage_options: dict | None = field(default=None, repr=False)  # credentials: never in a repr
    io_threads: int = 8

    def __post_init__(self):
        self.output, self.raw = absolute_output(self.output), absolute_output(self.raw)
        if len(self.cutoffs) != len(self.classes):
            raise DinosegError(f"{len(self.cutoffs)} thresholds for {len(self.classes)} classes.")


def read_raw(url: str, raw: str, key: str, storage_options: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """The model pass's (argmax mask, uint16 confidence) of one key."""
    with fsspec.open(url, "rb", **options_for(url, storage_options)) as f:
        mask = decode_mask_png(f.read())
    conf = confidence_url(raw, key)
    with fsspec.open(conf, "rb", **options_for(conf, storage_options)) as f:
        quantized = decode_mask_png(f.read())
    if quantized.dtype != np.uint16 or quantized.shape != mask.shape:
        raise DinosegError(
            f"the confidence map of {key} is {quantized.dtype} {quantized.shape}, not 16-bit at the mask's "
            f"size {mask.shape}: re-run the model pass with --overwrite."
        )
    return mask, quantized


def _parallel(fn, items: list, threads: int) -> list:
    if threads > 1 and len(items) > 1:
        with ThreadPoolExecutor(min(threads, len(items)), thread_name_prefix="dinoseg-select") as pool:
            return list(pool.map(fn, items))
    return [fn(i) for i in items]


class SelectLabels:
    """Apply the rule to each raw prediction; write the selected masks; one LABEL row per input
    (`ok` false with stage 'select' for a raw file that cannot be read or written)."""

    def __init__(self, config: SelectConfig):
        self.config = config
        self.cutoffs = np.asarray(config.cutoffs, dtype=np.int64)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["key"])
        results = _parallel(lambda i: self._row(batch, i), list(range(n)), self.config.io_threads)
        cols: dict[str, list] = {name: [] for name in RESULT_SCHEMA.names}
        for i, out in enumerate(results):
            error = out if isinstance(out, BaseException) else None
            row = {} if error else out
            cols["path"].append(str(batch["path"][i]))
            cols["key"].append(str(batch["key"][i]))
            cols["width"].append(int(batch["width"][i]))
            cols["height"].append(int(batch["height"][i]))
            for name in ("mask", "selected", "coverage", "labeled_counts", "mean_confidence", "labeled_confidence"):
                cols[name].append(row.get(name))
            cols["ok"].append(error is None)
            cols["stage"].append("select" if error else "")
            cols["error_type"].append(type(error).__name__ if error else "")
            cols["message"].append((str(error) or type(error).__name__) if error else "")
        return pa.Table.from_pydict(cols, schema=RESULT_SCHEMA)

    def _row(self, batch, i: int) -> dict | BaseException:
        cfg = self.config
        try:
            key = str(batch["key"][i])
            mask, quantized = read_raw(str(batch["mask"][i]), cfg.raw, key, cfg.storage_options)
            labels = select_pixels(mask, quantized, self.cutoffs)
            kept = labels != IGNORE_INDEX
            coverage = float(kept.mean())
            selected = coverage > 0 and coverage >= cfg.min_coverage
            out = {
                "selected": selected,
                "coverage": coverage,
                "mask": "",
                "labeled_counts": np.bincount(labels[kept].ravel(), minlength=len(cfg.classes)).astype(np.int64),
                "mean_confidence": float(quantized.mean()) / CONFIDENCE_SCALE,
                "labeled_confidence": float(quantized[kept].mean()) / CONFIDENCE_SCALE if kept.any() else None,
            }
            if selected:
                if cfg.confidence_bits:  # before the mask: the mask marks the pair as complete
                    write_bytes_atomic(
                        confidence_url(cfg.output, key),
                        encode_confidence_png(quantized, cfg.confidence_bits),
                        cfg.storage_options,
                    )
                out["mask"] = mask_url(cfg.output, key)
                write_bytes_atomic(out["mask"], encode_mask_png(labels, cfg.classes), cfg.storage_options)
            elif bool(batch["was_selected"][i]):  # selected by an earlier rule: no longer a pair
                fs, path = fsspec.core.url_to_fs(
                    mask_url(cfg.output, key), **options_for(mask_url(cfg.output, key), cfg.storage_options)
                )
                fs.rm(path)
                _, beside = fsspec.core.url_to_fs(
                    confidence_url(cfg.output, key), **options_for(confidence_url(cfg.output, key), cfg.storage_options)
                )
                if fs.exists(beside):
                    fs.rm(beside)
            return out
        except Exception as e:  # the row becomes an error row; the batch goes on
            return e


class ConfidenceHistogram:
    """Raw rows -> one row per batch: the batch's (class * 65536 + q) -> pixel count, sparse.
    A raw file that cannot be read is left out here; the selection pass reports it."""

    def __init__(self, config: SelectConfig):
        self.config = config

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        cfg = self.config
        total: dict[int, np.ndarray] = {}

        def one(i):
            try:
                return read_raw(str(batch["mask"][i]), cfg.raw, str(batch["key"][i]), cfg.storage_options)
            except Exception as e:
                log.warning("histogram: %s left out (%s)", batch["key"][i], e)
                return None

        rows = list(range(len(batch["key"])))
        step = max(1, cfg.io_threads)
        for start in range(0, len(rows), step):  # a few images in memory at a time, whatever the batch
            for pair in _parallel(one, rows[start : start + step], cfg.io_threads):
                if pair is None:
                    continue
                mask, quantized = pair
                for k in np.unique(mask):
                    counts = np.bincount(quantized[mask == k], minlength=LEVELS)
                    total[int(k)] = total[int(k)] + counts if int(k) in total else counts
        index, count = [], []
        for k, counts in sorted(total.items()):
            q = np.flatnonzero(counts)
            index.append(k * LEVELS + q)
            count.append(counts[q])
        index = np.concatenate(index) if index else np.zeros(0, np.int64)
        count = np.concatenate(count) if count else np.zeros(0, np.int64)
        return pa.Table.from_pydict(
            {"index": [index.astype(np.int64)], "count": [count.astype(np.int64)]}, schema=HISTOGRAM_SCHEMA
        )


def add_histogram(histogram: np.ndarray, index: np.ndarray, count: np.ndarray) -> None:
    """Add one batch's sparse triples into the (classes, 65536) histogram; values past the class
    map (a mask of another model) are refused."""
    index = np.asarray(index, dtype=np.int64)
    if index.size and index.max() >= histogram.size:
        raise DinosegError(
            f"a raw mask holds class {int(index.max()) // LEVELS}, past the {len(histogram)} classes of "
            "the model: re-run the model pass with --overwrite."
        )
    np.add.at(histogram.reshape(-1), index, np.asarray(count, dtype=np.int64))
