"""The end of the segment graph: encode masks, write them (atomically, under stable keys),
optional overlays, the rows for predictions/ and errors/, and the end-of-run table."""

from __future__ import annotations

import io
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from PIL import Image

from model.classes import ClassMap
from model.errors import DinosegError
from model.storage import options_for
from pipeline.data.schema import ERROR_FIELDS, ERROR_SCHEMA, MASK_PNG_FIELD, PREDICTION_SCHEMA, RLE_FIELD
from pipeline.io.files import absolute_output, write_bytes_atomic
from pipeline.io.masks import check_key, confidence_url, encode_confidence_png, encode_mask_png, mask_url, overlay_url
from pipeline.io.retry import is_transient, retryable_error, with_retries
from pipeline.io.rle import rle_encode_labels

log = logging.getLogger(__name__)


JPEG_QUALITY = 90


MASK_MODES = ("png", "parquet", "both")


ERROR_COLUMNS = tuple(ERROR_SCHEMA.names)  # path, key, stage, error_type, message, retryable


def summary_table(counts: dict) -> str:
    """The end-of-run table: inputs, predicted, skipped, failed, a check that they add up, and
    a warning when folders could not be listed (`counts['unlisted_folders']`)."""
    names = ("inputs", "predicted", "skipped", "failed")
    n = {k: int(counts.get(k, 0)) for k in names}
    width = max(len(f"{v:,}") for v in n.values())
    lines = [f"{k:<10} {n[k]:>{width},}" for k in names]
    done = n["predicted"] + n["skipped"] + n["failed"]
    if n["inputs"] == done:
        lines.append(f"{'check':<10} ok: inputs = predicted + skipped + failed")
    else:
        lines.append(
            f"{'check':<10} MISMATCH !!! inputs {n['inputs']:,} != predicted + skipped + failed = {done:,} "
            f"({n['inputs'] - done:+,} inputs unaccounted for)"
        )
    unlisted = int(counts.get("unlisted_folders", 0))
    if unlisted:  # each is one failed row, but its images are unknown
        lines.append(
            f"{'listing':<10} INCOMPLETE: {unlisted:,} folder{'s' if unlisted > 1 else ''} could not be listed, "
            "so images under them may be missing (see errors/, stage 'list'): run again to list them"
        )
    return "\n".join(lines)


@dataclass
class WriteConfig:
    output: str  # OUTPUT: local folder or fsspec URL; local paths are made absolute here
    classes: ClassMap
    masks: str = "png"  # 'png' files, a 'parquet' column (mask_png), or 'both'
    rle: bool = False  # add the `rle` column: COCO compressed RLE per class present
    overlays: bool = False  # write OUTPUT/overlays/<key>.jpg (needs the `image` column)
    model_id: str = ""
    head_checksum: str = ""
    storage_options: dict | None = field(default=None, repr=False)  # credentials: never in a repr
    io_threads: int = 8  # rows of a batch written concurrently (object-store PUTs wait on the network)
    confidence_bits: int = 0  # write confidence/<key>.png: 8 or 16 bits (needs the `confidence` column); 0: none
    # for the publish step (pipeline.segment.publish): every row's `identity` (the digest of what made
    # the mask), and the run whose OUTPUT lease must still be held when a part is published
    identity: str = ""
    run_id: str = ""

    def __post_init__(self):
        if self.confidence_bits not in (0, 8, 16):
            raise DinosegError(f"confidence maps are 8 or 16 bits, not {self.confidence_bits}.")
        if self.masks not in MASK_MODES:
            raise DinosegError(f"unknown masks option '{self.masks}': use one of {', '.join(MASK_MODES)}.")
        self.output = absolute_output(self.output)


def write_schema(config: WriteConfig) -> pa.Schema:
    """Every row WriteMasks returns: PREDICTION_SCHEMA (+ mask_png, rle), ok, stage, error_type, message,
    retryable."""
    fields = list(PREDICTION_SCHEMA)
    if config.masks in ("parquet", "both"):
        fields.append(MASK_PNG_FIELD)
    if config.rle:
        fields.append(RLE_FIELD)
    fields.append(pa.field("ok", pa.bool_()))
    fields += [f for f in ERROR_SCHEMA if f.name not in PREDICTION_SCHEMA.names]
    return pa.schema(fields)


def prediction_columns(config: WriteConfig) -> list[str]:
    """The columns of predictions/*.parquet (select them from the rows where ok)."""
    return [n for n in write_schema(config).names if n not in ("ok", *ERROR_SCHEMA.names[2:])]


class WriteMasks:
    """The write step: a map_batches callable, from predict-stage batches to a pyarrow Table.

    Every input row comes back once, as a row of `write_schema(config)`: `ok` true with the
    prediction columns filled, or `ok` false with stage/error_type/message (failed earlier, or
    at 'write' here) and the prediction columns null where there is nothing to say. The publish step
    (pipeline.segment.publish) puts the `ok` rows' `prediction_columns(config)` in predictions/; the
    driver gets the rest's ERROR_COLUMNS for errors/.

    It returns Arrow, not a numpy dict, because Ray Data's numpy-to-Arrow conversion would not
    give the declared types: an object column of ndarrays becomes Ray's tensor extension type,
    all-empty lists become list<null>, ints int64, all-None columns null, so Parquet files from
    different blocks would disagree. Built against the schema here, every block matches it."""

    def __init__(self, config: WriteConfig):
        self.config = config
        self.schema = write_schema(config)
        self.classes = config.classes
        self._colors: np.ndarray | None = None  # overlay colour per mask value, made on first use

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        cfg = self.config
        n = len(batch["path"])
        if cfg.overlays and "image" not in batch:
            raise DinosegError("overlays need the decoded image: keep the `image` column through the predict step.")
        errors = [[str(batch[f][i] or "") for f in ERROR_FIELDS] for i in range(n)]
        todo = [i for i in range(n) if not errors[i][0]]
        if cfg.io_threads > 1 and len(todo) > 1:  # a pool per batch: nothing lingers in the worker
            with ThreadPoolExecutor(min(cfg.io_threads, len(todo)), thread_name_prefix="dinoseg-write") as pool:
                results = list(pool.map(lambda i: self._write_row(batch, i), todo))
        else:
            results = [self._write_row(batch, i) for i in todo]
        written = dict(zip(todo, results, strict=True))
        cols: dict[str, list] = {name: [] for name in self.schema.names}
        for i in range(n):
            out = written.get(i)
            retry = retryable_error(*errors[i][:2]) if errors[i][0] else False
            if isinstance(out, BaseException):
                errors[i] = ["write", type(out).__name__, str(out) or type(out).__name__]
                retry = is_transient(out) or retryable_error(*errors[i][:2])
                log.debug("write failed for %s: %s", batch["key"][i], out)
                out = None
            ok = out is not None
            cols["path"].append(str(batch["path"][i]))
            cols["key"].append(str(batch["key"][i]))
            cols["width"].append(int(batch["width"][i]))
            cols["height"].append(int(batch["height"][i]))
            cols["mask"].append(out["mask"] if ok else "")
            cols["class_counts"].append(np.asarray(batch["class_counts"][i], dtype=np.int64) if ok else None)
            confidence = float(batch["mean_confidence"][i]) if ok else math.nan
            cols["mean_confidence"].append(None if math.isnan(confidence) else confidence)
            cols["model"].append(cfg.model_id)
            cols["head_checksum"].append(cfg.head_checksum)
            for extra in ("mask_png", "rle"):
                if extra in cols:
                    cols[extra].append(out[extra] if ok else None)
            cols["ok"].append(ok)
            cols["stage"].append(errors[i][0])
            cols["error_type"].append(errors[i][1])
            cols["message"].append(errors[i][2])
            cols["retryable"].append(bool(retry))
        return pa.Table.from_pydict(cols, schema=self.schema)

    def _write_row(self, batch: dict[str, np.ndarray], i: int) -> dict | BaseException:
        """The row's output columns, or the exception that stopped it."""
        cfg = self.config
        try:
            key = str(batch["key"][i])
            mask = np.asarray(batch["mask"][i])
            size = (int(batch["height"][i]), int(batch["width"][i]))
            if mask.shape != size:
                raise DinosegError(f"mask of {key} is {mask.shape}, not the image's (height, width) {size}.")
            png = encode_mask_png(mask, self.classes)  # checks dtype and range first
            present = np.flatnonzero(np.bincount(mask.ravel()))
            stray = present[(present >= len(self.classes)) & (present != self.classes.ignore_index)]
            if stray.size:
                raise DinosegError(
                    f"mask of {key} has values {stray[:5].tolist()} outside its {len(self.classes)} classes and not the ignore index."
                )
            out: dict = {"mask": ""}
            # overlay and confidence before the mask (an existing mask means the row is done), and
            # removed again when the mask cannot be written: no overlay stands without its mask
            extras: list[str] = []
            try:
                if cfg.overlays:
                    jpg = self._overlay(np.asarray(batch["image"][i]), mask)
                    extras.append(overlay_url(cfg.output, key))
                    self._put(extras[-1], jpg)
                if cfg.confidence_bits:
                    png16 = encode_confidence_png(np.asarray(batch["confidence"][i]), cfg.confidence_bits)
                    extras.append(confidence_url(cfg.output, key))
                    self._put(extras[-1], png16)
                if cfg.masks in ("png", "both"):
                    out["mask"] = mask_url(cfg.output, key)
                    self._put(out["mask"], png)
            except Exception:
                self._remove(extras)
                raise
            if cfg.masks not in ("png", "both"):
                check_key(key)
            if cfg.masks in ("parquet", "both"):
                out["mask_png"] = {"bytes": png, "path": f"{key}.png"}  # datasets.Image layout
            if cfg.rle:
                ids = present[(present < len(self.classes)) & (present != self.classes.ignore_index)]
                out["rle"] = [{"class_id": int(c), "counts": s} for c, s in rle_encode_labels(mask, ids).items()]
            return out
        except Exception as e:  # the row becomes an error row; the batch goes on
            return e

    def _put(self, url: str, data: bytes) -> None:
        """One file written atomically, tried again while the store fails transiently."""
        with_retries(lambda: write_bytes_atomic(url, data, self.config.storage_options), f"writing {url}")

    def _remove(self, urls: list[str]) -> None:
        """Best effort: the files a row wrote before its mask failed (a re-run writes them again)."""
        import fsspec

        for url in urls:
            try:
                fs, path = fsspec.core.url_to_fs(url, **options_for(url, self.config.storage_options))
                fs.rm_file(path)
            except FileNotFoundError:
                pass  # the one whose write failed
            except Exception as e:
                log.warning("could not remove %s after its mask failed (%s); the next run rewrites it", url, e)

    def _overlay(self, image: np.ndarray, mask: np.ndarray) -> bytes:
        """JPEG of the image (at the mask's size) blended 50% with the class colours; ignore
        pixels and values outside the class map show the image alone."""
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise DinosegError(f"overlay needs an (h, w, 3) uint8 image, got {image.dtype} {image.shape}.")
        h, w = mask.shape
        pil = Image.fromarray(np.ascontiguousarray(image[..., :3]))
        if pil.size != (w, h):
            pil = pil.resize((w, h), Image.BILINEAR)
        rgb = np.asarray(pil)
        if self._colors is None:
            self._colors = np.zeros((65536, 3), dtype=np.uint8)
            self._colors[: len(self.classes)] = np.asarray(self.classes.colors, dtype=np.uint8)[:65536]
        colored = self._colors[mask]
        blended = ((rgb.astype(np.uint16) + colored) >> 1).astype(np.uint8)
        show = (mask < len(self.classes)) & (mask != self.classes.ignore_index)
        out = np.where(show[..., None], blended, rgb)
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=JPEG_QUALITY)
        return buf.getvalue()
