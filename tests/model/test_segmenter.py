"""Segmenter: preprocessing, whole/slide, TTA, strip-wise upsampling, precision, bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.backbone import BackboneConfig, build_backbone
from model.classes import ClassMap, default_color
from model.errors import DinosegError, ImageInputError
from model.heads import ConvHead, HeadConfig, LinearHead, default_layers
from model.segmenter import InferenceConfig, Segmenter, centre_pad, resized_size, window_starts

TINY = BackboneConfig("tiny", 48, 4, 3)


def classes(n):
    return ClassMap(tuple(f"c{i}" for i in range(n)), tuple(default_color(i) for i in range(n)))


def make_segmenter(kind="linear", num_classes=5, seed=0, **config):
    torch.manual_seed(seed)
    vit = build_backbone(TINY)
    head_cls = ConvHead if kind == "conv" else LinearHead
    head = head_cls(HeadConfig(kind, default_layers(kind, TINY.depth), TINY.embed_dim, num_classes))
    for p in head.parameters():  # a random head with large weights, so classes differ across the image
        p.data.normal_(0, 0.5)
    for m in head.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.fill_(1.0)
    config.setdefault("resolution", 112)
    config.setdefault("precision", "fp32")
    return Segmenter(vit, head, classes(num_classes), InferenceConfig(**config), device="cpu")


def image(h, w, seed=0):
    """A structured image (smooth gradients, blocks of colour), not white noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx // 16 + yy // 16) % 2) * 200], -1)
    img = img + rng.integers(0, 30, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_geometry_helpers():
    assert resized_size(1000, 2000, 512, 2048) == (512, 1024)
    assert resized_size(100, 1000, 512, 2048) == (205, 2048)  # long side capped, ratio kept
    assert centre_pad(512, 683) == (3, 3, 1, 2)  # 518 x 686
    assert centre_pad(518, 518) == (0, 0, 0, 0)
    assert window_starts(683, 512, 341) == [0, 171]  # last window flush with the edge
    assert window_starts(1200, 512, 341) == [0, 341, 682, 688]
    assert window_starts(300, 512, 341) == [0]


@pytest.mark.parametrize("kind", ["linear", "ms", "conv"])
def test_masks_have_input_size_and_valid_confidence(kind):
    seg = make_segmenter(kind)
    images = [image(100, 150), image(300, 200, 1), image(1, 1), image(20, 900)]
    preds = seg.predict(images)
    for img, p in zip(images, preds, strict=True):
        assert p.mask.shape == img.shape[:2] and p.mask.dtype == np.uint8
        assert p.confidence.shape == img.shape[:2] and p.confidence.dtype == np.float32
        assert p.mask.max() < seg.num_classes
        assert np.all(p.confidence >= 1.0 / seg.num_classes - 1e-5) and np.all(p.confidence <= 1.0 + 1e-6)
    assert len(np.unique(preds[0].mask)) > 1  # the test would be vacuous with a constant mask


def test_upsampling_is_bilinear_on_logits_before_argmax():
    """At the network's own size (no resize, no padding) the output is exactly the bilinear
    upsampling of the logit grid, argmaxed; the mask is not a resized coarse mask."""
    seg = make_segmenter()
    img = image(112, 140)
    x = (torch.from_numpy(img).permute(2, 0, 1).float() - seg.mean) / seg.std
    with torch.inference_mode():
        logits = seg(x[None])  # (1, C, 8, 10)
    up = F.interpolate(logits, size=(112, 140), mode="bilinear", align_corners=False)[0]
    p = seg.predict([img])[0]
    np.testing.assert_array_equal(p.mask, up.argmax(0).numpy())
    np.testing.assert_allclose(p.confidence, up.softmax(0).max(0).values.numpy(), atol=1e-5)
    coarse = F.interpolate(logits.argmax(1, keepdim=True).float(), size=(112, 140), mode="nearest")[0, 0]
    assert not np.array_equal(p.mask, coarse.numpy())  # finer than nearest-upsampling the 8x10 mask


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_slide_equals_whole_when_one_crop_covers_the_image(kind):
    whole = make_segmenter(kind)
    slide = whole.with_config(mode="slide", crop=512, stride=341)
    images = [image(100, 150), image(200, 90, 2)]
    for a, b in zip(whole.predict(images), slide.predict(images), strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_allclose(a.confidence, b.confidence, atol=1e-6)


def test_slide_windows_cover_every_pixel_and_stay_close_to_whole():
    whole = make_segmenter(resolution=224)
    slide = whole.with_config(mode="slide", crop=112, stride=70)
    img = image(224, 397, 3)
    a, b = whole.predict([img])[0], slide.predict([img])[0]
    assert np.isfinite(b.confidence).all() and b.confidence.min() > 0
    assert (a.mask == b.mask).mean() > 0.5  # same model, other context: most pixels agree
    assert not np.array_equal(a.mask, b.mask)  # but the windows really were used


def test_flip_tta_keeps_shapes_and_is_mirror_symmetric():
    seg = make_segmenter(flip=True)
    img = image(90, 131, 4)
    p = seg.predict([img])[0]
    q = seg.predict([img[:, ::-1]])[0]
    assert p.mask.shape == img.shape[:2]
    np.testing.assert_array_equal(p.mask, q.mask[:, ::-1])
    np.testing.assert_allclose(p.confidence, q.confidence[:, ::-1], atol=1e-5)
    plain = make_segmenter().predict([img])[0]
    assert not np.array_equal(plain.confidence, p.confidence)  # the flipped view did contribute


def test_multiscale_tta_runs_and_averages_probabilities():
    seg = make_segmenter(scales=(1.0, 1.5), flip=True)
    img = image(100, 120, 5)
    p = seg.predict([img])[0]
    assert p.mask.shape == (100, 120)
    assert p.confidence.max() <= 1.0 + 1e-6


def test_strips_give_the_same_result_as_one_pass():
    seg = make_segmenter(scales=(1.0, 1.3), mode="slide", crop=112, stride=84)
    images = [image(250, 333, 6)]
    one = seg.with_config(strip_bytes=1 << 40).predict(images)[0]
    many = seg.with_config(strip_bytes=1).predict(images)[0]  # one row at a time
    np.testing.assert_array_equal(one.mask, many.mask)
    np.testing.assert_allclose(one.confidence, many.confidence, atol=1e-6)


def test_batching_does_not_change_results():
    seg = make_segmenter()
    images = [image(100, 150, i) for i in range(5)] + [image(120, 90, 9)]
    together = seg.with_config(batch_size=8).predict(images)
    alone = [seg.with_config(batch_size=1).predict([img])[0] for img in images]
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_allclose(a.confidence, b.confidence, atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_argmax_agrees_with_fp32(precision):
    fp32 = make_segmenter(resolution=224)
    low = fp32.with_config(precision=precision)
    assert low.precision == precision
    img = image(224, 300, 7)
    a, b = fp32.predict([img])[0], low.predict([img])[0]
    assert not np.array_equal(a.confidence, b.confidence)  # autocast really ran in low precision
    agreement = (a.mask == b.mask).mean()
    assert agreement >= 0.99, agreement


def test_many_classes_give_uint16_masks():
    seg = make_segmenter(num_classes=300)
    p = seg.predict([image(56, 56)])[0]
    assert p.mask.dtype == np.uint16 and p.mask.max() < 300


@pytest.mark.parametrize(
    "bad, phrase",
    [
        (np.zeros((10, 10, 3), np.float32), "float32"),
        (np.zeros((10, 10), np.uint8), "(10, 10)"),
        (np.zeros((10, 10, 4), np.uint8), "(10, 10, 4)"),
        (np.zeros((0, 10, 3), np.uint8), "(0, 10, 3)"),
        ("cat.jpg", "str"),
    ],
)
def test_bad_images_get_a_clear_error(bad, phrase):
    seg = make_segmenter()
    with pytest.raises(ImageInputError) as e:
        seg.predict([image(20, 20), bad])
    assert "image 1" in str(e.value) and phrase in str(e.value) and "uint8 RGB" in str(e.value)


def test_a_single_array_instead_of_a_list_is_refused_clearly():
    with pytest.raises(ImageInputError, match="list of images"):
        make_segmenter().predict(image(20, 20))


@pytest.mark.parametrize(
    "option", [{"mode": "tiles"}, {"stride": 600}, {"scales": ()}, {"batch_size": 0}, {"precision": "fp8"}]
)
def test_bad_options_are_refused(option):
    with pytest.raises(DinosegError):
        make_segmenter(**option)


def test_device_must_exist():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DinosegError, match="no CUDA GPU"):
        Segmenter(build_backbone(TINY), LinearHead(HeadConfig("linear", (3,), 48, 2)), classes(2), device="cuda")


def test_backbone_is_frozen_and_in_eval_mode():
    seg = make_segmenter()
    assert not any(p.requires_grad for p in seg.parameters())
    assert not seg.backbone.training and not seg.head.training


def test_a_pre_shrunk_image_gives_a_mask_at_the_original_size():
    seg = make_segmenter(resolution=112)
    full = image(448, 600, 8)
    small = full[::2, ::2].copy()  # what a decode step may send: smaller, same aspect
    a = seg.predict([full])[0]
    b = seg.predict([small], output_sizes=[(448, 600)])[0]
    assert b.mask.shape == (448, 600)
    assert (a.mask == b.mask).mean() > 0.97  # same views up to the shrinking of the input
    with pytest.raises(ImageInputError, match="one \\(H, W\\) per image"):
        seg.predict([small], output_sizes=[])
