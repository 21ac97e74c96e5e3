"""`dinoseg import SOURCE OUTPUT --format cvat|coco|labelstudio` / `python -m jobs.import_labels ...`."""

import sys

from jobs.options import config_command, main
from pipeline.label import ImportConfig, import_summary, run_import

command = config_command(
    ImportConfig,
    run_import,
    import_summary,
    doc="Import corrected labels from CVAT ('Segmentation mask 1.1' or 'COCO 1.0'), a COCO / COCO-Stuff JSON, or a "
    "Label Studio JSON export, as a labeled set `train` reads: OUTPUT/masks/<key>.png (255 = no label), "
    "OUTPUT/pairs.csv, OUTPUT/classes.yaml and OUTPUT/problems.jsonl.",
)

if __name__ == "__main__":
    sys.exit(main(__name__))
