"""`dinoseg synthetic OUTPUT` / `python -m jobs.synthetic OUTPUT`: a small synthetic labelled set
(colour-coded shapes, see pipeline.data.synthetic) to try training and evaluation with no download."""

import sys

from jobs.options import config_command, main
from pipeline.data.synthetic import SyntheticConfig, describe, run_synthetic

command = config_command(
    SyntheticConfig,
    run_synthetic,
    describe,
    doc="Write a small synthetic segmentation set (4 kinds of coloured shapes on textured backgrounds).",
)

if __name__ == "__main__":
    sys.exit(main(__name__, verbose=False))
