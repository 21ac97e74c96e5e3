"""`dinoseg text-head CLASSES OUTPUT.pt` / `python -m jobs.text_head`: a head from class names (dino.txt)."""

import sys

from jobs.options import config_command, main
from pipeline.label.text_head import TextHeadConfig, run_text_head, summary

command = config_command(
    TextHeadConfig,
    run_text_head,
    summary,
    doc="A head for classes named in words, from Meta's dino.txt (no labels, no training): "
    "`segment --head OUTPUT.pt` then segments by similarity to the names.",
)

if __name__ == "__main__":
    sys.exit(main(__name__))
