"""The labeling workflows: pseudo-labels (`run_pseudo_label`) and exports to labeling tools
(`run_export`), and imports of the corrections (`run_import`)."""

from pipeline.label.export import ExportConfig, run_export
from pipeline.label.export import summary as export_summary
from pipeline.label.import_labels import ImportConfig, run_import
from pipeline.label.import_labels import summary as import_summary
from pipeline.label.pseudo_label import PseudoLabelConfig, run_pseudo_label
from pipeline.label.pseudo_label import summary as pseudo_label_summary

__all__ = [
    "ExportConfig",
    "ImportConfig",
    "PseudoLabelConfig",
    "export_summary",
    "import_summary",
    "pseudo_label_summary",
    "run_export",
    "run_import",
    "run_pseudo_label",
]
