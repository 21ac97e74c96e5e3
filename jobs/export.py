"""`dinoseg export LABELS OUTPUT --format coco|cvat|labelstudio` / `python -m jobs.export ...`."""

import sys

from jobs.options import config_command, main
from pipeline.label import ExportConfig, export_summary, run_export

command = config_command(
    ExportConfig,
    run_export,
    export_summary,
    doc="Export masks for a labeling tool: COCO JSON, CVAT 'Segmentation mask 1.1', or Label Studio brush predictions. "
    "Pixels equal to the ignore index (255, unsure) get no label: no COCO annotation, CVAT's background 0,0,0, no Label "
    "Studio brush. Without --zip, make CVAT's archive with "
    "`cd OUTPUT && zip -r ../export.zip labelmap.txt ImageSets SegmentationClass`.",
)

if __name__ == "__main__":
    sys.exit(main(__name__))
