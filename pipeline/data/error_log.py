"""errors/ as the latest state: one row per input that is still failing.

A run appends its error rows to OUTPUT/errors as it goes (a killed run loses none of them); at
its end `compact_errors` rewrites the folder so that it says what is wrong now: the latest row
of each input (by key; by path for rows without one, such as a folder that could not be
listed), none for an input that has a row in predictions/ (it succeeded on a re-run), and
`retryable` filled in for rows written before that column existed.

Every run lists all of INPUT, so the listing's rows (stage `list`: folders that could not be
listed, key collisions, unsafe paths; they have no key) of earlier runs are dropped: this run's
listing says which of those problems remain. A part that cannot be read as Parquet (damaged) is
left as it is with a warning, and does not stop the compaction.

Written safely: the compacted part is published before the old parts are removed, so a kill in
between leaves duplicates that the next run's compaction removes, and never loses an error.
"""

from __future__ import annotations

import logging

import pyarrow as pa

from model.storage import options_for
from pipeline.data.schema import ERROR_SCHEMA, error_rows
from pipeline.io.files import is_temp_name
from pipeline.io.parts import RollingParquetWriter, UnreadablePart, read_part, read_parts
from pipeline.io.retry import with_retries

log = logging.getLogger(__name__)


def compact_errors(folder: str, predictions: str, storage_options: dict | None = None, latest_run: str = "") -> int:
    """Rewrite the error parts under `folder` to the latest row per input still failing (see the
    module's docstring); `latest_run` is the run id of this run's writer, whose rows are the newest
    (given, the listing rows of other runs are dropped; empty, the run is not known and none are).
    Returns the rows left."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(folder.rstrip("/"), **options_for(folder, storage_options))
    if not with_retries(lambda: fs.exists(root), f"looking at {folder}"):
        return 0
    parts = _parts(fs, root, latest_run)
    read = [(p, t) for p, t in ((p, _read(fs, p)) for p in parts) if t is not None]
    parts, tables = [p for p, _ in read], [t for _, t in read]  # an unreadable part is left alone
    if not tables:
        return 0
    rows = pa.concat_tables([error_rows(t) for t in tables])
    mine = [_of_run(p, latest_run) for p, t in read for _ in range(len(t))]
    done = read_parts(predictions, ["key"], storage_options)
    done_keys = set() if done is None else set(done["key"].to_pylist())
    latest: dict[str, int] = {}
    rows_of = zip(rows["key"].to_pylist(), rows["path"].to_pylist(), rows["stage"].to_pylist(), mine, strict=True)
    for i, (key, path, stage, this_run) in enumerate(rows_of):
        if latest_run and stage == "list" and not this_run:
            continue  # this run listed INPUT again: its own listing rows say what is still wrong
        latest[key or f"path:{path}"] = i  # a later row replaces an earlier one
    keep = sorted(i for ident, i in latest.items() if ident.startswith("path:") or ident not in done_keys)
    if len(parts) == 1 and len(keep) == len(rows):
        return len(rows)  # one part, nothing to drop: already the latest state
    writer = RollingParquetWriter(folder, ERROR_SCHEMA, storage_options, max_rows=100_000)
    writer.write(rows.take(pa.array(keep, pa.int64())))
    writer.close()  # published before anything is removed
    for path in parts:
        try:
            with_retries(lambda p=path: fs.rm_file(p), f"removing {path}")
        except Exception as e:  # a duplicate left behind: the next run's compaction removes it
            log.warning("could not remove %s after compacting %s (%s); the next run does", path, folder, e)
    log.info("errors: %d inputs still failing (%d rows before)", len(keep), len(rows))
    return len(keep)


def _parts(fs, root: str, latest_run: str) -> list[str]:
    """Complete part files, oldest first: by modification time, this run's last."""
    paths = [
        p
        for p in with_retries(lambda: fs.find(root), f"listing {root}")
        if p.endswith(".parquet")
        and not p.rsplit("/", 1)[-1].startswith(".")
        and not is_temp_name(p.rsplit("/", 1)[-1])
    ]

    def order(path: str):
        mine = _of_run(path, latest_run)
        try:
            modified = fs.modified(path).timestamp()
        except Exception:  # a filesystem without modification times: names decide
            modified = 0.0
        return (mine, modified, path)

    return sorted(paths, key=order)


def _of_run(path: str, run: str) -> bool:
    return bool(run) and path.rsplit("/", 1)[-1].startswith(f"part-{run}-")


def _read(fs, path: str) -> pa.Table | None:
    """The part's rows; None, with a warning, for a part that is not readable Parquet (the store
    failing is raised: tried again by `read_part`, then the run fails before anything is removed)."""
    try:
        return read_part(fs, path)
    except UnreadablePart as e:
        log.warning("%s is not a readable Parquet part (%s): left as it is", fs.unstrip_protocol(path), e)
        return None
