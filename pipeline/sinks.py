"""The end of the segment graph: encode masks, write them (atomically, under stable keys),
optional overlays, and the rows for predictions/ and errors/.

Layout under OUTPUT: masks/<key>.png, overlays/<key>.jpg, confidence/<key>.png, run.json. A
mask is the marker that an input is done: it is written last for its row, complete or not at all, and `existing_keys`
lists the masks for resume.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from model.classes import ClassMap
from model.errors import DinosegError

from .rle import rle_encode_labels
from .schema import ERROR_FIELDS, ERROR_SCHEMA, MASK_PNG_FIELD, PREDICTION_SCHEMA, RLE_FIELD

log = logging.getLogger(__name__)

# zlib level for mask PNGs. On a 1024x768 ADE20K-palette mask (AMD EPYC, Pillow 13, one core):
#   blocky regions: level 1 3.1 ms / 16 KiB, level 6 6.0 ms / 6 KiB;
#   smooth 20-class regions: level 1 4.6 ms / 64 KiB, level 6 13.5 ms / 36 KiB (level 9: 120 ms);
#   per-pixel noise (worst case): level 1 22 ms, level 6 26 ms, both 700 KiB.
# Encoding runs once per image on the hot path; the extra bytes cost far less than the time.
PNG_COMPRESS_LEVEL = 1
JPEG_QUALITY = 90
MASK_MODES = ("png", "parquet", "both")
ERROR_COLUMNS = tuple(ERROR_SCHEMA.names)  # path, key, stage, error_type, message


# --- mask PNGs ---------------------------------------------------------------------------------


def encode_mask_png(mask: np.ndarray, classes: ClassMap) -> bytes:
    """PNG bytes of a class-index mask: mode 'P' with the class palette for <= 256 classes,
    16-bit grayscale ('I;16') beyond. Raises DinosegError for a mask that does not fit."""
    m = np.asarray(mask)
    if m.ndim != 2 or m.size == 0 or m.dtype.kind not in "uib":
        raise DinosegError(f"a mask must be a non-empty 2-D integer array, got {m.dtype} {m.shape}.")
    wide = len(classes) > 256
    top = 65535 if wide else 255
    if m.dtype.kind == "i" or m.dtype.itemsize > (2 if wide else 1):
        lo, hi = (int(m.min()), int(m.max()))
        if lo < 0 or hi > top:
            raise DinosegError(f"mask values {lo}..{hi} do not fit a {'16' if wide else '8'}-bit PNG for {len(classes)} classes.")
    if wide:
        image = Image.fromarray(np.ascontiguousarray(m, dtype="<u2"))  # mode I;16
    else:
        image = Image.fromarray(np.ascontiguousarray(m, dtype=np.uint8))  # mode L ...
        image.putpalette(classes.palette())  # ... becomes P
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def decode_mask_png(data: bytes) -> np.ndarray:
    """The class-index mask of a mask PNG: (H, W) uint8 for 'P'/'L', uint16 for 16-bit."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode in ("P", "L"):
            return np.asarray(image, dtype=np.uint8).copy()
        if image.mode.startswith("I"):  # 'I;16' (or 'I' from older Pillow)
            return np.asarray(image).astype(np.uint16)
        raise DinosegError(f"a mask PNG must be palette or grayscale, this one is {image.mode}.")


# --- output layout -----------------------------------------------------------------------------


def check_key(key: str) -> str:
    """The key, if it names a file inside OUTPUT; DinosegError otherwise."""
    if not isinstance(key, str) or not key:
        raise DinosegError(f"empty key {key!r}: every input needs a path relative to INPUT.")
    parts = key.split("/")
    if key.startswith("/") or "\\" in key or "\x00" in key or any(p in ("", ".", "..") for p in parts):
        raise DinosegError(f"key {key!r} could write outside OUTPUT ('..', '.', empty or absolute parts, backslashes): rename the input.")
    return key


def _join(output: str, *parts: str) -> str:
    if not output:
        raise DinosegError("the output location is empty: give a folder or a URL such as s3://bucket/out.")
    return "/".join([output.rstrip("/"), *parts])


def mask_url(output: str, key: str) -> str:
    return _join(output, "masks", check_key(key) + ".png")


def confidence_url(output: str, key: str) -> str:
    return _join(output, "confidence", check_key(key) + ".png")


def encode_confidence_png(quantized: np.ndarray, bits: int) -> bytes:
    """PNG of a uint16 confidence map (q / 65535): 16-bit grayscale as it is, or 8-bit
    (round(c * 255)) for people who want a map to look at or to weight a loss with."""
    q = np.asarray(quantized)
    if q.dtype != np.uint16 or q.ndim != 2:
        raise DinosegError(f"a confidence map must be a 2-D uint16 array, got {q.dtype} {q.shape}.")
    if bits == 8:
        image = Image.fromarray(((q.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8))
    else:
        image = Image.fromarray(np.ascontiguousarray(q, dtype="<u2"))  # mode I;16
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def overlay_url(output: str, key: str) -> str:
    return _join(output, "overlays", check_key(key) + ".jpg")


def _is_local(url: str) -> bool:
    return fsspec.utils.get_protocol(url) in ("file", "local")


def absolute_output(output: str) -> str:
    """A local output as an absolute path (Ray workers run in another folder); URLs unchanged."""
    if not output:
        raise DinosegError("the output location is empty: give a folder or a URL such as s3://bucket/out.")
    if _is_local(output) and "://" not in output:
        return os.path.abspath(os.path.expanduser(output))
    return output


def absolute_input(url: str | None) -> str | None:
    """A local file the workers will read (a head, weights) as an absolute path; URLs, None and
    the word 'random' unchanged."""
    if not url or url == "random" or "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


# --- writing -----------------------------------------------------------------------------------


def write_bytes_atomic(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write `data` to `url` so that readers see the old file, or all of the new one.

    Local: a temporary name in the same folder, then os.replace (no fsync: this guards against
    killed workers, not power loss, and an fsync per mask would dominate on network disks).
    Remote: one PUT (`pipe_file`), which object stores apply atomically."""
    if _is_local(url):
        path = LocalFileSystem._strip_protocol(url)
        parent = os.path.dirname(path) or "."
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, unlike mkstemp's 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.pipe_file(path, data)  # no makedirs fallback: on s3fs that would create a missing bucket


def existing_keys(output: str, storage_options: dict | None = None) -> set[str]:
    """Keys whose mask exists under OUTPUT/masks/ (temporary files excluded), for resume."""
    fs, root = fsspec.core.url_to_fs(_join(output, "masks"), **(storage_options or {}))
    fs.invalidate_cache(root)
    prefix = root.rstrip("/") + "/"
    keys = set()
    for path in fs.find(root):
        if path.startswith(prefix) and path.endswith(".png"):
            keys.add(path[len(prefix) : -len(".png")])
    return keys


def write_run_json(output: str, info: dict, storage_options: dict | None = None) -> str:
    """Write OUTPUT/run.json atomically; returns its URL."""
    url = _join(output, "run.json")
    text = json.dumps(info, indent=2, default=str) + "\n"
    write_bytes_atomic(url, text.encode(), storage_options)
    return url


def summary_table(counts: dict) -> str:
    """The end-of-run table: inputs, predicted, skipped, failed, and a check that they add up."""
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
    return "\n".join(lines)


# --- the write step ----------------------------------------------------------------------------


@dataclass
class WriteConfig:
    output: str  # OUTPUT: local folder or fsspec URL; local paths are made absolute here
    classes: ClassMap
    masks: str = "png"  # 'png' files, a 'parquet' column (mask_png), or 'both'
    rle: bool = False  # add the `rle` column: COCO compressed RLE per class present
    overlays: bool = False  # write OUTPUT/overlays/<key>.jpg (needs the `image` column)
    model_id: str = ""
    head_checksum: str = ""
    storage_options: dict | None = None
    io_threads: int = 8  # rows of a batch written concurrently (object-store PUTs wait on the network)
    confidence_bits: int = 0  # write confidence/<key>.png: 8 or 16 bits (needs the `confidence` column); 0: none

    def __post_init__(self):
        if self.confidence_bits not in (0, 8, 16):
            raise DinosegError(f"confidence maps are 8 or 16 bits, not {self.confidence_bits}.")
        if self.masks not in MASK_MODES:
            raise DinosegError(f"unknown masks option '{self.masks}': use one of {', '.join(MASK_MODES)}.")
        self.output = absolute_output(self.output)


def write_schema(config: WriteConfig) -> pa.Schema:
    """Every row WriteMasks returns: PREDICTION_SCHEMA (+ mask_png, rle), ok, stage, error_type, message."""
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
    return [n for n in write_schema(config).names if n not in ("ok", "stage", "error_type", "message")]


class WriteMasks:
    """The write step: a map_batches callable, from predict-stage batches to a pyarrow Table.

    Every input row comes back once, as a row of `write_schema(config)`: `ok` true with the
    prediction columns filled, or `ok` false with stage/error_type/message (failed earlier, or
    at 'write' here) and the prediction columns null where there is nothing to say. The job keeps
    `ok` rows' `prediction_columns(config)` for predictions/ and the rest's ERROR_COLUMNS for errors/.

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
        written = dict(zip(todo, results))
        cols: dict[str, list] = {name: [] for name in self.schema.names}
        for i in range(n):
            out = written.get(i)
            if isinstance(out, BaseException):
                errors[i] = ["write", type(out).__name__, str(out) or type(out).__name__]
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
                raise DinosegError(f"mask of {key} has values {stray[:5].tolist()} outside its {len(self.classes)} classes and not the ignore index.")
            out: dict = {"mask": ""}
            if cfg.overlays:  # before the mask: an existing mask means the row is done
                jpg = self._overlay(np.asarray(batch["image"][i]), mask)
                write_bytes_atomic(overlay_url(cfg.output, key), jpg, cfg.storage_options)
            if cfg.confidence_bits:  # before the mask too
                png16 = encode_confidence_png(np.asarray(batch["confidence"][i]), cfg.confidence_bits)
                write_bytes_atomic(confidence_url(cfg.output, key), png16, cfg.storage_options)
            if cfg.masks in ("png", "both"):
                out["mask"] = mask_url(cfg.output, key)
                write_bytes_atomic(out["mask"], png, cfg.storage_options)
            else:
                check_key(key)
            if cfg.masks in ("parquet", "both"):
                out["mask_png"] = {"bytes": png, "path": f"{key}.png"}  # datasets.Image layout
            if cfg.rle:
                ids = present[(present < len(self.classes)) & (present != self.classes.ignore_index)]
                out["rle"] = [{"class_id": int(c), "counts": s} for c, s in rle_encode_labels(mask, ids).items()]
            return out
        except Exception as e:  # the row becomes an error row; the batch goes on
            return e

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
