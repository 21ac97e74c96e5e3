"""`dinoseg evaluate PRED GT --classes FILE` / `python -m jobs.evaluate PRED GT --classes FILE`."""

import sys

from jobs.options import config_command, main
from pipeline.evaluate import EvaluateConfig, run_evaluate, summary

command = config_command(
    EvaluateConfig,
    run_evaluate,
    summary,
    doc="Score the masks under PRED against the masks under GT with the same keys: IoU, Dice, accuracy.",
)

if __name__ == "__main__":
    sys.exit(main(__name__))
