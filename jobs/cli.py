"""`dinoseg`: the command-line entry point. Thin: parses options, calls jobs, prints results.

Errors a user can cause (`DinosegError`) end in their one-sentence message and exit status 2.
"""

from __future__ import annotations

import logging
import sys

import typer

from model.errors import DinosegError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Semantic segmentation with a frozen DINOv2 backbone.",
)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress and details.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def models(files: bool = typer.Option(True, help="Show the hub files each model needs.")) -> None:
    """List the named models (backbones, and segmentation models with Meta's heads) and their files."""
    from model.weights import describe_models, hub_url

    rows = describe_models()
    header = {"name": "name", "kind": "kind", "classes": "classes"}
    width = {k: max(len(str(r[k])) for r in [header, *rows]) for k in header}
    line = lambda r, tail: "  ".join(f"{r[k]:<{width[k]}}" for k in header) + "  " + tail  # noqa: E731
    typer.echo(line(header, f"files (under {hub_url()})" if files else ""))
    for r in rows:
        typer.echo(line(r, ", ".join(r["files"]) if files else ""))


def _register() -> None:
    from jobs import demo, evaluate, export, pseudo_label, segment, self_train, synthetic, train

    app.command("segment")(segment.command)
    app.command("pseudo-label")(pseudo_label.command)
    app.command("train")(train.command)
    app.command("self-train")(self_train.command)
    app.command("evaluate")(evaluate.command)
    app.command("export")(export.command)
    app.command("synthetic")(synthetic.command)
    app.command("demo")(demo.command)


def run_command(typer_app, argv: list[str] | None = None, prog: str = "dinoseg") -> int:
    """Run a typer app; usage errors are click's (exit 2), user errors one sentence (exit 2)."""
    try:
        typer_app(args=argv, prog_name=prog)
    except DinosegError as e:
        typer.echo(f"error: {e}", err=True)
        return 2
    except SystemExit as e:  # click's standalone mode ends every run with SystemExit
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def run_job(command, argv: list[str] | None, prog: str, verbose: bool = True) -> int:
    """`python -m jobs.NAME`: one job's typer command as a program of its own (what `ray job
    submit` runs), with the same options and errors as `dinoseg NAME`."""
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command()(command)
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_command(single, argv, prog=prog)


def main(argv: list[str] | None = None) -> int:
    return run_command(app, argv)


_register()

if __name__ == "__main__":
    sys.exit(main())
