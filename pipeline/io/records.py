"""The small records a run leaves: run.json, JSON files, JSON lines, text, the versions used.

Each is written and read with retries while the store fails transiently (`pipeline.io.retry`):
they come after a run's work, or decide what a run redoes, so one lost request must cost neither."""

from __future__ import annotations

import json

from model.errors import DinosegError
from model.redact import redacted
from model.storage import options_for
from pipeline.io.files import join_url, write_bytes_atomic
from pipeline.io.retry import is_transient, with_retries


def write_text(url: str, text: str, storage_options: dict | None) -> None:
    data = text.encode()
    with_retries(lambda: write_bytes_atomic(url, data, storage_options), f"writing {url}")


def write_json(url: str, obj, storage_options: dict | None, indent: int | None = 1) -> None:
    """`obj` as JSON (one line with indent=None), atomically; every URL in it without user-info
    or query values (`model.redact`): a record a run leaves holds no credential."""
    text = json.dumps(obj, indent=indent, default=str)
    write_text(url, json.dumps(redacted(json.loads(text)), indent=indent) + "\n", storage_options)


def read_json(url: str, storage_options: dict | None):
    """The JSON at `url`, or None when there is none (or it is not JSON)."""
    import fsspec

    def read():
        with fsspec.open(url, "rt", **options_for(url, storage_options)) as f:
            return json.load(f)

    try:
        return with_retries(read, f"reading {url}")
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    except Exception as e:  # out of reach is not missing: a caller would redo or replace work
        if not is_transient(e):
            raise
        raise DinosegError(
            f"cannot read {url} ({type(e).__name__}: {e}): the store did not answer; re-run when it does."
        ) from None


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def write_run_json(output: str, info: dict, storage_options: dict | None = None) -> str:
    """Write OUTPUT/run.json atomically (tried again while the store fails transiently); returns
    its URL. Written last, after every row is in its parts: a store that still refuses it costs
    one sentence, not the work."""
    url = join_url(output, "run.json")
    try:
        write_json(url, info, storage_options, indent=2)  # URLs without user-info or query (write_json)
    except Exception as e:
        if isinstance(e, DinosegError):
            raise
        raise DinosegError(
            f"the run finished and its rows are safe in {output}'s parts, but {url} could not be written "
            f"({type(e).__name__}: {e}): re-run the same command to write it (finished inputs are skipped)."
        ) from None
    return url


def versions() -> dict:
    """The versions of what made a run's files (Python and the packages that decide them)."""
    import importlib.metadata as md
    import sys

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "ray", "pyarrow", "numpy", "pillow", "fsspec"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
