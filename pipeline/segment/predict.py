"""The predictor step: holds one Segmenter (loaded once per actor) and turns decoded images into
masks. Device, precision and batch size are decided here, once, in the constructor."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from model.segmenter import InferenceConfig
from pipeline.data.schema import failed, object_array, set_error
from pipeline.io.masks import quantize_confidence
from pipeline.segment.config import DEFAULT_MODEL

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictConfig:
    model: str | None = DEFAULT_MODEL  # a named segmentation model, or None with `head`
    backbone: str | None = None
    head: str | None = None  # URL of a head checkpoint
    backbone_weights: str | None = None  # override; 'random' for the offline demo
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    device: str | None = None  # None/'auto': CUDA when present
    keep_image: bool = False  # pass the decoded image on (overlays need it)
    keep_confidence: bool = False  # pass the confidence map on, as uint16 (see quantize_confidence); fills the mean too
    mean_confidence: bool = False  # fill mean_confidence (NaN otherwise): a full softmax over every class per image
    threads: int | None = None  # torch threads for CPU inference (default: every core of the node)
    storage_options: dict | None = field(default=None, repr=False)  # credentials: never in a repr
    weights_env: dict = field(default_factory=dict, repr=False)  # the driver's (model.weights.weights_env)

    def build(self):
        from model.hub import build_segmenter
        from model.weights import use_weights_env

        use_weights_env(self.weights_env)

        return build_segmenter(
            None if self.head else self.model,
            backbone=self.backbone,
            head=self.head,
            backbone_weights=self.backbone_weights,
            config=self.inference,
            device=self.device,
            storage_options=self.storage_options,
        )


class Predict:
    """batch {image, width, height, ...} -> {mask, class_counts, mean_confidence, ...}.

    The whole batch goes through the model at once; if that fails (a bad image, out of memory)
    the images are retried one by one so one bad input costs only its own row. Confidence is
    computed only when asked for (a map, or only its mean, reduced on the device); without it
    the mask needs every class only where neighbouring logit cells disagree. `mean_confidence`
    is NaN (a null in the rows) when not asked for."""

    def __init__(self, config: PredictConfig):
        self.config = config
        self.segmenter = config.build()
        # what segmenter.predict computes beside the mask
        self.confidence = True if config.keep_confidence else "mean" if config.mean_confidence else False
        if self.segmenter.device.type == "cpu":
            # Ray sets OMP_NUM_THREADS to the actor's CPU request (often 1); CPU inference should
            # use the machine's cores, the decode tasks' share is small beside it.
            import os

            import torch

            torch.set_num_threads(config.threads or len(os.sched_getaffinity(0)))
        log.info(
            "predictor ready: %s on %s (%s)", self.segmenter.model_id, self.segmenter.device, self.segmenter.precision
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        todo = np.flatnonzero(~failed(batch)).tolist()
        masks: list = [np.zeros((0, 0), np.uint8)] * n
        counts: list = [np.zeros(0, np.int64)] * n
        confidence = np.full(n, np.nan, np.float32)
        maps: list = [np.zeros((0, 0), np.uint16)] * n
        for i, pred in self._predict(batch, todo):
            if isinstance(pred, BaseException):
                set_error(batch, i, "predict", pred)
                continue
            masks[i] = pred.mask
            counts[i] = pred.class_counts
            if pred.mean_confidence is not None:
                confidence[i] = pred.mean_confidence
            if self.config.keep_confidence:
                maps[i] = quantize_confidence(pred.confidence)
        out = {k: v for k, v in batch.items() if k != "image" or self.config.keep_image}
        out.update(mask=object_array(masks), class_counts=object_array(counts), mean_confidence=confidence)
        if self.config.keep_confidence:
            out["confidence"] = object_array(maps)
        return out

    def _predict(self, batch, todo: list[int]):
        images = [batch["image"][i] for i in todo]
        sizes = [(int(batch["height"][i]), int(batch["width"][i])) for i in todo]
        try:
            yield from zip(todo, self._segment(images, sizes), strict=True)
            return
        except Exception as e:  # isolate the culprit: retry one by one
            if len(todo) == 1:
                yield todo[0], e
                return
            log.warning("batch of %d failed (%s); retrying images one by one", len(todo), e)
        for i, image, size in zip(todo, images, sizes, strict=True):
            try:
                yield i, self._segment([image], [size])[0]
            except Exception as e:
                yield i, e

    def _segment(self, images, sizes):
        return self.segmenter.predict(images, output_sizes=sizes, confidence=self.confidence, class_counts=True)
