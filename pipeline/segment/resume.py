"""A re-run's view of OUTPUT, from one read of its parts, and the listing that resumes past it.

`Resume(OUTPUT)` reads errors/ and predictions/ once, part by part, only the columns it needs: path
and key (the keys an earlier run gave, which a re-run keeps: `pipeline.data.recorded`), and of
predictions/ the identity digest the resume check needs (`pipeline.segment.identity`; model and
head too, of a part with rows of an earlier version that have none). Every predictions row's key
is done once that check passes (it passes for all rows or refuses).

`list_todo` lists INPUT in Arrow batches (`list_input_batches`) and drops, batch by batch, the rows
whose key is done (an anti-join against the done keys, `RecordedKeys.done_mask`), so the driver
never holds the listing of the finished inputs: what it keeps is the rows left to do, the listing's
error rows and two counts.

The read happens before the run holds OUTPUT's lease (the listing needs the recorded keys); once it
holds it, `Resume.check` also reads the predictions parts another run published meanwhile (the run
that held the lease until then), whose keys are done too, and refuses to go on when parts it read
are gone (a run with --overwrite removed them: the rows left to do are no longer known).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from model.errors import DinosegError
from pipeline.segment.identity import RowIdentities, check_identity

log = logging.getLogger(__name__)

_IDENTITY_COLUMNS = ["identity", "model", "head_checksum"]  # read at once only in a late part
LISTING_ERRORS = pa.schema([(n, pa.string()) for n in ("path", "key", "stage", "error_type", "message")])


class Resume:
    """What OUTPUT holds (see the module docstring): `recorded` (a `RecordedKeys`, None once
    `release`d), the predictions parts read, and their rows' identities."""

    def __init__(self, out: str, storage_options: dict | None):
        from pipeline.data.recorded import read_recorded

        self.out, self.storage_options = out.rstrip("/"), storage_options
        self.rows, self.parts = RowIdentities(), set()
        self.recorded = read_recorded(self.out, storage_options, ["identity"], self._note)

    def _note(self, url: str, table: pa.Table, read_again=None) -> None:
        """Take in a predictions part: its identities, and the model and head of rows without one
        (read from the part only then: most parts have none, and those columns are long)."""
        self.parts.add(url)
        if read_again is not None and table["identity"].null_count:
            more = read_again(["model", "head_checksum"])
            table = table.append_column("model", more["model"]).append_column("head_checksum", more["head_checksum"])
        self.rows.note(table)

    def release(self) -> None:
        """Drop the recorded keys (the listing is done with them)."""
        self.recorded = None

    def check(self, identity: dict, given) -> pa.Array:
        """Under the lease: the keys of predictions parts published since the read (done too),
        after the identity check of every predictions row (DinosegError naming the option)."""
        from pipeline.io.parts import iter_parts

        folder = f"{self.out}/predictions"
        late = []
        for url, table, _ in iter_parts(folder, ["key", *_IDENTITY_COLUMNS], self.storage_options, skip=self.parts):
            self._note(url, table)
            late.append(table["key"])
        if late:
            log.info("%d rows published by another run since this one read OUTPUT: done too", sum(map(len, late)))
        gone = self.parts - set(_part_urls(folder, self.storage_options))
        if gone:
            raise DinosegError(
                f"{len(gone)} result parts in {folder} were removed while this run started (another run with "
                "--overwrite?): run the command again."
            )
        check_identity(self.out, self.rows, identity, given, self.storage_options)
        return pa.chunked_array(late, pa.string()).combine_chunks() if late else pa.array([], pa.string())


def _part_urls(folder: str, storage_options: dict | None) -> list[str]:
    import fsspec

    from model.storage import options_for
    from pipeline.io.retry import with_retries

    fs, root = fsspec.core.url_to_fs(folder, **options_for(folder, storage_options))
    if not with_retries(lambda: fs.exists(root), f"looking at {folder}"):
        return []
    return [fs.unstrip_protocol(p) for p in with_retries(lambda: fs.find(root), f"listing {folder}")]


@dataclass
class Listed:
    """A listing with the done rows dropped: `todo` (path, key), `errors` (LISTING_ERRORS), how many
    inputs were listed and how many of them are done."""

    todo: pa.Table
    errors: pa.Table
    inputs: int
    done: int


def list_todo(input: str, storage_options: dict | None, resume: Resume | None, stats: dict) -> Listed:
    """List INPUT as segment does (links out of INPUT refused: overlays copy the image into
    OUTPUT), the rows whose key `resume` has done dropped as they come."""
    from pipeline.data.sources import list_input_batches

    recorded = resume.recorded if resume is not None else None
    todo, errors, inputs, done = [], [], 0, 0
    batches = list_input_batches(
        input, storage_options, recorded, stats, refuse_outside_links=True, mark_done=recorded is not None
    )
    for batch in batches:
        inputs += len(batch)
        failed = pc.not_equal(batch["error_stage"], "")
        errors.append(pa.RecordBatch.from_arrays(batch.filter(failed).columns[:5], schema=LISTING_ERRORS))
        if recorded is not None:
            finished = batch["done"]
            done += pc.sum(finished).as_py() or 0
            failed = pc.or_(failed, finished)
        todo.append(batch.filter(pc.invert(failed)).select(["path", "key"]))
    schema = pa.schema([("path", pa.string()), ("key", pa.string())])
    return Listed(pa.Table.from_batches(todo, schema), pa.Table.from_batches(errors, LISTING_ERRORS), inputs, done)
