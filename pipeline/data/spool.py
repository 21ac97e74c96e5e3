"""Record batches written once and read back as often as needed: in memory while small, in a
temporary Arrow file on the local disk past `SPILL_ROWS` (a listing of millions of inputs is read
back twice, so its rows never sit in memory all at once)."""

from __future__ import annotations

import os
import tempfile
from typing import Iterator

import pyarrow as pa

SPILL_ROWS = 200_000


class Spool:
    def __init__(self, schema: pa.Schema, spill_rows: int | None = None):
        self.schema, self.rows = schema, 0
        self.spill_rows = SPILL_ROWS if spill_rows is None else spill_rows
        self._batches: list[pa.RecordBatch] = []
        self._path: str | None = None
        self._writer = None

    def append(self, batch: pa.RecordBatch) -> None:
        if not len(batch):
            return
        self.rows += len(batch)
        if self._writer is not None:
            self._writer.write_batch(batch)
            return
        self._batches.append(batch)
        if self.rows > self.spill_rows:
            fd, self._path = tempfile.mkstemp(prefix="dinoseg-listing-", suffix=".arrow")
            os.close(fd)
            options = pa.ipc.IpcWriteOptions(compression="lz4")
            self._writer = pa.ipc.new_file(self._path, self.schema, options=options)
            for held in self._batches:
                self._writer.write_batch(held)
            self._batches = []

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        if self._path is None:
            yield from self._batches
            return
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        with pa.OSFile(self._path, "rb") as f:  # read, not mapped: pages read are not kept resident
            reader = pa.ipc.open_file(f)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._path is not None:
            os.unlink(self._path)
            self._path = None
        self._batches = []

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
