"""The driver's `_load_model`: the model described, never built, and the same identity as before.

An OUTPUT written before the driver stopped building a Segmenter must resume: the identity of
the same model and options is the one the built Segmenter gave (`built_identity` is how
`identity_of` read a Segmenter then), and a pinned digest guards it against drift.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hubs import write_hub

from model import backbone as backbone_module
from model import hub as hub_module
from model.checkpoint import HeadCheckpoint, save_head_checkpoint
from model.classes import ClassMap
from model.errors import WeightsError
from model.heads import HeadConfig, LinearHead
from model.hub import build_segmenter
from pipeline.segment import run as segment_run
from pipeline.segment.config import SegmentConfig, inference_config
from pipeline.segment.identity import digest, weights_digest

CLASSES = ClassMap(("bg", "thing", "stuff"), ((0, 0, 0), (255, 0, 0), (0, 255, 0)))
# the identity of `pinned_head` with random weights, slide 224/112, model id set to "m", as the
# driver computed it from a built Segmenter before this change
PINNED = "825fa8c9361ead57"


def built_identity(seg, backbone_weights, so=None) -> dict:
    """identity_of as it read a built Segmenter (before the driver only described the model)."""
    cfg, slide = seg.config, seg.config.mode == "slide"
    return {
        "model": seg.model_id,
        "head": seg.head_checksum,
        "backbone_weights": weights_digest(seg.backbone.config.name, backbone_weights, so),
        "normalisation": [round(float(v), 6) for v in (seg.mean / 255).flatten().tolist()]
        + [round(float(v), 6) for v in (seg.std / 255).flatten().tolist()],
        "resolution": cfg.resolution,
        "mode": cfg.mode,
        "crop": cfg.crop if slide else None,
        "stride": cfg.stride if slide else None,
        "tta": bool(cfg.flip or tuple(cfg.scales) != (1.0,)),
        "precision": cfg.precision,
        "long_side_ratio": cfg.long_side_ratio,
    }


@pytest.fixture
def pinned_head(tmp_path) -> str:
    """A head whose tensors are fixed numbers (no random generator), its own normalisation."""
    config = HeadConfig("linear", (11,), 384, 3)
    state = {
        k: (torch.arange(v.numel(), dtype=torch.float32).reshape(v.shape) / 1000).to(v.dtype)
        for k, v in LinearHead(config).state_dict().items()
    }
    path = str(tmp_path / "pinned.pt")
    ckpt = HeadCheckpoint(
        "dinov2_vits14", config, CLASSES, state, resolution=224, mean=(0.5, 0.45, 0.4), std=(0.2, 0.25, 0.3)
    )
    save_head_checkpoint(ckpt, path)
    return path


@pytest.fixture
def forbid_backbone(monkeypatch):
    """Call it, and building (or loading) a backbone in this process fails the test from then on."""

    def refuse(*args, **kwargs):
        raise AssertionError("the driver built a backbone")

    def forbid():
        monkeypatch.setattr(backbone_module.DinoVisionTransformer, "__init__", refuse)
        monkeypatch.setattr(hub_module, "load_backbone", refuse)

    return forbid


@pytest.fixture
def no_backbone(forbid_backbone):
    forbid_backbone()


def load(config: SegmentConfig, unsaved=None):
    return segment_run._load_model(config, inference_config(config), None, unsaved=unsaved)


def test_the_identity_is_the_one_a_built_segmenter_gave(tmp_path, pinned_head, forbid_backbone):
    config = SegmentConfig(
        "in", str(tmp_path / "out"), head=pinned_head, backbone_weights="random", mode="slide", crop=224, stride=112
    )
    seg = build_segmenter(head=pinned_head, backbone_weights="random", config=inference_config(config), device="cpu")
    before = built_identity(seg, "random")
    forbid_backbone()
    predict_config, classes, model_id, checksum, identity = load(config)
    assert identity == before and digest({**identity, "model": "m"}) == PINNED
    assert (classes, model_id, checksum) == (seg.classes, seg.model_id, seg.head_checksum)
    assert predict_config.inference == seg.config and predict_config.inference.resolution == 224  # the head's


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "hub"
    write_hub(root, ["dinov2_vits14_voc2012_linear"])
    monkeypatch.setenv("DINOSEG_HUB", str(root))
    monkeypatch.setenv("DINOSEG_CACHE", str(tmp_path / "cache"))
    return root


def test_a_named_model_from_the_hub_is_checked_not_built(tmp_path, hub, forbid_backbone):
    config = SegmentConfig("in", str(tmp_path / "out"), model="dinov2_vits14_voc2012_linear", resolution=56)
    seg = build_segmenter("dinov2_vits14_voc2012_linear", config=inference_config(config), device="cpu")
    before = built_identity(seg, None)
    assert before["backbone_weights"].startswith("sha256:")  # the hub file's digest
    forbid_backbone()
    predict_config, classes, model_id, checksum, identity = load(config)
    assert identity == before
    assert (len(classes), model_id, checksum) == (21, "dinov2_vits14_voc2012_linear", seg.head_checksum)


def test_wrong_weights_still_fail_on_the_driver_in_one_sentence(tmp_path, hub, no_backbone):
    bad = tmp_path / "bad.pth"
    torch.save({"blocks.0.norm1.weight": torch.ones(384)}, bad)
    config = SegmentConfig("in", str(tmp_path / "out"), model="dinov2_vits14_voc2012_linear", backbone_weights=str(bad))
    with pytest.raises(WeightsError, match="do not fit dinov2_vits14"):
        load(config)


def test_an_unsaved_head_is_named_as_the_file_it_will_be(tmp_path, pinned_head, no_backbone):
    """A text head built on the driver (here any head): described from a local copy, named as
    config.head, whose file does not exist yet."""
    from model.checkpoint import parse_head_checkpoint
    from model.weights import load_checkpoint

    ckpt = parse_head_checkpoint(load_checkpoint(pinned_head), pinned_head)
    target = str(tmp_path / "out" / "text_head.pt")
    config = SegmentConfig("in", str(tmp_path / "out"), head=target, backbone_weights="random")
    predict_config, classes, model_id, checksum, identity = load(config, unsaved=ckpt)
    assert model_id == f"dinov2_vits14+{target}" and identity["model"] == model_id
    assert predict_config.head == target and classes == CLASSES
    assert identity["normalisation"] == [0.5, 0.45, 0.4, 0.2, 0.25, 0.3]
    assert predict_config.inference.resolution == 224  # the head's
