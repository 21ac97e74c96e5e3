"""The check pass of training over a real local Ray: every pair read and checked; the feature
actors start only when some image has no cached features."""

import numpy as np
import pytest
from PIL import Image

from pipeline import runtime
from pipeline.data.pairs import Pairs
from pipeline.features.cache import FeatureConfig
from pipeline.features.check import check_pass, pairs_table
from pipeline.features.pairs import PairConfig

pytestmark = pytest.mark.slow


def labeled_set(tmp_path, n: int = 3) -> Pairs:
    pairs = Pairs()
    for i in range(n):
        image, mask = tmp_path / f"i{i}.png", tmp_path / f"m{i}.png"
        Image.fromarray(np.full((28, 42, 3), 40 * i, np.uint8)).save(image)
        Image.fromarray(np.full((28, 42), i % 2, np.uint8)).save(mask)
        pairs.add(f"k{i}", str(image), str(mask))
    return pairs


def test_a_fully_cached_set_is_checked_without_loading_a_model(ray_local, tmp_path):
    pairs = labeled_set(tmp_path)
    cached = dict.fromkeys(pairs.images, (42, 28))
    # a backbone that does not exist: loading it in an actor would fail the pass
    features = FeatureConfig("dinov2_nonexistent14", (11,), 56, backbone_weights="random")
    resources = runtime.Resources(decode_cpus=0.25).resolve(runtime.cluster_resources(joined=False))
    rows = [
        row
        for table in check_pass(
            pairs_table(pairs, cached), PairConfig(2, 56, keep=True), None, resources, features, str(tmp_path / "cache")
        )
        for row in table.to_pylist()
    ]
    assert sorted(r["key"] for r in rows) == ["k0", "k1", "k2"]
    assert all(r["error_stage"] == "" for r in rows), rows
    assert not (tmp_path / "cache").exists()  # nothing was computed, nothing written


def test_a_mask_that_does_not_fit_its_cached_size_is_a_problem_row(ray_local, tmp_path):
    pairs = labeled_set(tmp_path, 2)
    cached = {pairs.images[0]: (42, 28), pairs.images[1]: (10, 10)}  # the second mask is 42x28, not 10x10
    features = FeatureConfig("dinov2_nonexistent14", (11,), 56, backbone_weights="random")
    resources = runtime.Resources(decode_cpus=0.25).resolve(runtime.cluster_resources(joined=False))
    rows = {
        row["key"]: row
        for table in check_pass(
            pairs_table(pairs, cached), PairConfig(2, 56, keep=True), None, resources, features, str(tmp_path / "cache")
        )
        for row in table.to_pylist()
    }
    assert rows["k0"]["error_stage"] == "" and rows["k1"]["error_stage"] != ""
