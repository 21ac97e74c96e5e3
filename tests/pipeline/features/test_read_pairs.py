"""Labeled pairs as steps: ReadPair + DecodePair (checks of each pair, resize to the training
resolution) and the patch-grid geometry helpers."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from pair_samples import batch, photo, quadrants
from PIL import Image

from model.classes import IGNORE_INDEX as IGNORE
from model.errors import DinosegError
from pipeline.features.pairs import (
    DecodePair,
    PairConfig,
    ReadPair,
    decode_label,
    pad_label,
    padded_geometry,
    resize_pair,
)


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "PNG")
    return buf.getvalue()


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and ". " not in message.rstrip(".")


def palette_png(mask: np.ndarray) -> bytes:
    img = Image.fromarray(mask.astype(np.uint8), "L").convert("P")
    img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def put(root: Path, name: str, data: bytes) -> str:
    p = root / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return str(p)


def run(rows, config: PairConfig, **extra) -> dict:
    return DecodePair(config)(ReadPair()(batch(rows, **extra)))


# ---- ReadPair + DecodePair -------------------------------------------------------------------


def test_good_pair_is_resized_short_side_with_labels_preserved(tmp_path):
    rgb, mask = photo(40, 60), quadrants(40, 60)
    rows = [(put(tmp_path, "a.png", png(rgb)), put(tmp_path, "a_mask.png", palette_png(mask)))]
    out = run(rows, PairConfig(num_classes=3, resolution=28))
    assert list(out["error_stage"]) == [""]
    assert "image_bytes" not in out and "mask_bytes" not in out
    px, lb = out["pixels"][0], out["label"][0]
    assert px.shape == (28, 42, 3) and px.dtype == np.uint8  # short side 40 -> 28, aspect kept
    assert lb.shape == (28, 42) and lb.dtype == np.uint8
    assert (out["width"][0], out["height"][0]) == (60, 40)  # the original size
    assert set(np.unique(lb)) == {0, 1, 2, IGNORE}  # nearest: the same values, none new
    # each quadrant keeps its class (away from the 1-pixel seam)
    assert lb[:13, :20].max() == lb[:13, :20].min() == 0 and (lb[:13, 22:] == 1).all()
    assert (lb[15:, :20] == 2).all() and (lb[15:, 22:] == IGNORE).all()


def test_without_resolution_the_pair_keeps_its_pixels(tmp_path):
    rgb, mask = photo(30, 20, 1), quadrants(30, 20, (4, 3, 2, 1))
    rows = [(put(tmp_path, "a.png", png(rgb)), put(tmp_path, "m.png", png(mask, "L")))]
    out = run(rows, PairConfig(num_classes=5))
    assert np.array_equal(out["pixels"][0], rgb) and np.array_equal(out["label"][0], mask)


def test_mask_of_another_size_names_both_sizes(tmp_path):
    rows = [(put(tmp_path, "a.png", png(photo(40, 60))), put(tmp_path, "m.png", png(np.zeros((20, 30), np.uint8))))]
    out = run(rows, PairConfig(num_classes=3, resolution=28))
    assert out["error_stage"][0] == "mask"
    assert "30x20" in out["error_message"][0] and "60x40" in out["error_message"][0]
    assert out["pixels"][0].size == 0 and out["label"][0].size == 0
    # a transposed mask has the right number of pixels but not the image's size
    rows = [(put(tmp_path, "b.png", png(photo(10, 12))), put(tmp_path, "t.png", png(np.zeros((12, 10), np.uint8))))]
    out = run(rows, PairConfig(num_classes=3))
    assert out["error_stage"][0] == "mask" and "10x12" in out["error_message"][0] and "12x10" in out["error_message"][0]


def test_rgb_mask_is_a_mask_error(tmp_path):
    rows = [(put(tmp_path, "a.png", png(photo(10, 12))), put(tmp_path, "m.png", png(photo(10, 12, 5))))]
    out = run(rows, PairConfig(num_classes=3))
    assert out["error_stage"][0] == "mask" and "RGB" in out["error_message"][0]


def test_class_out_of_range_fails_but_ignore_passes(tmp_path):
    image = put(tmp_path, "a.png", png(photo(10, 12)))
    seven = np.zeros((10, 12), np.uint8)
    seven[3, 4] = 7
    ignore = np.full((10, 12), 4, np.uint8)
    ignore[:5] = IGNORE
    rows = [
        (image, put(tmp_path, "seven.png", png(seven, "L"))),
        (image, put(tmp_path, "ignore.png", png(ignore, "L"))),
    ]
    out = run(rows, PairConfig(num_classes=5))
    assert out["error_stage"][0] == "mask" and "7" in out["error_message"][0] and "5 classes" in out["error_message"][0]
    assert out["error_stage"][1] == "" and np.array_equal(out["label"][1], ignore)


def test_corrupt_image_is_decode_and_missing_mask_is_read(tmp_path):
    good_mask = put(tmp_path, "m.png", png(np.zeros((10, 12), np.uint8), "L"))
    good_image = put(tmp_path, "ok.png", png(photo(10, 12)))
    rows = [
        (put(tmp_path, "bad.png", b"\x89PNG\r\n\x1a\n this is no png"), good_mask),
        (good_image, str(tmp_path / "no-such-mask.png")),
        (good_image, good_mask),
    ]
    out = run(rows, PairConfig(num_classes=2))
    assert list(out["error_stage"]) == ["decode", "read", ""]
    assert "no-such-mask.png" in out["error_message"][1]
    assert out["label"][2].shape == (10, 12)  # a failure costs its own row only


def test_decode_label_reports_what_is_wrong():
    with pytest.raises(DinosegError, match="RGB"):
        decode_label(png(photo(4, 4)), 3)
    with pytest.raises(DinosegError, match="not a PNG"):
        decode_label(b"garbage", 3)
    with pytest.raises(DinosegError, match="class 9"):
        decode_label(png(np.full((4, 4), 9, np.uint8), "L"), 3)


def test_one_bit_mask_keeps_class_one():
    one_bit = io.BytesIO()
    Image.fromarray(np.eye(4, dtype=bool)).save(one_bit, "PNG")
    assert Image.open(io.BytesIO(one_bit.getvalue())).mode == "1"  # sample values 0 and 1
    label = decode_label(one_bit.getvalue(), 2)
    assert label.dtype == np.uint8 and np.array_equal(label, np.eye(4, dtype=np.uint8))  # not 255 = ignore


def sixteen_bit(values) -> bytes:
    data = png(np.array(values, "<u2"))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    return data


def test_sixteen_bit_mask_that_fits_is_converted():
    label = decode_label(sixteen_bit([[0, 1], [2, IGNORE]]), 3)
    assert label.dtype == np.uint8 and label.tolist() == [[0, 1], [2, IGNORE]]


def test_sixteen_bit_mask_that_does_not_fit_is_refused_not_truncated():
    with pytest.raises(DinosegError, match="class 280") as e:  # uint8 would make it 24, a valid class
        decode_label(sixteen_bit([[280, 1], [2, 3]]), 30)
    assert one_sentence(str(e.value))
    with pytest.raises(DinosegError, match="class 511"):  # 511 % 256 == 255 would become 'ignore'
        decode_label(sixteen_bit([[511, 1], [2, 3]]), 30)


def test_more_than_255_classes_is_refused_in_one_sentence():
    from model.classes import ClassMap
    from pipeline.io.masks import encode_mask_png

    classes = ClassMap(tuple(f"c{i}" for i in range(300)), tuple((i % 256, 0, 0) for i in range(300)))
    data = encode_mask_png(np.array([[280, 1], [2, 3]], np.uint16), classes)  # the project's own I;16 format
    with pytest.raises(DinosegError, match="at most 255 classes") as e:
        decode_label(data, 300)
    assert "300" in str(e.value) and one_sentence(str(e.value))


def test_cached_row_does_not_read_its_image_and_checks_the_recorded_size(tmp_path):
    mask = put(tmp_path, "m.png", png(quadrants(10, 12), "L"))
    gone = str(tmp_path / "deleted-image.png")  # features are cached: the image is not needed
    rows = [(gone, mask), (gone, mask), (gone, mask)]
    out = run(
        rows,
        PairConfig(num_classes=3, resolution=28),
        cached=np.array([True, True, False]),
        width=np.array([12, 20, 0]),
        height=np.array([10, 10, 0]),
    )
    assert out["error_stage"][0] == ""
    assert np.array_equal(out["label"][0], quadrants(10, 12))
    assert out["error_stage"][1] == "mask" and "12x10" in out["error_message"][1] and "20x10" in out["error_message"][1]
    assert out["error_stage"][2] == "read" and "deleted-image.png" in out["error_message"][2]  # not cached: read


def test_keep_false_only_checks(tmp_path):
    image = put(tmp_path, "a.png", png(photo(10, 12)))
    rows = [
        (image, put(tmp_path, "m.png", png(np.zeros((10, 12), np.uint8), "L"))),
        (image, put(tmp_path, "small.png", png(np.zeros((5, 6), np.uint8), "L"))),
    ]
    out = run(rows, PairConfig(num_classes=3, resolution=28, keep=False))
    assert "pixels" not in out and "label" not in out
    assert list(out["error_stage"]) == ["", "mask"]
    assert list(out["width"]) == [12, 12] and list(out["height"]) == [10, 10]


def test_synthetic_set_decodes_cleanly(tmp_path):
    from pipeline.data.pairs import list_pairs
    from pipeline.data.synthetic import write_synthetic

    info = write_synthetic(str(tmp_path), train=4, val=0, size=56)
    pairs = list_pairs(info["images"]["train"], info["masks"]["train"])
    out = run(list(zip(pairs.images, pairs.masks, strict=True)), PairConfig(num_classes=5, resolution=28))
    assert list(out["error_stage"]) == [""] * 4
    for px, lb, w, h in zip(out["pixels"], out["label"], out["width"], out["height"], strict=True):
        assert min(lb.shape) == 28 and px.shape[:2] == lb.shape
        assert abs(lb.shape[1] / lb.shape[0] - w / h) < 0.05


# ---- geometry --------------------------------------------------------------------------------


def test_padded_geometry_centres():
    assert padded_geometry(20, 30) == (2, 3, 4, 6)  # 20 -> 28 (4 above, 4 below), 30 -> 42 (6 + 6)
    assert padded_geometry(28, 14) == (2, 1, 0, 0)
    gh, gw, top, left = padded_geometry(15, 27)  # 15 -> 28: 13 = 6 + 7; 27 -> 28: 1 = 0 + 1
    assert (gh, gw, top, left) == (2, 2, 6, 0)


def test_pad_label_places_the_label_and_ignores_the_rest():
    lb = np.arange(20 * 30, dtype=np.uint32).reshape(20, 30) % 7
    out = pad_label(lb.astype(np.uint8), *padded_geometry(20, 30))
    assert out.shape == (28, 42)
    assert np.array_equal(out[4:24, 6:36], lb)
    inside = np.zeros_like(out, bool)
    inside[4:24, 6:36] = True
    assert (out[~inside] == IGNORE).all()


def test_resize_pair_nearest_labels_bilinear_pixels():
    label = quadrants(40, 40, (0, 1, 2, 3))
    rgb = np.zeros((40, 40, 3), np.uint8)
    rgb[:, 20:] = 200
    px, lb = resize_pair(rgb, label, 17, 23)
    assert px.shape == (17, 23, 3) and lb.shape == (17, 23)
    assert set(np.unique(lb)) == {0, 1, 2, 3}
    assert len(np.unique(px)) > 2  # bilinear blends the edge
    none, lb2 = resize_pair(None, label, 17, 23)
    assert none is None and np.array_equal(lb2, lb)
    same_px, same_lb = resize_pair(rgb, label, 40, 40)
    assert same_px is rgb and same_lb is label
