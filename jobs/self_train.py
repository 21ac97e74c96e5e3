"""`dinoseg self-train IMAGES MASKS --unlabeled U --classes F --output OUT` / `python -m jobs.self_train`:
train's options (every round resumes, so not --resume/--overwrite), the pseudo-label rule's, and
how the pseudo-label pass is spread (segment's --actors, --cpus-per-actor, --decode-cpus)."""

import sys

from jobs.options import all_but, command, every, main
from pipeline.label import PseudoLabelConfig
from pipeline.segment import SegmentConfig
from pipeline.selftrain import SelfTrainConfig, rounds_table, run_self_train
from pipeline.train import TrainConfig

OWN = ("unlabeled", "rounds", "start_head")
SCALE = ("actors", "cpus_per_actor", "decode_cpus")
RULE = ("threshold", "class_balanced", "min_coverage")


def self_train_config(values: dict) -> SelfTrainConfig:
    take = lambda names: {k: values.pop(k) for k in names}  # noqa: E731
    own, scale, rule = take(OWN), take(SCALE), take(RULE)
    return SelfTrainConfig(
        TrainConfig(**values), rule=PseudoLabelConfig(SegmentConfig("", ""), **rule), scale=scale, **own
    )


command = command(
    "Self-training: pseudo-label the unlabeled images with the best head, retrain on labeled + pseudo-labeled pairs, "
    "keep the best head; a table of rounds at the end.",
    [
        (SelfTrainConfig, every(*OWN)),
        (TrainConfig, all_but("resume", "overwrite")),
        (SegmentConfig, every(*SCALE)),
        (PseudoLabelConfig, every(*RULE)),
    ],
    self_train_config,
    run_self_train,
    rounds_table,
    help_override={
        "images": "Labeled images: folder/URL prefix, or a .csv/.parquet manifest with image,mask columns "
        "(optional with --start-head).",
    },
    defaults={"images": None},
)

if __name__ == "__main__":
    sys.exit(main(__name__))
