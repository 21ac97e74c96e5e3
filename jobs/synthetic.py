"""`dinoseg synthetic OUTPUT` / `python -m jobs.synthetic OUTPUT`: write a small synthetic labelled
set (colour-coded shapes, see pipeline.data.synthetic) to try training and evaluation with no download.
"""

from __future__ import annotations

import shlex
import sys

import typer

from jobs.options import storage_options as parse_storage_options


def command(
    output: str = typer.Argument(..., help="Folder or fsspec URL prefix for train/, val/ and classes.yaml."),
    train: int = typer.Option(48, help="Training images."),
    val: int = typer.Option(16, help="Validation images (0 for none)."),
    size: int = typer.Option(112, help="Short side of the images in pixels (at least 28)."),
    seed: int = typer.Option(0, help="Random seed: the same seed writes the same files."),
    storage_options: str = typer.Option("{}", help="JSON of fsspec storage options (endpoint, credentials...)."),
) -> None:
    """Write a small synthetic segmentation set (4 kinds of coloured shapes on textured backgrounds)."""
    options = parse_storage_options(storage_options)
    from pipeline.data.synthetic import write_synthetic

    typer.echo(describe(write_synthetic(output, train, val, size, seed, options or None)))


def describe(info: dict) -> str:
    """Where the set went, and the `dinoseg train` command to try on it."""
    lines = []
    for split in ("train", "val"):
        if split in info["images"]:
            lines.append(f"{split:<8}{info[split]:>4} images  {info['images'][split]}")
            lines.append(f"{'':<8}{info[split]:>4} masks   {info['masks'][split]}")
    lines.append(f"{'classes':<8}{'':>4}         {info['classes']}")
    train = ["dinoseg", "train", info["images"]["train"], info["masks"]["train"]]
    if "val" in info["images"]:
        train += ["--val-images", info["images"]["val"], "--val-masks", info["masks"]["val"]]
    train += ["--classes", info["classes"], "--output", "OUT"]
    lines += ["", "next, train a head on it (OUT: where the head goes):", "  " + shlex.join(train)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.synthetic OUTPUT [options]`: the same options as `dinoseg synthetic`."""
    from jobs.cli import run_job

    return run_job(command, argv, "python -m jobs.synthetic", verbose=False)


if __name__ == "__main__":
    sys.exit(main())
