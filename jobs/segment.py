"""`dinoseg segment INPUT OUTPUT` / `python -m jobs.segment INPUT OUTPUT` (what `ray job submit` runs)."""

import sys

from jobs.options import config_command, main
from pipeline.segment import SegmentConfig, run_segment, summary_table

command = config_command(
    SegmentConfig,
    run_segment,
    summary_table,
    doc="Segment every image under INPUT; masks and rows go under OUTPUT. Re-running resumes.",
)

if __name__ == "__main__":
    sys.exit(main(__name__))
