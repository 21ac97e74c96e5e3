"""The predictor step: masks and class counts always; the mean confidence only when asked for
(NaN otherwise, a null in the rows); the confidence map when kept; failed rows untouched."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from model.backbone import BackboneConfig, build_backbone
from model.classes import ClassMap, default_color
from model.heads import HeadConfig, LinearHead
from model.segmenter import InferenceConfig, Segmenter
from pipeline.data.schema import empty_errors, object_array
from pipeline.io.masks import quantize_confidence
from pipeline.segment.predict import Predict, PredictConfig

TINY = BackboneConfig("tiny", 48, 4, 3)
CLASSES = 6


@dataclass(frozen=True)
class TinyPredictConfig(PredictConfig):
    """A PredictConfig whose model is a tiny random Segmenter (no weights files)."""

    def build(self):
        torch.manual_seed(0)
        head = LinearHead(HeadConfig("linear", (3,), TINY.embed_dim, CLASSES))
        for p in head.parameters():
            p.data.normal_(0, 0.5)
        head.bn.running_var.fill_(1.0)
        names = tuple(f"c{i}" for i in range(CLASSES))
        classes = ClassMap(names, tuple(default_color(i) for i in range(CLASSES)))
        return Segmenter(build_backbone(TINY), head, classes, InferenceConfig(resolution=56), device="cpu")


def batch(sizes, failed_at=()):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    out = {
        "key": np.array([f"k{i}" for i in range(len(sizes))], dtype=object),
        "image": object_array(images),
        "height": np.array([h for h, _ in sizes]),
        "width": np.array([w for _, w in sizes]),
        **empty_errors(len(sizes)),
    }
    for i in failed_at:
        out["error_stage"][i] = "decode"
    return out


SIZES = [(40, 60), (23, 17), (70, 35)]


@pytest.fixture(scope="module")
def direct():
    """What the model itself says for SIZES: masks and confidence maps."""
    seg = TinyPredictConfig().build()
    return seg.predict(list(batch(SIZES)["image"]), output_sizes=SIZES)


@pytest.mark.parametrize("flags", [{}, {"mean_confidence": True}, {"keep_confidence": True}])
def test_masks_and_counts_always_the_mean_only_when_asked(flags, direct):
    out = Predict(TinyPredictConfig(threads=1, **flags))(batch(SIZES, failed_at=(1,)))
    asked = bool(flags)
    for i, expected in enumerate(direct):
        if i == 1:  # the failed row keeps flowing, with nothing predicted
            assert out["mask"][i].size == 0 and np.isnan(out["mean_confidence"][i])
            continue
        np.testing.assert_array_equal(out["mask"][i], expected.mask)  # the shortcut's mask is the model's
        np.testing.assert_array_equal(out["class_counts"][i], np.bincount(expected.mask.ravel(), minlength=CLASSES))
        assert out["class_counts"][i].dtype == np.int64
        if asked:
            assert out["mean_confidence"][i] == pytest.approx(expected.confidence.mean(), rel=1e-5)
        else:
            assert np.isnan(out["mean_confidence"][i])
    assert out["mean_confidence"].dtype == np.float32
    assert ("confidence" in out) == bool(flags.get("keep_confidence"))
    if "confidence" in out:
        expected = quantize_confidence(direct[0].confidence).astype(np.int64)  # batched otherwise: +-1 step
        np.testing.assert_allclose(out["confidence"][0].astype(np.int64), expected, atol=1)


def test_what_the_segmenter_is_asked_for():
    assert Predict(TinyPredictConfig(threads=1)).confidence is False  # the argmax shortcut
    assert Predict(TinyPredictConfig(threads=1, mean_confidence=True)).confidence == "mean"  # no map copied back
    assert Predict(TinyPredictConfig(threads=1, keep_confidence=True)).confidence is True
