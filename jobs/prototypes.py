"""`dinoseg prototypes IMAGES MASKS --classes F --output head.pt` / `python -m jobs.prototypes`."""

import sys

from jobs.options import config_command, main
from pipeline.label.prototypes import PrototypeConfig, run_prototypes, summary

command = config_command(
    PrototypeConfig,
    run_prototypes,
    summary,
    doc="A prototype head from a few labeled images (masks, scribbles or points), no training; "
    "or from the clusters of `dinoseg discover` once you named them.",
)

if __name__ == "__main__":
    sys.exit(main(__name__))
