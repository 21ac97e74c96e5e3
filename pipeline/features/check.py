"""The check pass over labeled pairs: every pair read and checked once, and the features of
uncached images computed and stored, in one Ray Data pass (train and prototypes run it).

    pairs -> ReadPair -> DecodePair -> [ComputeFeatures actors -> WriteFeatures] -> status rows
"""

from __future__ import annotations

import pyarrow as pa

from pipeline import runtime
from pipeline.data.pairs import Pairs
from pipeline.features.cache import ComputeFeatures, FeatureConfig, WriteFeatures
from pipeline.features.pairs import DecodePair, PairConfig, ReadPair
from pipeline.io.retry import retryable_error
from pipeline.runtime import datasets

STATUS = ("path", "key", "image", "mask", "width", "height", "error_stage", "error_type", "error_message")


def pairs_table(pairs: Pairs, cached: dict | None = None) -> pa.Table:
    sizes = [(cached or {}).get(url) for url in pairs.images]
    return pa.table(
        {
            "path": pairs.images,
            "key": pairs.keys,
            "image": pairs.images,
            "mask": pairs.masks,
            "cached": [s is not None for s in sizes],
            "width": [s[0] if s else 0 for s in sizes],
            "height": [s[1] if s else 0 for s in sizes],
            **{f: [""] * len(pairs) for f in ("error_stage", "error_type", "error_message")},
        }
    )


def _status(batch: dict) -> dict:
    return {k: batch[k] for k in STATUS}


def check_pass(
    rows: pa.Table,
    pair: PairConfig,
    storage_options: dict | None,
    resources: runtime.Resources,
    features: FeatureConfig | None = None,
    folder: str | None = None,
):
    """Read and check every pair (and compute the features of uncached images); yields status
    tables (STATUS columns; failed rows have error fields)."""
    read, decode = ReadPair(storage_options), DecodePair(pair)
    # every image cached (a re-run, another round on the same images): no model to load, and no
    # actor pool to start, only the masks to check
    if features is not None and not all(rows.column("cached").to_pylist()):
        ds = runtime.build(
            rows, read, decode, ComputeFeatures, features, WriteFeatures(folder, storage_options), resources
        )
    else:
        batch = resources.read_batch_size
        ds = datasets.stages(datasets.from_rows(rows, 4 * batch), [read, decode], batch, resources.decode_cpus)
    yield from runtime.iter_results(datasets.stages(ds, [_status], None, resources.decode_cpus))


def check_pairs(
    pairs: Pairs,
    pair: PairConfig,
    storage_options: dict | None,
    resources: runtime.Resources,
    features: FeatureConfig | None = None,
    folder: str | None = None,
) -> tuple[set[str], list[dict]]:
    """The check pass over `pairs` (features of the images not in `folder` computed into it):
    the image URLs of the good pairs, and the bad ones as problems."""
    from pipeline.data.pairs import problem
    from pipeline.features.cache import cached_sizes

    cached = cached_sizes(folder, storage_options) if features is not None else {}
    good, problems = set(), []
    for table in check_pass(pairs_table(pairs, cached), pair, storage_options, resources, features, folder):
        for row in table.to_pylist():
            if row["error_stage"]:
                bad = problem(row["key"], row["image"], row["mask"], row["error_stage"], row["error_message"])
                bad["retryable"] = retryable_error(row["error_stage"], row["error_type"])  # the store, not the pair
                problems.append(bad)
            else:
                good.add(row["image"])
    return good, problems
