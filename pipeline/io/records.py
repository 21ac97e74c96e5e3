"""The small records a run leaves: run.json, JSON files, JSON lines, text, the versions used."""

from __future__ import annotations

import json

from pipeline.io.files import join_url, write_bytes_atomic


def write_text(url: str, text: str, storage_options: dict | None) -> None:
    write_bytes_atomic(url, text.encode(), storage_options)


def write_json(url: str, obj, storage_options: dict | None, indent: int | None = 1) -> None:
    """`obj` as JSON (one line with indent=None), atomically."""
    write_text(url, json.dumps(obj, indent=indent, default=str) + "\n", storage_options)


def read_json(url: str, storage_options: dict | None):
    """The JSON at `url`, or None when there is none (or it is not JSON)."""
    import fsspec

    try:
        with fsspec.open(url, "rt", **(storage_options or {})) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def write_run_json(output: str, info: dict, storage_options: dict | None = None) -> str:
    """Write OUTPUT/run.json atomically; returns its URL."""
    url = join_url(output, "run.json")
    write_json(url, info, storage_options, indent=2)
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
