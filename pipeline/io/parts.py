"""Driver-side Parquet output: result rows streamed into files of a sensible size.

A file is written under a temporary name and renamed when closed (an object-store PUT is atomic
by itself), so a killed run leaves only complete files; `done_keys` reads them back for resume.
"""

from __future__ import annotations

import io
import os
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem


def _fs(url: str, storage_options: dict | None):
    import fsspec

    return fsspec.core.url_to_fs(url, **(storage_options or {}))


class RollingParquetWriter:
    """Append record batches; a new part file starts past `max_bytes` or `max_rows`."""

    def __init__(
        self,
        folder: str,
        schema: pa.Schema,
        storage_options: dict | None = None,
        max_bytes: int = 256 << 20,
        max_rows: int = 10_000,
    ):
        self.folder, self.schema = folder.rstrip("/"), schema
        self.fs, self.root = _fs(self.folder, storage_options)
        self.max_bytes, self.max_rows = max_bytes, max_rows
        self.run = uuid.uuid4().hex[:8]
        self.parts = 0
        self.rows_written = 0
        self._buf: io.BytesIO | None = None
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0

    def write(self, table: pa.Table) -> None:
        if not len(table):
            return
        if self._writer is None:
            self._buf = io.BytesIO()
            self._writer = pq.ParquetWriter(self._buf, self.schema, compression="zstd")
        self._writer.write_table(table.cast(self.schema))
        self._rows += len(table)
        if self._rows >= self.max_rows or self._buf.tell() >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        """Close the current part file and publish it."""
        if self._writer is None:
            return
        self._writer.close()
        name = f"part-{self.run}-{self.parts:05d}.parquet"
        self.fs.makedirs(self.root, exist_ok=True)
        final = f"{self.root}/{name}"
        if isinstance(self.fs, LocalFileSystem):  # rename makes the file appear whole
            tmp = f"{self.root}/.{name}.tmp"
            with open(tmp, "wb") as f:
                f.write(self._buf.getvalue())
            os.replace(tmp, final)
        else:
            self.fs.pipe_file(final, self._buf.getvalue())
        self.parts += 1
        self.rows_written += self._rows
        self._writer, self._buf, self._rows = None, None, 0

    close = flush


def read_parts(folder: str, columns: list[str], storage_options: dict | None = None) -> pa.Table | None:
    """The given columns of every complete part file under `folder`; None if there is none."""
    fs, root = _fs(folder.rstrip("/"), storage_options)
    if not fs.exists(root):
        return None
    tables = []
    for path in sorted(fs.find(root)):
        name = path.rsplit("/", 1)[-1]
        if name.endswith(".parquet") and not name.startswith("."):
            with fs.open(path, "rb") as f:
                tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables) if tables else None


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
