"""The rows that flow through the segmentation graph, declared once.

Every step takes and returns a batch: a dict of equal-length numpy arrays (Ray Data's "numpy"
batch format). A row that failed at some stage keeps flowing with its error fields set; later
steps pass it through untouched, and the job routes it to `errors/`. So no input is ever lost.

Columns along the way:
    listing      path, key, + ERROR_FIELDS (empty strings)
    read         + bytes (binary; empty for failed rows)
    decode       - bytes, + image (object array of (h, w, 3) uint8, maybe shrunk), width, height
                   (the original size after EXIF rotation)
    predict      - image, + mask (object array of (height, width) uint8/uint16),
                   class_counts (object array of int64 vectors), mean_confidence (float32)
    write        -> PREDICTION_SCHEMA rows (and ERROR_SCHEMA rows for failures)
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

STAGES = ("list", "read", "decode", "predict", "write")
ERROR_FIELDS = ("error_stage", "error_type", "error_message")

# Hugging Face datasets' Image feature layout, so `datasets` and pandas read the column as is
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

PREDICTION_SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # the input's URL
        ("key", pa.string()),  # its path relative to INPUT, without extension
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mask", pa.string()),  # URL of OUTPUT/masks/<key>.png ('' with --masks parquet)
        ("class_counts", pa.list_(pa.int64())),  # pixels per class, index = class id
        ("mean_confidence", pa.float32()),
        ("model", pa.string()),
        ("head_checksum", pa.string()),
    ]
)
MASK_PNG_FIELD = pa.field("mask_png", HF_IMAGE)  # with --masks parquet|both
# the digest of what made the mask (pipeline.segment.identity): resume refuses rows of another one
IDENTITY_FIELD = pa.field("identity", pa.string())
RLE_FIELD = pa.field("rle", pa.list_(pa.struct([("class_id", pa.int32()), ("counts", pa.string())])))

# Hugging Face datasets' names of the Arrow types our rows use (`datasets.Value` dtypes)
_HF_VALUE_TYPES = {
    pa.string(): "string",
    pa.binary(): "binary",
    pa.bool_(): "bool",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.float32(): "float32",
    pa.float64(): "float64",
}


def hf_feature(data_type: pa.DataType):
    """The Hugging Face datasets feature (as the JSON `datasets.Features.to_dict` reads) of one
    Arrow type: HF_IMAGE is an Image, a list a Sequence, a list of structs a one-item list, a struct
    a dict. Sequence and the list form rather than datasets 4's `List`: every datasets release reads
    them (4 and later as List), where an older one refuses a `List` and would not load the file."""
    if data_type == HF_IMAGE:
        return {"_type": "Image"}
    if pa.types.is_list(data_type):
        item = data_type.value_type
        return [hf_feature(item)] if pa.types.is_struct(item) else {"feature": hf_feature(item), "_type": "Sequence"}
    if pa.types.is_struct(data_type):
        return {f.name: hf_feature(f.type) for f in data_type}
    if data_type not in _HF_VALUE_TYPES:
        raise ValueError(f"no Hugging Face datasets feature declared for the Arrow type {data_type}")
    return {"dtype": _HF_VALUE_TYPES[data_type], "_type": "Value"}


def with_hf_features(schema: pa.Schema) -> pa.Schema:
    """`schema` with the `huggingface` metadata that `datasets` reads from a Parquet file, so that
    `datasets.load_dataset("parquet", ...)` decodes `mask_png` as an image with no cast."""
    features = {f.name: hf_feature(f.type) for f in schema}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    return schema.with_metadata({**(schema.metadata or {}), **meta})


ERROR_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("key", pa.string()),
        ("stage", pa.string()),  # one of STAGES
        ("error_type", pa.string()),
        ("message", pa.string()),
        # a transient fault (the store unreachable, slow, overloaded): the next run tries it again
        # and will likely succeed; false for a corrupt image, an unsafe path, a key collision
        ("retryable", pa.bool_()),
    ]
)


def error_rows(table: pa.Table) -> pa.Table:
    """ERROR_SCHEMA rows from rows with path, key, stage, error_type, message (and maybe
    `retryable`): where `retryable` is missing or null, it follows from the stage and error type."""
    from pipeline.io.retry import retryable_error

    given = table["retryable"].to_pylist() if "retryable" in table.column_names else [None] * len(table)
    stages, types = table["stage"].to_pylist(), table["error_type"].to_pylist()
    flags = [
        bool(r) if r is not None else retryable_error(s or "", t or "")
        for r, s, t in zip(given, stages, types, strict=True)
    ]
    columns = {n: table[n] for n in ERROR_SCHEMA.names if n != "retryable"}
    return pa.table({**columns, "retryable": pa.array(flags, pa.bool_())}).cast(ERROR_SCHEMA)


def empty_errors(n: int) -> dict[str, np.ndarray]:
    return {f: np.full(n, "", dtype=object) for f in ERROR_FIELDS}


def failed(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Boolean mask of the rows that failed at an earlier stage."""
    return np.asarray([bool(s) for s in batch["error_stage"]], dtype=bool)


def set_error(
    batch: dict[str, np.ndarray], i: int, stage: str, error: BaseException | str, error_type: str | None = None
) -> None:
    """Mark row i failed at `stage`, keeping the first failure if it already has one."""
    if batch["error_stage"][i]:
        return
    batch["error_stage"][i] = stage
    batch["error_type"][i] = error_type or (type(error).__name__ if isinstance(error, BaseException) else "Error")
    batch["error_message"][i] = str(error) or type(error).__name__


def object_array(items) -> np.ndarray:
    """A 1-D object array (numpy would otherwise stack equal-shaped arrays into one block)."""
    items = list(items)
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out


def with_error_columns(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A shallow copy whose error columns are fresh, writable object arrays (Ray's may be read-only
    or fixed-width strings that would truncate a message)."""
    out = dict(batch)
    n = len(out["path"])
    for field, fresh in empty_errors(n).items():
        if field in out:
            fresh[:] = [str(v) if v is not None else "" for v in out[field]]
        out[field] = fresh
    return out
