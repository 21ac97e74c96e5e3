"""Prototype heads: nearest-prototype cosine logits (k prototypes per class, invalid ones and
classes without any left out), their state dict, head checkpoints of kind 'prototype', and a
Segmenter on a random ViT-S with a prototype head against the direct computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import HeadCheckpoint, parse_head_checkpoint, save_head_checkpoint
from model.classes import ClassMap, default_color
from model.errors import DinosegError, WeightsError
from model.heads import (
    DEFAULT_TEMPERATURE,
    KIND,
    NO_PROTOTYPE,
    HeadConfig,
    PrototypeHead,
    build_head,
    normalized_features,
    output_classes,
    prototype_config,
    prototype_state,
)
from model.hub import load_backbone, load_head
from model.segmenter import InferenceConfig, Segmenter


def class_map(n: int) -> ClassMap:
    return ClassMap(tuple(f"class-{i}" for i in range(n)), tuple(default_color(i) for i in range(n)))


def one_sentence(message: str) -> bool:
    body = message.rstrip(".")
    return "\n" not in message and message.endswith(".") and ". " not in body.replace("e.g. ", "")


def direct_logits(maps: list[np.ndarray], protos: np.ndarray, valid: np.ndarray, temperature: float) -> np.ndarray:
    """logits[b, c, y, x] = max over valid k of cos(f[b, :, y, x], protos[c, k]) / temperature, by
    loops; NO_PROTOTYPE for a class without a valid prototype. `maps` are (B, D_i, h, w) of one size."""
    f = np.concatenate(maps, axis=1).astype(np.float64)
    b, _, h, w = f.shape
    c, k, _ = protos.shape
    out = np.zeros((b, c, h, w))
    for bi in range(b):
        for y in range(h):
            for x in range(w):
                v = f[bi, :, y, x]
                for ci in range(c):
                    cosines = [
                        v @ protos[ci, ki] / (np.linalg.norm(v) * np.linalg.norm(protos[ci, ki]))
                        for ki in range(k)
                        if valid[ci, ki]
                    ]
                    out[bi, ci, y, x] = max(cosines) / temperature if cosines else NO_PROTOTYPE
    return out


def set_buffers(head: PrototypeHead, protos: torch.Tensor, valid: torch.Tensor, temperature: float) -> None:
    """Write unit prototypes with the invalid ones left in place (not zeroed, as prototype_state
    would): the head must mask by `valid` itself."""
    head.prototypes.copy_(F.normalize(protos, dim=-1))
    head.valid.copy_(valid)
    head.temperature.fill_(temperature)


# ---- the logits ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("layers", [1, 2])
def test_forward_is_max_cosine_over_valid_prototypes_over_temperature(k, layers):
    g = torch.Generator().manual_seed(k * 10 + layers)
    d, c, temperature = 5, 4, 0.1
    maps = [torch.randn(2, d, 3, 4, generator=g) for _ in range(layers)]
    cfg = prototype_config(tuple(range(layers)), d, c, k)
    head = build_head(cfg)
    assert isinstance(head, PrototypeHead) and cfg.kind == KIND and cfg.in_channels == d * layers
    protos = torch.randn(c, k, d * layers, generator=g)
    valid = torch.ones(c, k, dtype=torch.bool)
    valid[3] = False  # class 3: no prototype at all
    if k == 3:
        valid[1, 0] = valid[2, 1:] = False  # some invalid prototypes in classes that have others
    # The invalid prototypes point straight at a feature (cosine 1): they must not count.
    target = torch.cat([m[0, :, 1, 2] for m in maps])
    for ci, ki in zip(*torch.nonzero(~valid, as_tuple=True), strict=True):
        protos[ci, ki] = target
    set_buffers(head, protos, valid, temperature)
    out = head(maps)
    assert out.shape == (2, c, 3, 4) and out.dtype == torch.float32
    ref = direct_logits([m.numpy() for m in maps], protos.numpy(), valid.numpy(), temperature)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-4)
    assert (out[:, 3] == NO_PROTOTYPE).all()
    assert (out.argmax(1) != 3).all()
    prob = out.softmax(1)
    assert torch.isfinite(prob).all()
    torch.testing.assert_close(prob.sum(1), torch.ones(2, 3, 4))


def test_two_layers_of_different_sizes_are_resized_to_the_first():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1, 4, 4, 6, generator=g), torch.randn(1, 4, 2, 3, generator=g)
    head = PrototypeHead(prototype_config((10, 11), 4, 3, 2))
    protos = torch.randn(3, 2, 8, generator=g)
    valid = torch.tensor([[True, True], [True, False], [False, True]])
    set_buffers(head, protos, valid, 0.05)
    out = head([a, b])
    resized = F.interpolate(b, size=(4, 6), mode="bilinear", align_corners=False)
    ref = direct_logits([a.numpy(), resized.numpy()], protos.numpy(), valid.numpy(), 0.05)
    assert out.shape == (1, 3, 4, 6)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-3)
    unit = normalized_features([a, b])
    assert unit.shape == (1, 8, 4, 6)
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(1, 4, 6))


def test_a_feature_equal_to_a_prototype_wins_with_logit_one_over_temperature():
    g = torch.Generator().manual_seed(5)
    f = torch.randn(1, 16, 2, 2, generator=g)
    head = PrototypeHead(prototype_config((11,), 16, 4, 1))
    protos = torch.stack([f[0, :, 0, 0], f[0, :, 0, 1], f[0, :, 1, 0], f[0, :, 1, 1]])[:, None] * 3.0
    head.load_state_dict(prototype_state(protos, torch.ones(4, 1, dtype=torch.bool), 0.2))
    out = head([f])
    assert out.argmax(1).flatten().tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(out.amax(1), torch.full((1, 2, 2), 1 / 0.2))


def test_a_head_with_no_prototype_at_all_gives_uniform_finite_probabilities():
    head = PrototypeHead(prototype_config((11,), 4, 3, 2))  # fresh: every prototype invalid
    out = head([torch.randn(1, 4, 2, 2)])
    assert (out == NO_PROTOTYPE).all()
    torch.testing.assert_close(out.softmax(1), torch.full((1, 3, 2, 2), 1 / 3))


# ---- the state dict --------------------------------------------------------------------------


def test_prototype_state_normalises_and_zeroes_invalid_prototypes():
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(3, 2, 6, generator=g) * 7
    valid = torch.tensor([[True, False], [True, True], [False, False]])
    sd = prototype_state(protos, valid, 0.3)
    assert set(sd) == set(PrototypeHead(prototype_config((11,), 6, 3, 2)).state_dict())
    assert sd["prototypes"].dtype == torch.float32 and sd["valid"].dtype == torch.bool
    torch.testing.assert_close(sd["prototypes"].norm(dim=-1), valid.float())
    torch.testing.assert_close(sd["prototypes"][valid], F.normalize(protos[valid], dim=-1))
    assert (sd["prototypes"][~valid] == 0).all()
    assert torch.equal(sd["valid"], valid)
    assert sd["temperature"].shape == () and float(sd["temperature"]) == pytest.approx(0.3)
    assert float(prototype_state(protos, valid)["temperature"]) == pytest.approx(DEFAULT_TEMPERATURE)
    # fp16 or uint8 validity in: the head's dtypes out
    sd16 = prototype_state(protos.half(), valid.to(torch.uint8))
    assert sd16["prototypes"].dtype == torch.float32 and sd16["valid"].dtype == torch.bool


@pytest.mark.parametrize("temperature", [0.0, -0.1, math.nan])
def test_prototype_state_rejects_a_temperature_that_is_not_positive(temperature):
    with pytest.raises(WeightsError) as e:
        prototype_state(torch.ones(2, 1, 3), torch.ones(2, 1, dtype=torch.bool), temperature)
    assert "temperature" in str(e.value) and one_sentence(str(e.value))
    assert isinstance(e.value, DinosegError)


def test_output_classes_and_build_head_know_prototype_heads():
    sd = prototype_state(torch.randn(7, 2, 4), torch.ones(7, 2, dtype=torch.bool))
    assert output_classes(sd) == 7
    assert output_classes({"bn.weight": torch.ones(3)}) is None
    with pytest.raises(DinosegError, match="prototype"):  # the error lists it as a choice
        build_head(HeadConfig("mlp", (11,), 384, 3))


# ---- checkpoints -----------------------------------------------------------------------------


def prototype_checkpoint(num_classes: int = 3, k: int = 2, seed: int = 0, **overrides) -> HeadCheckpoint:
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(num_classes, k, dtype=torch.bool)
    valid[0, -1] = False
    fields = {
        "backbone": "dinov2_vits14",
        "config": prototype_config((11,), 384, num_classes, k),
        "classes": class_map(num_classes),
        "state_dict": prototype_state(torch.randn(num_classes, k, 384, generator=g), valid, 0.07),
        "resolution": 56,
        "meta": {"source": "prototypes", "images": 3},
    }
    fields.update(overrides)
    return HeadCheckpoint(**fields)


def test_checkpoint_round_trip_through_load_head(tmp_path):
    ckpt = prototype_checkpoint()
    path = str(tmp_path / "proto" / "head.pt")
    save_head_checkpoint(ckpt, path)
    obj = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    assert obj["head"]["kind"] == KIND and obj["head"]["extra"] == {"k": 2}
    loaded = load_head(path)
    assert isinstance(loaded.head, PrototypeHead)
    assert loaded.head.config == ckpt.config and loaded.head.config.extra == {"k": 2}
    assert loaded.classes == ckpt.classes and loaded.backbone == "dinov2_vits14" and loaded.resolution == 56
    assert loaded.meta == ckpt.meta
    for key, value in ckpt.state_dict.items():
        assert torch.equal(loaded.head.state_dict()[key], value), key
    feats = [torch.randn(2, 384, 3, 5, generator=torch.Generator().manual_seed(9))]
    expected = ckpt.build()(feats)
    assert torch.equal(loaded.head(feats), expected)
    # the checksum is the weights', stable across loads, and changes with them
    again = load_head(path)
    assert len(loaded.checksum) == 16 and again.checksum == loaded.checksum
    other = str(tmp_path / "other.pt")
    save_head_checkpoint(prototype_checkpoint(seed=1), other)
    assert load_head(other).checksum != loaded.checksum
    warmer = prototype_checkpoint()
    warmer.state_dict["temperature"] = torch.tensor(0.5)
    save_head_checkpoint(warmer, other)
    assert load_head(other).checksum != loaded.checksum


@pytest.mark.parametrize(
    "shape, match",
    [
        ((4, 2, 384), "4 classes"),  # one class more than the class map and the config
        ((2, 2, 384), "2 classes"),  # one fewer
        ((3, 1, 384), "prototypes"),  # k=1 but the config says 2
        ((3, 2, 768), "prototypes"),  # another width
    ],
)
def test_checkpoint_whose_prototypes_disagree_fails_in_one_sentence(tmp_path, shape, match):
    ckpt = prototype_checkpoint()
    c, k, _ = shape
    ckpt.state_dict = prototype_state(torch.randn(*shape), torch.ones(c, k, dtype=torch.bool))
    path = str(tmp_path / "bad.pt")
    save_head_checkpoint(ckpt, path)
    with pytest.raises(WeightsError) as e:
        load_head(path)
    message = str(e.value)
    assert match in message and "bad.pt" in message
    assert one_sentence(message) and "Traceback" not in message and "Error(" not in message
    # parse alone already catches the class-count disagreements
    if c != 3:
        with pytest.raises(WeightsError):
            parse_head_checkpoint(torch.load(path, weights_only=True), path)


def test_checkpoint_without_prototypes_fails(tmp_path):
    ckpt = prototype_checkpoint()
    del ckpt.state_dict["prototypes"]
    path = str(tmp_path / "bad.pt")
    save_head_checkpoint(ckpt, path)
    with pytest.raises(WeightsError) as e:
        load_head(path)
    assert "bad.pt" in str(e.value) and one_sentence(str(e.value))


# ---- a Segmenter with a prototype head -------------------------------------------------------


@pytest.fixture(scope="module")
def vits():
    return load_backbone("dinov2_vits14", "random")


def test_segmenter_with_prototype_head_matches_the_direct_computation(vits):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
    image[:28, :28] = (200, 40, 40)  # some structure: regions of one colour
    image[28:, 28:] = (30, 60, 200)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1) * 255
    std = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1) * 255
    x = ((torch.from_numpy(image).permute(2, 0, 1).float() - mean) / std)[None]  # 56 = 4 x 14: no padding
    with torch.inference_mode():
        (feats,) = vits.get_intermediate_layers(x, n=[11], reshape=True, norm=True)
    assert feats.shape == (1, 384, 4, 4)
    # prototypes: the backbone's own features at a few cells; class 1 has two, class 2 one and an invalid slot
    cells = [[(0, 0), (3, 0)], [(3, 3), (1, 2)], [(2, 1), None]]
    protos = torch.zeros(3, 2, 384)
    valid = torch.zeros(3, 2, dtype=torch.bool)
    for c, pair in enumerate(cells):
        for j, cell in enumerate(pair):
            if cell is not None:
                protos[c, j], valid[c, j] = feats[0, :, cell[0], cell[1]], True
    head = PrototypeHead(prototype_config((11,), 384, 3, 2))
    head.load_state_dict(prototype_state(protos, valid, 0.05))
    segmenter = Segmenter(vits, head, class_map(3), InferenceConfig(resolution=56, precision="fp32"), device="cpu")
    pred = segmenter.predict([image])[0]
    assert pred.mask.shape == (56, 56) and pred.confidence.shape == (56, 56)
    # the direct computation: cosine / temperature on the grid, bilinear upsampling, argmax
    unit = F.normalize(feats.double(), dim=1)
    p = F.normalize(protos.double(), dim=-1)
    sims = torch.einsum("bdhw,ckd->bckhw", unit, p).masked_fill(~valid[None, :, :, None, None], -2.0)
    logits = sims.amax(2) / 0.05
    up = F.interpolate(logits, size=(56, 56), mode="bilinear", align_corners=False)
    expected = up.argmax(1)[0].numpy()
    agree = (pred.mask == expected).mean()
    assert agree >= 0.99, agree
    assert len(np.unique(expected)) >= 2  # not a trivial one-class mask
    for c, pair in enumerate(cells):  # each prototype's own cell centre is its class
        for cell in filter(None, pair):
            assert pred.mask[14 * cell[0] + 7, 14 * cell[1] + 7] == c
    confidence = up.softmax(1).amax(1)[0].numpy()
    same = pred.mask == expected
    np.testing.assert_allclose(pred.confidence[same], confidence[same], atol=1e-3)


def test_the_head_computes_in_fp32_under_bf16_autocast():
    """bf16 cosines step by about 0.004: near-ties and the softmax confidences pseudo-labels
    threshold would be decided by rounding. The head leaves autocast for its maths."""
    torch.manual_seed(0)
    config = prototype_config((0,), 64, 3, 2)
    head = PrototypeHead(config)
    head.load_state_dict(prototype_state(torch.randn(3, 2, 64), torch.ones(3, 2, dtype=torch.bool), 0.05))
    features = [torch.randn(2, 64, 5, 6)]
    exact = head(features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = head(features)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=0, atol=1e-5)
