"""The labeling workflows: pseudo-labels (`run_pseudo_label`) and exports to labeling tools
(`run_export`)."""

from pipeline.label.export import ExportConfig, run_export
from pipeline.label.export import summary as export_summary
from pipeline.label.pseudo_label import PseudoLabelConfig, run_pseudo_label
from pipeline.label.pseudo_label import summary as pseudo_label_summary

__all__ = [
    "ExportConfig",
    "PseudoLabelConfig",
    "export_summary",
    "pseudo_label_summary",
    "run_export",
    "run_pseudo_label",
]
