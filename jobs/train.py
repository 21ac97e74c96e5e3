"""`dinoseg train IMAGES MASKS --classes FILE --output URL` / `python -m jobs.train ...`."""

import sys

from jobs.options import config_command, main
from pipeline.train import TrainConfig, run_train, summary

command = config_command(
    TrainConfig,
    run_train,
    summary,
    doc="Train a segmentation head on a frozen DINOv2 backbone (Ray Train); the best head goes to OUTPUT/head.pt.",
)

if __name__ == "__main__":
    sys.exit(main(__name__))
