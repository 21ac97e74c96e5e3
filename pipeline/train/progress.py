"""Training's progress on the driver: each epoch's line, as rank 0 writes it to
OUTPUT/metrics.jsonl, logged while `fit` runs (the workers' own output stays in Ray's logs)."""

from __future__ import annotations

import json
import logging
import threading

from model.storage import options_for
from pipeline.train.config import describe

progress = logging.getLogger("dinoseg.progress.train")  # shown on the console at the default verbosity


class EpochLines:
    """`with EpochLines(url, so):` logs every epoch that metrics.jsonl gains while the block
    runs; the epochs it held before (a resumed run's) are not repeated, an overwritten run's
    new history is shown. Polled every `every` seconds."""

    def __init__(self, url: str, storage_options: dict | None, every: float = 1.0):
        self.url, self.storage_options, self.every = url, storage_options, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dinoseg-epoch-lines", daemon=True)
        self.shown: list[dict] = []

    def __enter__(self) -> EpochLines:
        self.shown = self._records() or []
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # the last epoch, written just before fit returned

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.poll()

    def poll(self) -> None:
        records = self._records()
        if records is None:
            return
        for i, record in enumerate(records):
            # new epochs, or a new run's (--overwrite) over an older history
            if i >= len(self.shown) or self.shown[i] != record:
                progress.info(describe(record))
        self.shown = records

    def _records(self) -> list[dict] | None:
        """The file's records; None when it cannot be read just now."""
        import fsspec

        try:
            with fsspec.open(self.url, "rt", **options_for(self.url, self.storage_options)) as f:
                text = f.read()
        except FileNotFoundError:
            return []
        except OSError as e:  # a transient read error: the next poll tries again
            logging.getLogger(__name__).debug("could not read %s: %s", self.url, e)
            return None
        records = []
        for line in text.splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # metrics.jsonl is replaced atomically; a bad line is not ours to print
        return records
