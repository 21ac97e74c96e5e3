"""Option parsing shared by the jobs (each job declares its typer options once, in its module)."""

from __future__ import annotations

import json

from model.errors import DinosegError


def storage_options(text: str) -> dict:
    """--storage-options: a JSON object of fsspec options."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise DinosegError(f"--storage-options is not valid JSON ({e}): pass e.g. '{{\"anon\": true}}'.") from None
    if not isinstance(options, dict):
        raise DinosegError("--storage-options must be a JSON object: pass e.g. '{\"anon\": true}'.")
    return options


def versions() -> dict:
    import importlib.metadata as md
    import sys

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "ray", "pyarrow", "numpy", "pillow", "fsspec"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
