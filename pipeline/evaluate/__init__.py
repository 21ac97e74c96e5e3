"""The evaluate workflow: predicted masks against ground-truth masks by key (`run_evaluate`)."""

from pipeline.evaluate.run import EvaluateConfig, compare_masks, run_evaluate, summary

__all__ = ["EvaluateConfig", "compare_masks", "run_evaluate", "summary"]
