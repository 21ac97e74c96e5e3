"""The self-training workflow: rounds of pseudo-label -> retrain -> score, composed of the
label and train workflows' `run_X` (`run_self_train`)."""

from pipeline.selftrain.run import SelfTrainConfig, rounds_table, run_self_train

__all__ = ["SelfTrainConfig", "rounds_table", "run_self_train"]
