"""`dinoseg`: the command-line entry point. Thin: parses options, calls jobs, prints results.

Errors a user can cause (`DinosegError`) end in their one-sentence message and exit status 2.
"""

from __future__ import annotations

import sys

import typer

from jobs.options import run_command

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Semantic segmentation with a frozen DINOv2 backbone.",
)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress and details.")) -> None:
    from pipeline.runtime import console

    console.configure(verbose)


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
    from jobs import (
        demo,
        discover,
        evaluate,
        export,
        import_labels,
        prototypes,
        pseudo_label,
        segment,
        self_train,
        serve_labelstudio,
        synthetic,
        text_head,
        train,
    )

    for name, job in (
        ("segment", segment),
        ("pseudo-label", pseudo_label),
        ("train", train),
        ("self-train", self_train),
        ("evaluate", evaluate),
        ("export", export),
        ("serve-labelstudio", serve_labelstudio),
        ("import", import_labels),
        ("discover", discover),
        ("prototypes", prototypes),
        ("text-head", text_head),
        ("synthetic", synthetic),
        ("demo", demo),
    ):
        app.command(name)(job.command)


def main(argv: list[str] | None = None) -> int:
    return run_command(app, argv)


_register()

if __name__ == "__main__":
    sys.exit(main())
