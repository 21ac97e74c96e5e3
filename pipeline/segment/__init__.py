"""The segment workflow: every image under INPUT -> a mask under OUTPUT (`run_segment`)."""

from pipeline.segment.config import DEFAULT_MODEL, SegmentConfig
from pipeline.segment.run import run_segment
from pipeline.segment.write import summary_table

__all__ = ["DEFAULT_MODEL", "SegmentConfig", "run_segment", "summary_table"]
