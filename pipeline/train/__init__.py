"""The train workflow: a head on a frozen DINOv2 backbone, trained by Ray Train (`run_train`)."""

from pipeline.train.config import TrainConfig
from pipeline.train.run import run_train, summary

__all__ = ["TrainConfig", "run_train", "summary"]
