"""`dinoseg demo [OUTPUT]` / `python -m jobs.demo`: the whole pipeline offline, on the CPU."""

import sys

import typer

from jobs.options import config_command, main
from pipeline.demo import DemoConfig, run_demo

command = config_command(
    DemoConfig,
    lambda config: run_demo(config, echo=typer.echo),
    doc="Offline demo on the CPU: synthetic data, train a head (random backbone), segment, evaluate.",
)

if __name__ == "__main__":
    sys.exit(main(__name__, verbose=False))
