"""COCO run-length encoding against pycocotools' strings: column-major counts, round trips, long runs."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.io.rle import counts_to_string, rle_decode, rle_encode, rle_encode_labels, string_to_counts


def blobs(h: int, w: int, n_classes: int, seed: int = 0, cell: int = 8) -> np.ndarray:
    """A segmentation-like mask: constant cells of random classes."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, n_classes, (h // cell + 1, w // cell + 1))
    return low.repeat(cell, 0).repeat(cell, 1)[:h, :w].astype(np.uint8 if n_classes <= 256 else np.uint16)


# Strings produced by pycocotools 2.0.11 (mask.encode on the Fortran-ordered uint8 mask).
KNOWN = [
    (np.array([[1, 0], [1, 1]]), "021O"),
    (np.ones((3, 4)), "0<"),
    (np.zeros((3, 4)), "<"),
    (
        np.array(
            [[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]]
        ),
        "0162M0:N",
    ),
    (np.ones((2000, 1100)), "0P^TS2"),
    (np.zeros((2000, 1100)), "P^TS2"),
    (np.hstack([np.zeros((1100, 500)), np.ones((1100, 500))]), "`Si`0`Si`0"),
    (
        np.random.default_rng(7).random((16, 12)) < 0.4,
        "1341MN3O00N0O050K00021OO00O0013ON0012OO031KO10120NO0O10O011OO22NO0O0012O0010M100112ONO1043KN5OJ",
    ),
]


@pytest.mark.parametrize("mask, expected", KNOWN, ids=range(len(KNOWN)))
def test_rle_matches_pycocotools_strings(mask, expected):
    assert rle_encode(mask) == {"size": list(mask.shape), "counts": expected}
    assert np.array_equal(rle_decode({"size": list(mask.shape), "counts": expected}), mask.astype(np.uint8))


def test_rle_counts_are_column_major():
    # [[1, 0],
    #  [1, 1]]  read down column 0 (1, 1) then column 1 (0, 1): 1 1 0 1.
    # Runs, starting with zeros: 0 zeros, 2 ones, 1 zero, 1 one -> [0, 2, 1, 1]. Row-major
    # (1 0 1 1) would give [0, 1, 1, 2]. Compressed: 0, 2, 1 as they are, then 1 - 2 = -1.
    assert string_to_counts("021O") == [0, 2, 1, 1]
    assert rle_encode(np.array([[1, 0], [1, 1]]))["counts"] == counts_to_string([0, 2, 1, 1])
    assert rle_encode(np.array([[1, 1], [0, 1]]))["counts"] == counts_to_string([0, 1, 1, 2])


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (7, 5), (64, 48), (0, 5), (3000, 1)])
@pytest.mark.parametrize("p", [0.0, 0.02, 0.5, 0.98, 1.0])
def test_rle_round_trips(shape, p):
    mask = np.random.default_rng(hash((shape, p)) % 2**32).random(shape) < p
    rle = rle_encode(mask)
    assert rle["size"] == list(shape) and np.array_equal(rle_decode(rle), mask.astype(np.uint8))
    assert np.array_equal(rle_decode({**rle, "counts": rle["counts"].encode()}), mask)  # bytes, as pycocotools


def test_rle_long_runs_and_large_deltas():
    mask = np.zeros((3000, 1000), np.uint8)  # a 0-run past 2**20
    mask[:, -1] = 1
    mask[0, 0] = 1  # then 1 one, 2,996,999 zeros, 3,000 ones
    rle = rle_encode(mask)
    assert string_to_counts(rle["counts"]) == [0, 1, 2_996_999, 3000]
    assert np.array_equal(rle_decode(rle), mask)
    counts = [0, 2**40, 3, 1, 2**33, 2**20 + 1, 1]  # deltas far negative and far positive
    assert string_to_counts(counts_to_string(counts)) == counts


def test_rle_uncompressed_list_counts_and_bad_input():
    assert rle_decode({"size": [2, 3], "counts": [1, 2, 3]}).tolist() == [[0, 1, 0], [1, 0, 0]]
    for bad in ("0<\x7f", "0_"):  # a character out of range; a value cut off mid-way ('_' has 'more')
        with pytest.raises(ValueError):
            string_to_counts(bad)
    with pytest.raises(ValueError):
        rle_decode({"size": [3, 4], "counts": "0;"})  # 11 pixels for 12
    with pytest.raises(ValueError):
        rle_encode(np.zeros((2, 2, 2)))


def test_rle_of_labels_equals_per_class_encoding():
    mask = blobs(61, 47, 9, seed=3, cell=5)
    mask[10:20, 5] = 255
    per_class = rle_encode_labels(mask)
    assert sorted(per_class) == sorted(np.unique(mask).tolist())
    for c, counts in per_class.items():
        assert counts == rle_encode(mask == c)["counts"]
    assert rle_encode_labels(mask, [42]) == {42: rle_encode(np.zeros_like(mask))["counts"]}
    wide = blobs(20, 30, 300, seed=4)
    assert all(s == rle_encode(wide == c)["counts"] for c, s in rle_encode_labels(wide).items())
