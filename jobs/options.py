"""Typer commands made from config dataclasses (`pipeline.options`): each option's name, type,
default and help are the config field's, so a command is a few lines and commands that share a
config (pseudo-label and segment, self-train and train) share its options as they are."""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import typing
from dataclasses import MISSING
from typing import Any, Callable, Iterable

import typer

from model.errors import DinosegError
from model.redact import redact_text
from model.storage import scope_options

Source = tuple[type, Callable[[str], bool]]  # a config class and which of its fields to offer


def every(*names: str) -> Callable[[str], bool]:
    return lambda name: name in names


def all_but(*names: str) -> Callable[[str], bool]:
    return lambda name: name not in names


def _choices(name: str, choices: Iterable[str]) -> type[enum.Enum]:
    return enum.Enum(name, {c: c for c in choices}, type=str)


def _parameter(cls: type, f: dataclasses.Field, hint: Any, help_override: dict, defaults: dict) -> inspect.Parameter:
    meta = f.metadata
    annotation = meta["cli_type"] or hint
    if f.name in defaults:  # a command that makes a field optional (self-train's IMAGES with --start-head)
        default = defaults[f.name]
    elif meta["cli_default"] is not MISSING:
        default = meta["cli_default"]
    elif f.default is not MISSING:
        default = f.default
    elif f.default_factory is not MISSING:
        default = f.default_factory()
    else:
        default = ...
    if meta["choices"]:
        annotation = _choices(f"{cls.__name__}_{f.name}", meta["choices"])
        default = default if default is ... or default is None else annotation(default)
    help = help_override.get(f.name, meta["help"])
    flags = [meta["flag"]] if meta["flag"] else []
    make = typer.Argument if meta["argument"] else typer.Option
    return inspect.Parameter(
        f.name, inspect.Parameter.KEYWORD_ONLY, default=make(default, *flags, help=help), annotation=annotation
    )


def _fields(sources: list[Source]):
    seen = set()
    for cls, wanted in sources:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "help" in f.metadata and wanted(f.name) and f.name not in seen:
                seen.add(f.name)
                yield cls, f, hints[f.name]


def values_for(cls: type, values: dict) -> dict:
    """The entries of `values` that are fields of `cls`."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def command(
    doc: str,
    sources: list[Source],
    make: Callable[[dict], Any],
    run: Callable[[Any], Any],
    show: Callable[[Any], str] | None = None,
    help_override: dict | None = None,
    defaults: dict | None = None,
) -> Callable[..., None]:
    """A typer command offering the chosen fields of `sources` (arguments first, in order): it
    parses the values, builds the config with `make(values)`, runs it and echoes `show(result)`."""
    found = list(_fields(sources))
    parse = {f.name: f.metadata["parse"] for _, f, _ in found if f.metadata["parse"]}
    params = [_parameter(cls, f, hint, help_override or {}, defaults or {}) for cls, f, hint in found]
    params.sort(key=lambda p: not isinstance(p.default, typer.models.ArgumentInfo))  # stable: arguments first

    def cmd(**values) -> None:
        values = {k: v.value if isinstance(v, enum.Enum) else v for k, v in values.items()}
        values = {k: parse[k](v) if k in parse else v for k, v in values.items()}
        if values.get("storage_options"):
            values["storage_options"] = scoped_storage_options(values)
        result = run(make(values))
        if show is not None:
            typer.echo(show(result))

    cmd.__doc__ = doc
    cmd.__signature__ = inspect.Signature(params)
    cmd.__annotations__ = {p.name: p.annotation for p in params}
    return cmd


def scoped_storage_options(values: dict) -> dict:
    """--storage-options as given for this command's URLs (`model.storage.scope_options`): plain
    options reach object stores and the http(s) hosts named on the command line (INPUT, OUTPUT,
    --head ...), nothing else: not the weights hub, not the other hosts of a manifest."""
    urls = [u for v in values.values() for u in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(u, str)]
    return scope_options(values["storage_options"], urls)


def config_command(
    cls: type, run: Callable[[Any], Any], show: Callable[[Any], str] | None = None, doc: str | None = None, **kwargs
) -> Callable[..., None]:
    """A command over every option of one config class."""
    return command(doc or run.__doc__ or "", [(cls, all_but())], lambda values: cls(**values), run, show, **kwargs)


def run_command(typer_app, argv: list[str] | None = None, prog: str = "dinoseg") -> int:
    """Run a typer app; usage errors are click's (exit 2), user errors one sentence (exit 2)."""
    from pipeline.runtime import console

    try:
        typer_app(args=argv, prog_name=prog)
    except DinosegError as e:
        typer.echo(f"error: {redact_text(str(e))}", err=True)
        return 2  # the one sentence stays the only line
    except Exception as e:  # the store out of reach after every retry: one sentence, not a traceback
        from pipeline.io.retry import is_transient

        console.log_to_file(f"{prog} failed", e)  # the traceback, whatever the error, in the run's log
        # a storage fault itself, or raised from one: not an error raised while handling one (a bug)
        if not is_transient(e, context=False):
            raise
        where = f"; the traceback is in {console.log_path()}" if console.log_path() else ""
        typer.echo(
            f"error: the storage did not answer ({type(e).__name__}: {redact_text(str(e))}): re-run the same command "
            f"once it does (finished work is kept and skipped){where}.",
            err=True,
        )
        return 3
    except SystemExit as e:  # click's standalone mode ends every run with SystemExit
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    else:
        code = 0
    if code == 0 and console.log_line():
        typer.echo(console.log_line(), err=True)
    return code


def main(module: str, argv: list[str] | None = None, verbose: bool = True) -> int:
    """`python -m jobs.NAME`: the module's `command` as a program of its own (what `ray job
    submit` runs), with the same options and errors as `dinoseg NAME`."""
    job = importlib.import_module(module)
    name = job.__spec__.name if job.__spec__ else module  # "jobs.segment", also when run as __main__
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command()(job.command)
    from pipeline.runtime import console

    console.configure(verbose)
    return run_command(single, argv, prog=f"python -m {name}")
