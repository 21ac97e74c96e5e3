"""The last step of the segment graph: the write tasks' rows become predictions/ parts published by
the tasks themselves, so that no mask (with `--masks parquet|both`, its PNG bytes) and no
prediction row passes through the driver, which gets one small accounting row per input.

    WriteMasks -> strict repartition to `part_batch_rows` rows -> PublishParts -> `account` (driver)

What held when the driver wrote every part holds here (README "What comes out", "After a kill"):

- one row per key: a part's name comes from the run and all the keys of its batch (`part_name`),
  so a task that Ray runs again after it published (its worker killed after the PUT) rewrites
  that part instead of adding a second copy of its rows;
- a part appears whole or not at all (`publish_bytes`: write_bytes_atomic, retried while the store
  fails transiently); a part that still cannot be published makes its rows retryable write errors
  (their masks may stand; the next run redoes them), never a stopped job;
- a run whose lease was taken over publishes nothing more: the task reads OUTPUT's lease before
  each part (`held_by`, one read) and, finding it another run's, publishes nothing and says so
  (rows of error_type LEASE_LOST), on which the driver stops (`Lease.taken_over`). That read is
  closer to the PUT than the driver's own check was (its renewal thread, every 30 s).
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from model.errors import DinosegError
from pipeline.data.schema import ERROR_SCHEMA, IDENTITY_FIELD, with_hf_features
from pipeline.io.files import join_url
from pipeline.io.lease import held_by
from pipeline.io.parts import encode_part, part_name, part_rows, publish_bytes
from pipeline.io.retry import is_transient, retryable_error
from pipeline.segment.write import WriteConfig, prediction_columns, write_schema

log = logging.getLogger(__name__)

# Rows a part holds, so rows a publish task holds at once and, when a run fails or is interrupted,
# the most finished rows still waiting for their part (the masks stay; the next run redoes those
# rows). With masks in the rows: 256 x ~60 KB PNG = ~16 MB a part (a 12 MP, 150-class mask of ~2 MB:
# ~0.5 GB, the most a publish task then holds). DINOSEG_PART_ROWS lowers both.
ROWS_PART_ROWS = 1000
MASK_PART_ROWS = 256
# what the driver gets per input: where it failed (empty strings when it did not), and whether it did
ACCOUNT_SCHEMA = ERROR_SCHEMA.append(pa.field("ok", pa.bool_()))
LEASE_LOST = "LeaseLost"  # the error_type of rows a task did not publish: OUTPUT's lease is another run's


def part_batch_rows(masks: str) -> int:
    """Rows per predictions/ part, so per publish call: ROWS_PART_ROWS, or MASK_PART_ROWS when the
    rows carry their masks; DINOSEG_PART_ROWS (`part_rows`) when it is lower."""
    return min(part_rows(), MASK_PART_ROWS if masks in ("parquet", "both") else ROWS_PART_ROWS)


def part_schema(config: WriteConfig) -> pa.Schema:
    """The columns of predictions/*.parquet, with Hugging Face datasets' feature metadata."""
    schema = write_schema(config)
    return with_hf_features(pa.schema([schema.field(n) for n in prediction_columns(config)] + [IDENTITY_FIELD]))


class PublishParts:
    """The publish step: a map_batches callable over WriteMasks' rows (Arrow batches, one batch
    one part), returning ACCOUNT_SCHEMA rows, one per input row."""

    def __init__(self, config: WriteConfig):
        if not config.run_id:
            raise DinosegError("publishing predictions/ parts needs the run id of OUTPUT's lease holder.")
        self.config = config
        self.schema = part_schema(config)
        self.folder = join_url(config.output, "predictions")

    def __call__(self, table: pa.Table) -> pa.Table:
        cfg = self.config
        ok = table["ok"]
        done = table.filter(ok).select(self.schema.names[:-1])
        if len(done):
            done = done.append_column(IDENTITY_FIELD, pa.array([cfg.identity] * len(done), pa.string()))
            url = join_url(self.folder, part_name(cfg.run_id, table["key"].to_pylist()))
            try:
                data = encode_part(done, self.schema)
                if not held_by(cfg.output, cfg.run_id, cfg.storage_options):
                    log.error("not publishing %s: OUTPUT's lease is another run's now", url)
                    return _failed(table, None, LEASE_LOST, "OUTPUT's lease was taken over by another run", False)
                publish_bytes(url, data, cfg.storage_options)
            except Exception as e:
                kind = type(e).__name__
                log.warning("could not publish %s (%s: %s): its %d rows are retryable errors", url, kind, e, len(done))
                message = f"its row could not be published to {url} ({kind}: {e}); the next run redoes it"
                return _failed(table, ok, kind, message, is_transient(e) or retryable_error("write", kind))
        return table.select(ACCOUNT_SCHEMA.names).cast(ACCOUNT_SCHEMA)


def _failed(table: pa.Table, ok: pa.ChunkedArray | None, error_type: str, message: str, retryable: bool) -> pa.Table:
    """The accounting rows of `table` with its `ok` rows (every row when None) failed at 'write'."""
    which = pa.array([True] * len(table)) if ok is None else ok

    def where(new, old):
        return pc.if_else(which, pa.scalar(new, old.type), old)

    return pa.table(
        {
            "path": table["path"],
            "key": table["key"],
            "stage": where("write", table["stage"]),
            "error_type": where(error_type, table["error_type"]),
            "message": where(message, table["message"]),
            "retryable": where(retryable, table["retryable"]),
            "ok": pa.array([False] * len(table)),
        },
        schema=ACCOUNT_SCHEMA,
    )


def account(table: pa.Table, errors, counts: dict, lease) -> None:
    """The driver's work per result table (ACCOUNT_SCHEMA rows): stop once OUTPUT's lease is another
    run's (its renewal found it so, or a task did: rows of LEASE_LOST), else the failed rows to the
    errors/ writer and the counts."""
    lease.check()
    if pc.any(pc.equal(table["error_type"], LEASE_LOST)).as_py():
        lease.taken_over()  # raises: nothing of this table is written
    failed = table.filter(pc.invert(table["ok"])).select(ERROR_SCHEMA.names)
    errors.write(failed)
    counts["predicted"] += len(table) - len(failed)
    counts["failed"] += len(failed)
