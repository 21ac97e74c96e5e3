"""The argmax shortcut (model.upsample.argmax_mask, `predict(confidence=False)`) gives the masks of
the full path (every class sampled at every pixel), and confidence comes only when asked."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_segmenter import image, make_segmenter

from model.argmax import argmax_mask
from model.errors import DinosegError
from model.geometry import centre_pad, resized_size
from model.upsample import Piece, softmax_mask, view_logits

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
TIE = 1e-6  # the only differences allowed: pixels whose two best classes are this close


def whole_piece(out_hw, short, logits_hw=None, num_classes=21, smooth=False, seed=0, device="cpu"):
    """One whole-image piece laid out as Segmenter lays it out (resize, centre padding, 14 px
    cells), with random logits: white noise, or smooth regions (as a real head gives)."""
    h, w = resized_size(*out_hw, short, 4 * short)
    top, bottom, left, right = centre_pad(h, w)
    padded = (h + top + bottom, w + left + right)
    gh, gw = logits_hw or (padded[0] // 14, padded[1] // 14)
    g = torch.Generator().manual_seed(seed)
    if smooth:
        coarse = torch.randn(1, num_classes, max(1, gh // 4), max(1, gw // 4), generator=g) * 4
        logits = F.interpolate(coarse, size=(gh, gw), mode="bicubic", align_corners=False)[0]
    else:
        logits = torch.randn(num_classes, gh, gw, generator=g)
    return Piece(0, 0, (h, w), (0, 0, h, w), (top, left), False, padded, logits.to(device))


def both_masks(pieces, hw, strip_bytes=64 << 20):
    device = pieces[0].logits.device
    full = torch.empty(hw, dtype=torch.int32, device=device)
    fast = torch.empty(hw, dtype=torch.int32, device=device)
    softmax_mask([pieces], hw, strip_bytes, full, None)
    sampled = argmax_mask(pieces, hw, strip_bytes, fast)
    return full, fast, sampled


def tie_only_differences(pieces, hw, full, fast) -> int:
    """How many pixels differ, after checking each of them is an exact float tie: the two
    masks' classes are within TIE of each other in the full path's logits."""
    differ = (full != fast).nonzero(as_tuple=True)
    if len(differ[0]):
        logits = view_logits(pieces, hw, 0, hw[0])
        at_fast = logits.gather(0, fast.long()[None])[0][differ]
        at_full = logits.gather(0, full.long()[None])[0][differ]
        assert torch.all((at_full - at_fast).abs() <= TIE), "a difference that is not a tie"
    return len(differ[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_classes", [2, 21, 150, 300])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize(
    "out_hw, short",
    [
        ((240, 320), 112),  # landscape, grid 8 x 11
        ((400, 300), 256),  # portrait, grid 24 x 18
        ((160, 120), 512),  # smaller than the view, grid 49 x 37
        ((133, 397), 64),  # odd sizes, wide
        ((1000, 17), 28),  # tall and thin: the long side capped
        ((5, 7), 112),  # smaller than the view: upsampling the other way
        ((1, 1), 14),  # one pixel
    ],
)
def test_argmax_shortcut_gives_the_full_paths_mask(out_hw, short, num_classes, smooth, device):
    piece = whole_piece(out_hw, short, num_classes=num_classes, smooth=smooth, seed=num_classes, device=device)
    full, fast, sampled = both_masks([piece], out_hw)
    assert tie_only_differences([piece], out_hw, full, fast) == 0
    assert fast.min() >= 0 and fast.max() < num_classes
    if smooth and min(out_hw) > 100:  # both branches ran: pixels from the corners, and sampled
        assert 0 < sampled < 0.9 * out_hw[0] * out_hw[1], sampled


@pytest.mark.parametrize("logits_hw", [(1, 1), (1, 6), (6, 1), (2, 2)])
def test_tiny_logit_grids(logits_hw):
    out_hw = (37, 53)
    piece = whole_piece(out_hw, 28, logits_hw=logits_hw, num_classes=7, seed=3)
    full, fast, _ = both_masks([piece], out_hw)
    assert tie_only_differences([piece], out_hw, full, fast) == 0
    if logits_hw == (1, 1):  # border padding: one cell's class everywhere
        assert torch.all(fast == piece.logits[:, 0, 0].argmax())


def test_pixels_on_cell_centres_and_exact_ties():
    """One pixel per cell: every coordinate falls exactly on a cell centre, where our floor and
    grid_sample's may differ in the last bit; and two classes tied everywhere: the first wins."""
    n = 40
    logits = torch.randn(9, n, n + 3, generator=torch.Generator().manual_seed(5))
    logits[4] = logits.max(0).values + 1  # class 4 and its copy, class 6, tie for the max
    logits[6] = logits[4]
    logits[4, : n // 2] -= 5  # ... in the lower half only
    piece = Piece(0, 0, (n, n + 3), (0, 0, n, n + 3), (0.0, 0.0), False, (n, n + 3), logits)
    full, fast, _ = both_masks([piece], (n, n + 3))
    assert tie_only_differences([piece], (n, n + 3), full, fast) == 0
    assert torch.equal(fast, logits.max(0).indices.int())  # each pixel is its own cell
    assert torch.all(fast[n // 2 :] == 4)  # the tie keeps the first index


def test_near_ties_are_sampled_not_guessed():
    """Two classes a rounding error apart at every cell: the corners agree on no pixel, so each
    is sampled, and rounding decides exactly as it does in the full path."""
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(5, 9, 12, generator=g)
    logits[3] = logits.max(0).values + 2
    logits[1] = logits[3] + 1e-6 * torch.randn(9, 12, generator=g)  # class 1 or 3, by a hair
    piece = Piece(0, 0, (90, 120), (0, 0, 90, 120), (0.0, 0.0), False, (90, 120), logits)
    full, fast, sampled = both_masks([piece], (90, 120))
    assert torch.equal(full, fast) and sampled == 90 * 120
    assert set(fast.unique().tolist()) == {1, 3}


def test_a_class_that_wins_only_between_its_corners_is_sampled():
    """Cells (10, 0, 9, -5) and (0, 10, 9, -5): class 2 is no corner's argmax but wins between
    them; class 3 cannot win anywhere and is never sampled."""
    logits = torch.tensor([[10.0, 0.0], [0.0, 10.0], [9.0, 9.0], [-5.0, -5.0]])[:, None, :]  # (4, 1, 2)
    piece = Piece(0, 0, (3, 40), (0, 0, 3, 40), (0.0, 0.0), False, (3, 40), logits)
    full, fast, _ = both_masks([piece], (3, 40))
    assert torch.equal(full, fast)
    assert set(fast[0].tolist()) == {0, 1, 2}


def test_strips_and_chunks_do_not_change_the_mask():
    out_hw = (123, 301)
    piece = whole_piece(out_hw, 64, num_classes=5, smooth=True, seed=2)
    full, fast, sampled = both_masks([piece], out_hw, strip_bytes=1)  # a row per strip, a pixel per chunk
    assert sampled > 0 and torch.equal(full, fast)
    assert torch.equal(fast, both_masks([piece], out_hw)[1])


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"resolution": 224},
        {"mode": "slide", "crop": 112, "stride": 70, "resolution": 224},  # overlapping windows averaged
        {"mode": "slide", "crop": 56, "stride": 56},  # windows side by side
    ],
)
def test_predict_without_confidence_gives_the_same_masks(config):
    seg = make_segmenter(**config)
    images = [image(100, 150), image(301, 203, 1), image(1, 1, 2), image(20, 900, 3), image(257, 255, 4)]
    with_conf = seg.predict(images)
    without = seg.predict(images, confidence=False)
    for img, a, b in zip(images, with_conf, without, strict=True):
        assert b.confidence is None and b.mean_confidence is None and b.class_counts is None
        assert a.mask.shape == img.shape[:2] and b.mask.dtype == np.uint8
        np.testing.assert_array_equal(a.mask, b.mask)
    assert len(np.unique(without[1].mask)) > 1  # not a constant mask


@pytest.mark.parametrize("config", [{}, {"mode": "slide", "crop": 56, "stride": 42}])
def test_many_classes_without_confidence(config):
    seg = make_segmenter(num_classes=300, **config)
    images = [image(100, 150), image(57, 31, 1)]
    for a, b in zip(seg.predict(images), seg.predict(images, confidence=False), strict=True):
        assert b.mask.dtype == np.uint16
        np.testing.assert_array_equal(a.mask, b.mask)


def test_shrunk_inputs_with_output_sizes():
    seg = make_segmenter(mode="slide", crop=56, stride=42)
    full = image(448, 601, 8)
    small, sizes = [full[::2, ::2].copy(), full[::3, ::3].copy()], [(448, 601), (448, 601)]
    a = seg.predict(small, output_sizes=sizes)
    b = seg.predict(small, output_sizes=sizes, confidence=False)
    for x, y in zip(a, b, strict=True):
        assert y.mask.shape == (448, 601)
        np.testing.assert_array_equal(x.mask, y.mask)


def test_confidence_and_counts_only_when_asked():
    seg = make_segmenter()
    images = [image(100, 150), image(61, 77, 1)]
    maps = seg.predict(images)
    means = seg.predict(images, confidence="mean", class_counts=True)
    for m, p in zip(maps, means, strict=True):
        assert p.confidence is None and m.class_counts is None
        assert m.mean_confidence == pytest.approx(float(m.confidence.astype(np.float64).mean()), rel=1e-6)
        assert p.mean_confidence == pytest.approx(m.mean_confidence, rel=1e-6)
        np.testing.assert_array_equal(p.mask, m.mask)
        np.testing.assert_array_equal(p.class_counts, np.bincount(m.mask.ravel(), minlength=seg.num_classes))
        assert p.class_counts.dtype == np.int64
    with pytest.raises(DinosegError, match="confidence="):
        seg.predict(images, confidence="map")


def test_tta_without_confidence_keeps_the_mask():
    seg = make_segmenter(flip=True, scales=(1.0, 1.5))
    img = image(90, 131, 4)
    a, b = seg.predict([img])[0], seg.predict([img], confidence=False)[0]
    np.testing.assert_array_equal(a.mask, b.mask)
    assert b.confidence is None
