"""Training augmentation: AugmentPairs (rescale, crop, flip, jitter keep image and label aligned)."""

from __future__ import annotations

import numpy as np
from pair_samples import photo, quadrants

from model.classes import IGNORE_INDEX as IGNORE
from model.geometry import PATCH_SIZE as PATCH
from pipeline.train.trainset import MEAN_RGB, AugmentConfig, AugmentPairs, photometric

# ---- AugmentPairs ----------------------------------------------------------------------------


def test_crop_px_is_a_whole_number_of_patches():
    for crop in (5, 14, 100, 500, 512, 518, 1000):
        c = AugmentConfig(crop=crop).crop_px
        assert c % PATCH == 0 and c >= PATCH and (abs(c - crop) <= PATCH // 2 or crop < PATCH)
    assert AugmentConfig(crop=518).crop_px == 518 and AugmentConfig(crop=512).crop_px == 518


def test_augment_gives_fixed_crops_and_drops_failed_rows():
    pixels = np.empty(3, dtype=object)
    labels = np.empty(3, dtype=object)
    pixels[0], labels[0] = photo(40, 60), quadrants(40, 60)
    pixels[1], labels[1] = np.zeros((0, 0, 3), np.uint8), np.zeros((0, 0), np.uint8)
    pixels[2], labels[2] = photo(90, 30), quadrants(90, 30)
    b = {
        "key": np.array(["a", "b", "c"], dtype=object),
        "pixels": pixels,
        "label": labels,
        "error_stage": np.array(["", "mask", ""], dtype=object),
    }
    out = AugmentPairs(AugmentConfig(crop=50, resolution=56, seed=0))(b)
    assert list(out["key"]) == ["a", "c"]
    assert out["pixels"].shape == (2, 56, 56, 3) and out["pixels"].dtype == np.uint8
    assert out["label"].shape == (2, 56, 56) and out["label"].dtype == np.uint8
    assert set(np.unique(out["label"])) <= {0, 1, 2, IGNORE}


STEP = 20  # grey level per class


def coded_pair():
    """An image whose grey level encodes its label (pixel = STEP * class): 12 px blocks whose
    class is row + column, so neighbours differ by one class and a bilinear edge blends only
    between the two of them; one block is ignore (255) but keeps its grey, so it adds no edge."""
    by, bx = np.mgrid[0:5, 0:7]
    grey = np.kron((by + bx) * STEP, np.ones((12, 12), int)).astype(np.uint8)  # 60 x 84, classes 0..10
    label = np.kron(by + bx, np.ones((12, 12), int)).astype(np.uint8)
    label[24:36, 36:48] = IGNORE
    return np.repeat(grey[..., None], 3, axis=-1), label


def test_augment_keeps_image_and_label_aligned():
    rgb, label = coded_pair()
    aug = AugmentPairs(AugmentConfig(crop=56, resolution=64, jitter=False, seed=3))
    scores, shifted, mirrored, padded = [], [], [], 0
    for _ in range(60):
        px, lb = aug.augment(rgb, label)
        assert px.shape == (56, 56, 3) and lb.shape == (56, 56)
        assert set(np.unique(lb)) <= set(np.unique(label))  # nearest resize: no new classes
        pad = (px == np.array(MEAN_RGB, np.uint8)).all(-1)
        padded += pad.any()
        assert (lb[pad] == IGNORE).all()  # padded image pixels are ignored in the label
        scores.append(agreement(px, lb))
        shifted.append(agreement(px, np.roll(lb, 6, axis=1)))
        mirrored.append(agreement(px, lb[:, ::-1]))
    assert min(scores) >= 0.95, sorted(scores)[:5]
    assert padded > 0  # scale 0.5 gives a short side < crop: the pad path was exercised
    # the check has power: the same crops with the label shifted by 6 px, or mirrored alone, fail it
    assert np.mean(shifted) < 0.8 and np.mean(mirrored) < 0.8


def test_augment_flips_both_halves_together():
    # a horizontal ramp: column order tells whether an output was mirrored
    label = np.repeat(np.repeat(np.arange(6, dtype=np.uint8)[None, :], 14, axis=1), 28, axis=0)  # 28 x 84
    rgb = np.repeat((label.astype(np.int32) * 40).astype(np.uint8)[..., None], 3, axis=-1)
    aug = AugmentPairs(AugmentConfig(crop=28, resolution=28, scale_range=(1.0, 1.0), jitter=False, seed=0))
    directions = set()
    for _ in range(30):
        px, lb = aug.augment(rgb, label)
        lab_dir = np.sign(int(lb[0, -1]) - int(lb[0, 0]))
        img_dir = np.sign(int(px[0, -1, 0]) - int(px[0, 0, 0]))
        assert lab_dir == img_dir
        directions.add(int(lab_dir))
    assert directions == {-1, 1}  # both flipped and unflipped crops happened


def test_jitter_changes_colours_not_labels():
    rgb, label = coded_pair()
    changed = 0
    for seed in range(20):  # jitter draws after the crop and flip: the same seed, the same geometry
        p0, l0 = AugmentPairs(AugmentConfig(crop=56, resolution=64, jitter=False, seed=seed)).augment(rgb, label)
        p1, l1 = AugmentPairs(AugmentConfig(crop=56, resolution=64, jitter=True, seed=seed)).augment(rgb, label)
        assert np.array_equal(l0, l1)
        changed += not np.array_equal(p0, p1)
    assert changed > 10  # each of the 3 jitters happens with p = 1/2: all 3 skipped 1 time in 8


def test_photometric_keeps_grey_grey_and_order():
    ramp = np.repeat(np.linspace(0, 255, 64).astype(np.uint8)[None, :, None], 3, axis=2).repeat(4, axis=0)
    rng = np.random.default_rng(0)
    for _ in range(30):
        out = photometric(ramp, rng)
        assert out.dtype == np.uint8 and out.shape == ramp.shape
        assert np.abs(out.astype(int) - out[..., :1].astype(int)).max() <= 1  # R = G = B
        assert (np.diff(out[0, :, 0].astype(int)) >= -1).all()  # brightness/contrast keep the order


def agreement(px: np.ndarray, lb: np.ndarray) -> float:
    """Fraction of labelled pixels whose colour decodes (nearest multiple of STEP) to their label."""
    keep = lb != IGNORE
    decoded = np.rint(px[..., 0].astype(np.float32) / STEP)
    return float((decoded[keep] == lb[keep]).mean())
