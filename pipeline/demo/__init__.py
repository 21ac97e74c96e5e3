"""The demo: synthetic data -> train -> segment -> evaluate, offline on the CPU (`run_demo`)."""

from pipeline.demo.run import RANDOM_BACKBONE_NOTE, DemoConfig, run_demo

__all__ = ["RANDOM_BACKBONE_NOTE", "DemoConfig", "run_demo"]
