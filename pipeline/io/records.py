"""The small JSON records a run leaves: run.json, JSON lines, text files, the versions used."""

from __future__ import annotations

import json
import logging

from pipeline.io.files import join_url, write_bytes_atomic

log = logging.getLogger(__name__)


def write_run_json(output: str, info: dict, storage_options: dict | None = None) -> str:
    """Write OUTPUT/run.json atomically; returns its URL."""
    url = join_url(output, "run.json")
    text = json.dumps(info, indent=2, default=str) + "\n"
    write_bytes_atomic(url, text.encode(), storage_options)
    return url


log = logging.getLogger("dinoseg.train")


def write_text(url: str, text: str, storage_options: dict | None) -> None:
    from pipeline.io.files import write_bytes_atomic

    write_bytes_atomic(url, text.encode(), storage_options)


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)
