"""run_serve_labelstudio: the Label Studio ML backend (`pipeline.label.backend`) on Ray Serve,
on one machine (Ray embedded, stopped with the process) or on a cluster (GPU replicas)."""

from __future__ import annotations

import logging
import os
from dataclasses import replace

from model.errors import DinosegError
from pipeline.data.decode import DecodeConfig
from pipeline.label.backend import TOKEN_ENVS, URL_ENV, BackendConfig, LabelStudioBackend, model_version
from pipeline.segment.config import SegmentConfig, inference_config, shrink_for
from pipeline.segment.predict import PredictConfig

log = logging.getLogger(__name__)
progress = logging.getLogger("dinoseg.progress.serve")  # shown on the console (pipeline.runtime.console)


def _replica(config: BackendConfig) -> LabelStudioBackend:
    return LabelStudioBackend(config)


def run_serve_labelstudio(config: BackendConfig) -> None:
    """Serve the model to Label Studio at http://HOST:PORT until interrupted (Ctrl-C, SIGTERM)."""
    from model.weights import weights_env
    from pipeline import runtime
    from pipeline.io.files import absolute_input
    from pipeline.runtime.serve import ServeOptions, serve_http

    if config.replicas < 1 or config.max_batch_size < 1 or config.batch_wait_s < 0:
        raise DinosegError("--replicas and --max-batch-size must be at least 1, --batch-wait-s at least 0.")
    url = config.labelstudio_url or os.environ.get(URL_ENV) or None
    token = config.labelstudio_token or next((os.environ[v] for v in TOKEN_ENVS if os.environ.get(v)), None)
    if url and not token:
        log.warning(
            "no Label Studio token (set %s): images stored in Label Studio (/data/upload/...) will be refused",
            TOKEN_ENVS[0],
        )
    p = config.predict
    # local files as absolute paths, and the driver's weights settings: the replicas run elsewhere
    predict = replace(
        p, head=absolute_input(p.head), backbone_weights=absolute_input(p.backbone_weights), weights_env=weights_env()
    )
    # Load the model once here, on the CPU, first: a wrong name, path or weights file fails in one
    # sentence before any Ray work (the replicas may have GPUs this process lacks).
    segmenter = replace(predict, device="cpu").build()
    version = model_version(segmenter.model_id, segmenter.head_checksum)
    predict = replace(predict, inference=segmenter.config)  # with the resolution resolved
    del segmenter
    # images are shrunk toward the inference resolution as they are decoded; masks keep their size
    decode = replace(config.decode, shrink_to=shrink_for(predict.inference))
    config = replace(config, labelstudio_url=url, labelstudio_token=token, predict=predict, decode=decode)

    started = runtime.start_ray(config.address)
    try:
        cluster = runtime.cluster_resources(joined=not started)
        gpus = config.gpus_per_replica
        if gpus is None:
            gpus = 1.0 if max(cluster.get("GPU", 0), cluster.get(runtime.GPU_CEILING, 0)) else 0.0
        # on the CPU a replica's torch threads use every core anyway; reserve little so several fit
        cpus = config.cpus_per_replica or (
            1.0 if gpus else min(1.0, float(cluster.get("CPU", 1)) / (config.replicas + 1))
        )
        options = ServeOptions(
            config.host, config.port, config.replicas, cpus, gpus, config.max_batch_size, config.batch_wait_s
        )

        def ready(url: str) -> None:
            progress.info(
                "Label Studio ML backend %s at %s (%d replica(s), %s GPU / %s CPU each): enter %s in the project's "
                "Settings > Model; Ctrl-C stops it.",
                version,
                url,
                config.replicas,
                gpus,
                cpus,
                url,
            )

        serve_http(_replica, config, options, ready)
    finally:
        if started:
            runtime.stop_ray()


def backend_config(model: SegmentConfig, **own) -> BackendConfig:
    """The backend's config from segment's model options (`model`: a SegmentConfig whose input
    and output are unused) and the backend's own (`own`: BackendConfig's options)."""
    predict = PredictConfig(
        model.model,
        model.backbone,
        model.head,
        model.backbone_weights,
        inference_config(model),
        model.device,
        storage_options=model.storage_options or None,
    )
    return BackendConfig(
        **own,
        predict=predict,
        decode=DecodeConfig(model.max_megapixels),
        gpus_per_replica=model.gpus_per_actor,
        cpus_per_replica=model.cpus_per_actor,
        address=model.address,
    )
