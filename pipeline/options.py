"""Options declared once: a config field that a command line may set carries its help (and, where
the command line spells it differently, its choices, its command-line type and how to parse it).

    @dataclass
    class SegmentConfig:
        input: str = argument("Folder, fsspec URL prefix, glob, or manifest.")
        resolution: Optional[int] = option(None, "Short side the image is resized to.")
        mode: str = option("whole", "whole image, or Meta's sliding window.", choices=MODES)

`jobs/` turns these fields into typer options (`jobs.options.command`); the name is the field's
(`--resolution`, `--batch-size`), the default the dataclass's, so nothing is written twice.
Fields without help are not options (internal settings a workflow passes to another).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, field
from typing import Any, Callable

from model.errors import DinosegError
from model.storage import is_scoped

REQUIRED: Any = MISSING  # an option the command line must give (`--classes FILE`)


def option(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    cli_type: type | None = None,
    cli_default: Any = MISSING,
    parse: Callable[[Any], Any] | None = None,
    flag: str | None = None,
    repr: bool = True,
) -> Any:
    """A config field that is also `--<name>`. `cli_type`/`cli_default`/`parse`: what the command line
    takes when it differs from the field (a JSON string for a dict, a switch for a bit depth).
    `repr=False`: the value stays out of the config's repr (storage options hold credentials)."""
    meta = {
        "help": help,
        "choices": choices,
        "cli_type": cli_type,
        "cli_default": cli_default,
        "parse": parse,
        "flag": flag,
        "argument": False,
    }
    if default is MISSING:
        return field(metadata=meta, repr=repr)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, repr=repr)
    return field(default=default, metadata=meta, repr=repr)


def argument(help: str, *, cli_default: Any = MISSING) -> Any:
    """A positional command-line argument; required in the config, optional on the command line
    when `cli_default` is given."""
    return field(
        metadata={
            "help": help,
            "choices": None,
            "cli_type": None,
            "cli_default": cli_default,
            "parse": None,
            "flag": None,
            "argument": True,
        }
    )


def parse_storage_options(text: str | dict) -> dict:
    """--storage-options: a JSON object of fsspec options, plain or scoped (`model.storage`)."""
    if isinstance(text, dict):
        options = text
    else:
        try:
            options = json.loads(text or "{}")
        except json.JSONDecodeError as e:  # e.msg, not the text: it may hold a secret
            raise DinosegError(
                f"--storage-options is not valid JSON ({e.msg} at character {e.pos}): pass e.g. '{{\"anon\": true}}'."
            ) from None
    if not isinstance(options, dict):
        raise DinosegError("--storage-options must be a JSON object: pass e.g. '{\"anon\": true}'.")
    is_scoped(options)  # a mix of scopes and plain options is one sentence here
    return options


def storage_options_option() -> Any:
    return option(
        {},
        "JSON of fsspec storage options (endpoint, profile...) for the stores named on the command line; "
        'or scoped: {"s3://bucket/": {...}, "https://host/": {...}} (longest prefix wins). Put secrets in '
        "the environment or a profile, not here.",
        cli_type=str,
        cli_default="{}",
        parse=parse_storage_options,
        repr=False,  # credentials: a config's repr (logs, tracebacks) never shows them
    )


def address_option() -> Any:
    return option(None, "Ray cluster address (default RAY_ADDRESS, else local Ray).")
