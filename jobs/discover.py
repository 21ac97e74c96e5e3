"""`dinoseg discover INPUT OUTPUT --clusters K` / `python -m jobs.discover ...`."""

import sys

from jobs.options import config_command, main
from pipeline.label.discover import DiscoverConfig, run_discover, summary

command = config_command(
    DiscoverConfig,
    run_discover,
    summary,
    doc="Discover a collection's recurring regions: k-means over sampled DINOv2 patch features, written as a "
    "prototype head (classes cluster_0..K-1) with a contact sheet per cluster to name them by.",
)

if __name__ == "__main__":
    sys.exit(main(__name__))
