"""Pseudo-label rules and steps, without Ray: threshold semantics, class-balanced thresholds,
the sparse histogram, and the selection step's files and rows."""

import io

import numpy as np
import pytest
from PIL import Image

from model.classes import IGNORE_INDEX as IGNORE
from model.classes import ClassMap
from model.errors import DinosegError
from pipeline.io.masks import decode_mask_png, encode_confidence_png, encode_mask_png, quantize_confidence
from pipeline.label.pseudo import (
    LEVELS,
    NEVER,
    ConfidenceHistogram,
    SelectConfig,
    SelectLabels,
    add_histogram,
    balanced_cutoffs,
    select_pixels,
    summarise_cutoffs,
    threshold_cutoff,
)

CLASSES = ClassMap(("a", "b", "c"), ((10, 10, 10), (200, 0, 0), (0, 200, 0)))


@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.5, 0.9, 0.95, 0.97, 1 / 3, 0.999999, 1.0])
def test_threshold_cutoff_is_exactly_the_rule(threshold):
    q = np.arange(LEVELS)
    kept = q >= threshold_cutoff(threshold)
    assert np.array_equal(kept, q / 65535 >= threshold)


def test_a_pixel_at_the_threshold_is_kept_and_below_is_unsure():
    t = 62258 / 65535  # a confidence the stored maps can hold exactly
    mask = np.array([[1, 1, 2, 0]], np.uint8)
    q = np.array([[62258, 62257, 65535, 0]], np.uint16)
    out = select_pixels(mask, q, [threshold_cutoff(t)] * 3)
    assert out.tolist() == [[1, IGNORE, 2, IGNORE]]
    assert out.dtype == np.uint8


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_threshold_outside_0_1_is_refused(bad):
    with pytest.raises(DinosegError, match="--threshold"):
        threshold_cutoff(bad)


def test_class_balanced_thresholds_keep_each_class_fraction():
    # class 0: 1000 pixels spread evenly over 100 confidence levels; class 1: 400 pixels, mostly
    # very confident; class 2: never predicted
    rng = np.random.default_rng(0)
    levels0 = np.repeat(np.linspace(30000, 65000, 100).astype(np.uint16), 10)
    levels1 = np.concatenate([np.full(300, 65535), np.linspace(20000, 40000, 100).astype(np.uint16)]).astype(np.uint16)
    q = np.concatenate([levels0, levels1])
    mask = np.concatenate([np.zeros(1000, np.uint8), np.ones(400, np.uint8)])
    order = rng.permutation(q.size)
    q, mask = q[order].reshape(28, 50), mask[order].reshape(28, 50)
    hist = np.zeros((3, LEVELS), np.int64)
    for k in range(3):
        hist[k] = np.bincount(q[mask == k], minlength=LEVELS)
    cutoffs = balanced_cutoffs(hist, 0.3)
    labels = select_pixels(mask, q, cutoffs)
    assert (labels[mask == 0] == 0).mean() == pytest.approx(0.3)  # 30 levels of 10 pixels: exact
    # class 1's top 30% are all at one value: ties are kept, so it keeps all 300 (75%)
    assert (labels[mask == 1] == 1).sum() == 300
    assert cutoffs[1] == 65535 and cutoffs[2] == NEVER
    rows = summarise_cutoffs(cutoffs, hist, CLASSES)
    assert rows[0]["kept_fraction"] == pytest.approx(0.3) and rows[1]["kept_pixels"] == 300
    assert rows[2]["threshold"] is None and rows[2]["predicted_pixels"] == 0
    # P = 1 keeps every predicted pixel
    assert (select_pixels(mask, q, balanced_cutoffs(hist, 1.0)) == mask).all()
    with pytest.raises(DinosegError, match="class-balanced"):
        balanced_cutoffs(hist, 0.0)


def test_values_past_the_class_map_are_never_kept():
    out = select_pixels(np.array([[5, 0]], np.uint8), np.array([[65535, 65535]], np.uint16), [0, 0, 0])
    assert out.tolist() == [[IGNORE, 0]]


def test_quantized_confidence_and_its_pngs():
    c = np.array([[0.0, 0.5, 0.9, 1.0, 1.2]], np.float32)
    q = quantize_confidence(c)
    assert q.dtype == np.uint16 and q.tolist() == [[0, 32768, 58982, 65535, 65535]]
    assert np.array_equal(decode_mask_png(encode_confidence_png(q, 16)), q)
    assert decode_mask_png(encode_confidence_png(q, 8)).tolist() == [[0, 128, 230, 255, 255]]


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def write_raw(raw, key, mask, q):
    (raw / "masks" / key).parent.mkdir(parents=True, exist_ok=True)
    (raw / "confidence" / key).parent.mkdir(parents=True, exist_ok=True)
    (raw / "masks" / f"{key}.png").write_bytes(encode_mask_png(mask, CLASSES))
    (raw / "confidence" / f"{key}.png").write_bytes(encode_confidence_png(q, 16))
    return str(raw / "masks" / f"{key}.png")


def batch_of(raw, items, was_selected=None):
    keys = list(items)
    return {
        "path": np.array([f"/images/{k}.jpg" for k in keys], dtype=object),
        "key": np.array(keys, dtype=object),
        "width": np.array([items[k][0].shape[1] for k in keys]),
        "height": np.array([items[k][0].shape[0] for k in keys]),
        "mask": np.array([write_raw(raw, k, *items[k]) for k in keys], dtype=object),
        "was_selected": np.array(was_selected or [False] * len(keys)),
    }


def test_select_labels_writes_pairs_rows_and_removes_deselected(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    rng = np.random.default_rng(1)
    items = {
        "x": (rng.integers(0, 3, (7, 9)).astype(np.uint8), rng.integers(0, 65536, (7, 9)).astype(np.uint16)),
        "sub/y": (np.full((4, 5), 2, np.uint8), np.full((4, 5), 100, np.uint16)),  # nothing confident
    }
    cutoff = threshold_cutoff(0.5)
    (out / "masks" / "sub").mkdir(parents=True)
    (out / "masks" / "sub" / "y.png").write_bytes(b"old pair")  # selected by an earlier rule
    step = SelectLabels(SelectConfig(str(out), str(raw), CLASSES, (cutoff,) * 3, min_coverage=0.1, confidence_bits=8))
    table = step(batch_of(raw, items, [False, True]))
    rows = {r["key"]: r for r in table.to_pylist()}
    assert all(r["ok"] for r in rows.values())
    mask, q = items["x"]
    expected = np.where(q >= cutoff, mask, IGNORE)
    written = decode_mask_png((out / "masks" / "x.png").read_bytes())
    assert np.array_equal(written, expected)
    assert Image.open(out / "masks" / "x.png").mode == "P"
    assert (out / "confidence" / "x.png").exists()
    assert rows["x"]["selected"] and rows["x"]["mask"] == str(out / "masks" / "x.png")
    assert rows["x"]["coverage"] == pytest.approx((expected != IGNORE).mean())
    assert rows["x"]["labeled_counts"] == np.bincount(expected[expected != IGNORE], minlength=3).tolist()
    assert rows["x"]["mean_confidence"] == pytest.approx(q.mean() / 65535, rel=1e-5)
    assert rows["sub/y"]["selected"] is False and rows["sub/y"]["coverage"] == 0 and rows["sub/y"]["mask"] == ""
    assert rows["sub/y"]["labeled_confidence"] is None
    assert not (out / "masks" / "sub" / "y.png").exists()  # no longer a pair: removed


def test_select_labels_turns_a_missing_confidence_map_into_an_error_row(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    items = {
        "a": (np.zeros((3, 3), np.uint8), np.full((3, 3), 65535, np.uint16)),
        "b": (np.ones((3, 3), np.uint8), np.full((3, 3), 65535, np.uint16)),
    }
    batch = batch_of(raw, items)
    (raw / "confidence" / "a.png").unlink()
    table = SelectLabels(SelectConfig(str(out), str(raw), CLASSES, (0, 0, 0)))(batch)
    rows = {r["key"]: r for r in table.to_pylist()}
    assert not rows["a"]["ok"] and rows["a"]["stage"] == "select" and rows["a"]["error_type"] == "FileNotFoundError"
    assert rows["b"]["ok"] and rows["b"]["selected"]
    assert not (out / "masks" / "a.png").exists()


def test_histogram_step_sums_a_batch_sparsely(tmp_path):
    raw = tmp_path / "raw"
    rng = np.random.default_rng(2)
    items = {
        k: (rng.integers(0, 3, (6, 8)).astype(np.uint8), rng.integers(60000, 60010, (6, 8)).astype(np.uint16))
        for k in ("p", "q", "r")
    }
    table = ConfidenceHistogram(SelectConfig(str(tmp_path), str(raw), CLASSES, (0, 0, 0)))(batch_of(raw, items))
    assert len(table) == 1
    hist = np.zeros((3, LEVELS), np.int64)
    add_histogram(hist, table["index"][0].as_py(), table["count"][0].as_py())
    expected = np.zeros((3, LEVELS), np.int64)
    for mask, q in items.values():
        for k in range(3):
            expected[k] += np.bincount(q[mask == k], minlength=LEVELS)
    assert np.array_equal(hist, expected)
    with pytest.raises(DinosegError, match="past the 3 classes"):
        add_histogram(hist, [5 * LEVELS], [1])
