"""`dinoseg serve-labelstudio` / `python -m jobs.serve_labelstudio`: a Label Studio ML backend on
Ray Serve, with segment's model options (declared on SegmentConfig) and the server's own."""

import sys

from jobs.options import all_but, command, every, main
from pipeline.label.backend import BackendConfig
from pipeline.label.serve_labelstudio import backend_config, run_serve_labelstudio
from pipeline.segment import SegmentConfig

MODEL_OPTIONS = (
    "model", "backbone", "head", "backbone_weights", "resolution", "mode", "crop", "stride", "tta", "precision",
    "batch_size", "device", "gpus_per_actor", "cpus_per_actor", "max_megapixels", "storage_options", "address",
)  # fmt: skip


def _config(values: dict) -> BackendConfig:
    model = SegmentConfig(input="", output="", **{k: values[k] for k in MODEL_OPTIONS})  # no input or output here
    return backend_config(model, **{k: v for k, v in values.items() if k not in MODEL_OPTIONS})


command = command(
    "Serve the model to Label Studio as an ML backend (Ray Serve) until interrupted: enter http://HOST:PORT in a "
    "project's Settings > Model, and Label Studio asks it for brush predictions of its tasks.",
    [(SegmentConfig, every(*MODEL_OPTIONS)), (BackendConfig, all_but())],
    _config,
    run_serve_labelstudio,
    help_override={
        "gpus_per_actor": "GPUs per replica (default 1 when the cluster has GPUs).",
        "cpus_per_actor": "CPUs reserved per replica.",
        "batch_size": "Images per forward pass of the model.",
    },
)

if __name__ == "__main__":
    sys.exit(main(__name__))
