"""`dinoseg pseudo-label INPUT OUTPUT` / `python -m jobs.pseudo_label INPUT OUTPUT`: segment's
options (minus its output formats, which the pseudo-labels fix) and the selection rule's."""

import sys

from jobs.options import all_but, command, main, values_for
from pipeline.label import PseudoLabelConfig, pseudo_label_summary, run_pseudo_label
from pipeline.segment import SegmentConfig

SET_BY_PSEUDO_LABEL = ("masks", "rle", "overlays", "confidence", "mean_confidence")  # it keeps the maps


def pseudo_label_config(values: dict) -> PseudoLabelConfig:
    own = values_for(PseudoLabelConfig, values)
    return PseudoLabelConfig(SegmentConfig(**{k: v for k, v in values.items() if k not in own}), **own)


command = command(
    "Pseudo-label every image under INPUT: masks with 255 where the model is unsure, in the layout `dinoseg train` "
    "reads. Re-running resumes; another rule re-selects without the model.",
    [(SegmentConfig, all_but(*SET_BY_PSEUDO_LABEL)), (PseudoLabelConfig, all_but())],
    pseudo_label_config,
    run_pseudo_label,
    pseudo_label_summary,
    help_override={"output": "Folder or URL for masks/, labels/, pairs.csv, classes.yaml, raw/, run.json."},
)

if __name__ == "__main__":
    sys.exit(main(__name__))
