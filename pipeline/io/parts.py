"""Parquet parts: result rows streamed into files of a sensible size by one writer
(`RollingParquetWriter`, on the driver), or one part per batch published by the task that made it
(`encode_part` + `publish_bytes`, under a `part_name` that a retried task reproduces).

A file is published whole by `write_bytes_atomic` (a temporary name then a rename; an
object-store PUT is atomic by itself), so a killed run leaves only complete files and perhaps a
temporary one, which readers skip; `done_keys` reads them back for resume. A part that cannot be
read all the same (cut short by a backend, damaged) is skipped with a warning naming it, and its
rows are redone, rather than failing every later run.

The environment variable DINOSEG_PART_ROWS, read when a writer is made, caps the rows per part
for writers not given `max_rows` (tests use it to have parts published early in a short job).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import uuid
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from model.errors import DinosegError
from model.storage import options_for
from pipeline.io.files import is_temp_name, join_url, write_bytes_atomic
from pipeline.io.retry import is_transient, with_retries
from pipeline.io.secrets import redact_table

log = logging.getLogger(__name__)

DEFAULT_PART_ROWS = 10_000
# closed parts a writer holds while the store refuses them: past this the run fails (four parts of
# the default 256 MB), rather than memory running out during a long outage
MAX_PENDING_BYTES = 1 << 30


def _fs(url: str, storage_options: dict | None):
    import fsspec

    return fsspec.core.url_to_fs(url, **options_for(url, storage_options))


class RollingParquetWriter:
    """Append record batches; a new part file starts past `max_bytes` or `max_rows`."""

    def __init__(
        self,
        folder: str,
        schema: pa.Schema,
        storage_options: dict | None = None,
        max_bytes: int = 256 << 20,
        max_rows: int | None = None,
        guard: Callable[[], None] | None = None,
    ):
        self.folder, self.schema = folder.rstrip("/"), schema
        self.guard = guard  # called before each publish; raises to stop it (Lease.check: OUTPUT lost)
        self.storage_options = storage_options
        self.fs, self.root = _fs(self.folder, storage_options)
        self.max_bytes, self.max_rows = max_bytes, max_rows or part_rows()
        self.run = uuid.uuid4().hex[:8]
        self.parts = 0
        self.rows_written = 0
        self._buf: io.BytesIO | None = None
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0
        self._pending: list[tuple[str, bytes, int]] = []  # closed parts not published yet (name, data, rows)
        self._last_error: Exception | None = None

    def write(self, table: pa.Table) -> None:
        """Append `table`; a table bigger than a part's room is split, so no part holds more than
        `max_rows` rows (Ray hands results over in blocks of any size)."""
        while len(table):
            if self._writer is None:
                self._buf = io.BytesIO()
                self._writer = pq.ParquetWriter(self._buf, self.schema, compression="zstd")
            room = self.max_rows - self._rows
            self._writer.write_table(redact_table(table.slice(0, room).cast(self.schema)))  # no credentials
            self._rows += min(room, len(table))
            table = table.slice(room)
            if self._rows >= self.max_rows or self._buf.tell() >= self.max_bytes:
                self.flush()

    def flush(self) -> None:
        """Close the current part file and publish it, with every part an earlier flush could not
        publish. A publish is tried again with backoff while the store fails transiently; a part
        that still fails stays in memory for the next flush (its rows are never redone), up to
        MAX_PENDING_BYTES of parts: past that, one DinosegError (the parts published are kept)."""
        if self._writer is not None:
            self._writer.close()
            name = f"part-{self.run}-{self.parts:05d}.parquet"
            self._pending.append((name, self._buf.getvalue(), self._rows))
            self.parts += 1
            self._writer, self._buf, self._rows = None, None, 0
        if self._pending and self.guard is not None:
            self.guard()  # raises, publishing nothing, once this run must not write more (another holds OUTPUT)
        while self._pending:
            name, data, rows = self._pending[0]
            url = join_url(self.folder, name)
            try:
                publish_bytes(url, data, self.storage_options)
            except Exception as e:
                log.warning(
                    "%s is kept in memory (%d rows) and tried again later: %s: %s", url, rows, type(e).__name__, e
                )
                self._last_error = e
                held = sum(len(d) for _, d, _ in self._pending)
                if held > MAX_PENDING_BYTES:
                    raise DinosegError(
                        f"{len(self._pending)} parts ({held >> 20} MB, {self.unpublished_rows} finished rows) could "
                        f"not be written to {self.folder} ({type(e).__name__}: {e}), more than a run holds in memory: "
                        "check the storage and re-run; the rows already published are kept, the others are redone."
                    ) from None
                return
            self._pending.pop(0)
            self.rows_written += rows

    @property
    def unpublished_rows(self) -> int:
        return sum(rows for _, _, rows in self._pending)

    def abandon(self) -> int:
        """Drop the current part and the parts not published yet, publishing nothing more (another
        run took OUTPUT over and redoes their rows); returns how many rows were dropped."""
        dropped = self._rows + self.unpublished_rows
        if self._writer is not None:
            self._writer.close()
        self._writer, self._buf, self._rows, self._pending = None, None, 0, []
        if dropped:
            log.warning(
                "%d finished rows not written to %s: the run that holds OUTPUT now redoes them", dropped, self.folder
            )
        return dropped

    def close(self) -> None:
        """Flush; raise DinosegError when a part could not be published even then."""
        self.flush()
        if self._pending:
            e = self._last_error
            raise DinosegError(
                f"{self.unpublished_rows} finished rows could not be written to {self.folder} "
                f"({type(e).__name__}: {e}): check the storage and re-run; the rows already published are kept."
            )


def publish_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """One part file published whole (`write_bytes_atomic`), tried again while the store fails
    transiently."""
    with_retries(lambda: write_bytes_atomic(url, data, storage_options), f"publishing {url}")


def part_name(run: str, keys) -> str:
    """The file name of run `run`'s part holding the rows of `keys` (every key of the batch, in any
    order): the same keys give the same name, so a task run again after it published (Ray retries
    one whose worker died after the PUT) replaces its part rather than adding a second copy of its
    rows."""
    digest = hashlib.sha256()
    for key in sorted(keys):
        digest.update(key.encode("utf-8", "surrogatepass") + b"\0")
    return f"part-{run[:8]}-{digest.hexdigest()[:16]}.parquet"


def encode_part(table: pa.Table, schema: pa.Schema) -> bytes:
    """`table` as the bytes of one Parquet part of `schema` (its metadata included), credentials
    redacted as in every part."""
    buf = io.BytesIO()
    pq.write_table(redact_table(table.cast(schema)), buf, compression="zstd")
    return buf.getvalue()


def close_all(*writers: RollingParquetWriter) -> None:
    """Close every writer (one that fails does not keep the others' rows from being published),
    then raise the first failure."""
    first = None
    for writer in writers:
        try:
            writer.close()
        except Exception as e:
            first = first or e
    if first is not None:
        raise first


def part_rows() -> int:
    """Rows per part: DINOSEG_PART_ROWS when set (a positive integer), else DEFAULT_PART_ROWS."""
    value = os.environ.get("DINOSEG_PART_ROWS", "").strip()
    if not value:
        return DEFAULT_PART_ROWS
    if not value.isdigit() or int(value) < 1:
        from model.errors import DinosegError

        raise DinosegError(f"DINOSEG_PART_ROWS is {value!r}: give a positive number of rows, or unset it.")
    return int(value)


def read_parts(folder: str, columns: list[str] | None, storage_options: dict | None = None) -> pa.Table | None:
    """The given columns of every complete part file under `folder`; None if there is none.

    Temporary files are not parts. A part whose content cannot be read (cut short, damaged, not
    Parquet) is skipped with one warning naming it: its rows count as not done and are redone.
    Reaching the store (listing, opening, each read of a part's bytes) is tried again while it
    fails transiently, part by part; a store still out of reach after that is one DinosegError (a
    part out of reach must not pass for no part)."""
    tables = [table for _, table, _ in iter_parts(folder, columns, storage_options)]
    return pa.concat_tables(tables, promote_options="default") if tables else None


def iter_parts(folder: str, columns: list[str] | None, storage_options: dict | None = None, skip=frozenset()):
    """(URL, table of the given columns, read_again(columns) -> table) of each complete part file
    under `folder` but those whose URL is in `skip`, in name order, one part in memory at a time:
    what `read_parts` reads, by its rules."""
    fs, root = _fs(folder.rstrip("/"), storage_options)
    fs.invalidate_cache(root)  # parts are published by other processes (the write tasks): list them anew
    try:
        if not with_retries(lambda: fs.exists(root), f"looking at {folder}"):
            return
        for path in sorted(with_retries(lambda: fs.find(root), f"listing {folder}")):
            name = path.rsplit("/", 1)[-1]
            url = fs.unstrip_protocol(path)
            if name.endswith(".parquet") and not name.startswith(".") and not is_temp_name(name) and url not in skip:
                try:
                    table = read_part(fs, path, columns)
                except UnreadablePart as e:
                    _warn_unreadable(url, str(e))
                    continue
                yield url, table, lambda cols, p=path: read_part(fs, p, cols)
    except Exception as e:
        if not is_transient(e):
            raise
        raise DinosegError(
            f"cannot read the parts under {folder} ({type(e).__name__}: {e}): the store did not answer; re-run when it does."
        ) from None


class UnreadablePart(Exception):
    """A part's bytes were read but are not a readable Parquet file (cut short, damaged, another
    format); its message is the parser's reason."""


def read_part(fs, path: str, columns: list[str] | None = None) -> pa.Table:
    """The given columns of one part file (a column the part lacks reads as nulls).

    I/O and parsing are told apart by where a failure arises: one raised by the file object
    (opening, seeking, reading the store) is an I/O failure, tried again while transient and then
    raised as it is; any other failure while pyarrow parses the bytes it was given is the content's,
    raised as UnreadablePart (pyarrow reports a damaged footer or page as a plain OSError, which
    says nothing about the store). The file is read through its ranges, not downloaded whole: a
    resume reads a few small columns of parts that may hold hundreds of MB of masks."""
    return with_retries(lambda: _read_part(fs, path, columns), f"reading {fs.unstrip_protocol(path)}")


def _read_part(fs, path: str, columns: list[str] | None) -> pa.Table:
    with fs.open(path, "rb") as raw:
        f = _Watched(raw)
        try:
            part = pq.ParquetFile(f)
            present = part.schema_arrow.names
            # a column newer than the part (an earlier version wrote it) reads as nulls
            table = part.read(columns=None if columns is None else [c for c in columns if c in present])
        except Exception as e:
            if f.error is not None:  # the store failed under the parser: I/O, not content
                raise f.error from None
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        else:
            reason = None
    if reason is not None:  # raised outside the handler: no parser's error to pass for a store's
        raise UnreadablePart(reason)
    for name in [c for c in columns or () if c not in present]:
        table = table.append_column(name, pa.nulls(len(table)))
    return table.select(columns) if columns is not None else table


class _Watched:
    """A file object that remembers the first exception its own methods raised."""

    def __init__(self, f):
        self._f, self.error = f, None

    def __getattr__(self, name):
        attr = getattr(self._f, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except Exception as e:
                self.error = self.error or e
                raise

        return call


def _warn_unreadable(url: str, reason: str) -> None:
    if url not in _UNREADABLE:  # once per file: a run reads its parts more than once
        _UNREADABLE.add(url)
        log.warning(
            "%s cannot be read as a Parquet part (%s): skipped, its rows will be redone; delete it once this run ends.",
            url,
            reason,
        )


_UNREADABLE: set[str] = set()  # parts already reported unreadable in this process


def remove_parts(folder: str, storage_options: dict | None = None) -> int:
    """Delete the part files under `folder` (results of a run being redone); returns how many."""
    fs, root = _fs(folder.rstrip("/"), storage_options)
    if not fs.exists(root):
        return 0
    parts = [p for p in fs.find(root) if p.endswith(".parquet")]
    for path in parts:
        fs.rm(path)
    return len(parts)


def done_keys(folder: str, storage_options: dict | None = None) -> set[str]:
    """Keys of the rows in the complete part files under `folder` (none if it does not exist)."""
    table = read_parts(folder, ["key"], storage_options)
    return set() if table is None else set(table.column("key").to_pylist())
