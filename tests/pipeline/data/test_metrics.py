"""Confusion matrix and scores on hand-made masks whose IoU and Dice are worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.data.metrics import confusion_matrix, format_table, scores

# 3 classes; the 255 pixel is ignored (its prediction, 0, must not count).
#   (gt, pred) pairs counted: (0,0) (0,1) (1,1) (1,2) (2,2)
#   class 0: TP 1, GT 2, pred 1 -> IoU 1/2, Dice 2/3
#   class 1: TP 1, GT 2, pred 2 -> IoU 1/3, Dice 1/2
#   class 2: TP 1, GT 1, pred 2 -> IoU 1/2, Dice 2/3
TARGET = np.array([[0, 0, 1], [1, 2, 255]], dtype=np.uint8)
PRED = np.array([[0, 1, 1], [2, 2, 0]], dtype=np.uint8)
CM = [[1, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_confusion_matrix_rows_are_ground_truth_and_ignore_is_skipped():
    cm = confusion_matrix(PRED, TARGET, 3)
    assert cm.dtype == np.int64 and cm.shape == (3, 3)
    assert cm.tolist() == CM
    assert cm.sum() == 5  # the ignored pixel is nowhere, not in column 0 either


def test_scores_worked_out_by_hand():
    r = scores(confusion_matrix(PRED, TARGET, 3), names=["bg", "cat", "dog"])
    assert r["iou"] == pytest.approx([1 / 2, 1 / 3, 1 / 2])
    assert r["dice"] == pytest.approx([2 / 3, 1 / 2, 2 / 3])
    assert r["miou"] == pytest.approx(4 / 9)
    assert r["mean_dice"] == pytest.approx(11 / 18)
    assert r["pixel_accuracy"] == pytest.approx(3 / 5)
    assert r["pixels"] == 5
    assert r["gt_pixels"] == [2, 2, 1] and r["pred_pixels"] == [1, 2, 2]
    assert r["names"] == ["bg", "cat", "dog"]
    json.dumps(r)  # plain Python values only
    assert all(type(v) is float for v in r["iou"]) and type(r["pixels"]) is int


def test_other_ignore_index_and_none():
    target = np.array([0, 1, 2, 2])
    pred = np.array([0, 1, 0, 2])
    assert confusion_matrix(pred, target, 3, ignore_index=2).tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert confusion_matrix(pred, target, 3, ignore_index=None).sum() == 4
    with pytest.raises(ValueError, match=r"target has values \[255\]"):
        confusion_matrix(PRED, TARGET, 3, ignore_index=None)


def test_class_absent_everywhere_is_left_out_of_the_mean():
    r = scores(confusion_matrix(np.array([0, 0, 1]), np.array([0, 0, 1]), 3))
    assert r["iou"] == [1.0, 1.0, None] and r["dice"] == [1.0, 1.0, None]
    assert r["miou"] == 1.0 and r["classes_scored"] == 2  # not 2/3


def test_class_predicted_without_ground_truth_counts_as_zero():
    # class 0: TP 1, GT 2, pred 1 -> 1/2; class 1: 1; class 2: predicted once, never in GT -> 0
    r = scores(confusion_matrix(np.array([0, 2, 1, 1]), np.array([0, 0, 1, 1]), 3))
    assert r["iou"] == pytest.approx([1 / 2, 1.0, 0.0])
    assert r["miou"] == pytest.approx(1 / 2)


def test_empty_matrix_scores_nothing():
    r = scores(np.zeros((3, 3), dtype=np.int64))
    assert r["miou"] is None and r["mean_dice"] is None and r["pixel_accuracy"] is None
    assert r["iou"] == [None, None, None] and r["pixels"] == 0
    assert "names" not in r
    assert "mIoU -" in format_table(r)


def test_torch_and_numpy_agree():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, (4, 37, 29)).astype(np.uint8)
    target[rng.random(target.shape) < 0.2] = 255
    pred = rng.integers(0, 5, target.shape).astype(np.int32)
    expected = confusion_matrix(pred, target, 5)
    got = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 5)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.int64
    assert got.numpy().tolist() == expected.tolist()
    assert scores(got) == scores(expected)
    # by brute force
    brute = np.zeros((5, 5), dtype=np.int64)
    for t, p in zip(target.ravel(), pred.ravel(), strict=True):
        if t != 255:
            brute[t, p] += 1
    assert expected.tolist() == brute.tolist()
    # with unsure predictions: column 5, filled only where the target is not ignored
    pred[rng.random(pred.shape) < 0.2] = 255
    expected = confusion_matrix(pred, target, 5, 255, unlabeled_index=255)
    got = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 5, 255, unlabeled_index=255)
    assert got.numpy().tolist() == expected.tolist() and scores(got) == scores(expected)
    brute = np.zeros((5, 6), dtype=np.int64)
    for t, p in zip(target.ravel(), pred.ravel(), strict=True):
        if t != 255:
            brute[t, min(int(p), 5)] += 1
    assert expected.tolist() == brute.tolist() and brute[:, 5].sum() > 0


# Unsure predictions (255 = unlabeled, a pseudo-label's 'unsure'): the pixels of TARGET/PRED plus
#   (gt 0, unsure) (gt 1, unsure): misses of classes 0 and 1; (gt 255, unsure): ignored
#   class 0: TP 1, GT 3, pred 1 -> IoU 1/3, Dice 2/4
#   class 1: TP 1, GT 3, pred 2 -> IoU 1/4, Dice 2/5
#   class 2: TP 1, GT 1, pred 2 -> IoU 1/2, Dice 2/3   (unsure is nobody's false positive)
UNSURE_TARGET = np.array([[0, 0, 1, 0], [1, 2, 255, 1], [255, 255, 255, 255]], dtype=np.uint8)
UNSURE_PRED = np.array([[0, 1, 1, 255], [2, 2, 0, 255], [255, 0, 1, 2]], dtype=np.uint8)
UNSURE_CM = [[1, 1, 0, 1], [0, 1, 1, 1], [0, 0, 1, 0]]


@pytest.mark.parametrize("as_tensor", [False, True])
def test_unsure_predictions_are_misses_in_an_extra_column(as_tensor):
    conv = torch.from_numpy if as_tensor else np.asarray
    cm = confusion_matrix(conv(UNSURE_PRED), conv(UNSURE_TARGET), 3, 255, unlabeled_index=255)
    assert isinstance(cm, torch.Tensor) == as_tensor
    assert tuple(cm.shape) == (3, 4) and cm.tolist() == UNSURE_CM
    r = scores(cm, names=["bg", "cat", "dog"])
    assert r["iou"] == pytest.approx([1 / 3, 1 / 4, 1 / 2])
    assert r["dice"] == pytest.approx([1 / 2, 2 / 5, 2 / 3])
    assert r["miou"] == pytest.approx((1 / 3 + 1 / 4 + 1 / 2) / 3)
    assert r["pixel_accuracy"] == pytest.approx(3 / 7) and r["pixels"] == 7
    assert r["unlabeled_pixels"] == 2 and r["unlabeled_fraction"] == pytest.approx(2 / 7)
    assert r["gt_pixels"] == [3, 3, 1] and r["pred_pixels"] == [1, 2, 2]
    assert "28.57% predicted unlabeled" in format_table(r).splitlines()[-1]
    # without an unsure pixel, the extra column changes nothing
    plain = confusion_matrix(conv(PRED), conv(TARGET), 3, 255, unlabeled_index=255)
    assert plain.tolist() == [row + [0] for row in CM]
    assert dict(scores(plain).items()) == scores(np.array(CM))
    assert scores(np.array(CM))["unlabeled_fraction"] == 0.0


def test_unlabeled_index_must_not_be_a_class():
    with pytest.raises(ValueError, match="unlabeled_index 2"):
        confusion_matrix(PRED, TARGET, 3, 255, unlabeled_index=2)
    with pytest.raises(ValueError, match=r"pred has values \[254\].*unlabeled index 255"):
        confusion_matrix(np.array([0, 254]), np.array([0, 1]), 3, 255, unlabeled_index=255)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_on_cuda_stays_on_cuda():
    got = confusion_matrix(torch.from_numpy(PRED).cuda(), torch.from_numpy(TARGET).cuda(), 3)
    assert got.device.type == "cuda" and got.cpu().tolist() == CM
    got = confusion_matrix(torch.from_numpy(UNSURE_PRED).cuda(), torch.from_numpy(UNSURE_TARGET).cuda(), 3, 255, 255)
    assert got.device.type == "cuda" and got.cpu().tolist() == UNSURE_CM


@pytest.mark.parametrize("as_tensor", [False, True])
def test_out_of_range_values_raise(as_tensor):
    conv = torch.tensor if as_tensor else np.array
    with pytest.raises(ValueError, match=r"target has values \[3\]"):
        confusion_matrix(conv([0, 1]), conv([0, 3]), 3)
    with pytest.raises(ValueError, match=r"pred has values \[255\]"):
        confusion_matrix(conv([0, 255]), conv([0, 1]), 3)
    with pytest.raises(ValueError, match=r"pred has values \[-1\]"):
        confusion_matrix(conv([0, -1]), conv([0, 1]), 3)
    with pytest.raises(ValueError, match=r"target has values \[-2\]"):
        confusion_matrix(conv([0, 1]), conv([0, -2]), 3)


def test_shape_dtype_and_type_errors():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        confusion_matrix(np.zeros((2, 3), int), np.zeros((3, 2), int), 3)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        confusion_matrix(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix(np.zeros(3), np.zeros(3, int), 3)
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix(torch.zeros(3, dtype=torch.long), torch.zeros(3), 3)
    with pytest.raises(TypeError):
        confusion_matrix(torch.zeros(3, dtype=torch.long), np.zeros(3, int), 3)
    with pytest.raises(ValueError):
        confusion_matrix(np.zeros(3, int), np.zeros(3, int), 0)
    with pytest.raises(ValueError, match=r"\(C, C\) or \(C, C\+1\)"):
        scores(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\(C, C\) or \(C, C\+1\)"):
        scores(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="2 class names"):
        scores(np.eye(3, dtype=np.int64), names=["a", "b"])


def test_format_table():
    r = scores(np.array(CM), names=["background", "cat", "dog"])
    text = format_table(r)
    lines = text.splitlines()
    assert lines[0].split() == ["class", "IoU", "%", "Dice", "%", "GT", "pixels"]
    assert lines[2].split() == ["cat", "33.33", "50.00", "2"]
    assert lines[1].split()[:3] == ["background", "50.00", "66.67"]
    assert lines[-1].startswith("mIoU 44.44  mean Dice 61.11  pixel accuracy 60.00")
    assert "3 of 3 classes scored, 5 pixels" in lines[-1]
    assert not math.isnan(r["miou"])
