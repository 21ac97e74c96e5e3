"""Discovering clusters, without Ray: the seeded image sample, cluster colours, the cells a
sample may take, the SampleFeatures actor on a random ViT-S, and the contact sheets."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from model.classes import ClassMap
from model.geometry import PATCH_SIZE as PATCH
from pipeline.data.schema import ERROR_FIELDS
from pipeline.features.cache import FeatureConfig
from pipeline.features.pairs import padded_geometry
from pipeline.label.discover import DiscoverConfig, summary
from pipeline.label.patches import DecodeResized, SampleConfig, SampleFeatures, inside_cells, sample_rank
from pipeline.label.sheets import TILE, _tile, cluster_colors, write_contact_sheets


def test_sample_rank_is_seeded_and_deterministic():
    keys = [f"img/{i:03d}" for i in range(50)]
    first = sorted(keys, key=lambda k: sample_rank(0, k))
    assert first == sorted(keys, key=lambda k: sample_rank(0, k))
    assert sample_rank(0, "a") == sample_rank(0, "a") and len(sample_rank(0, "a")) == 64
    assert sample_rank(0, "a") != sample_rank(1, "a") and sample_rank(0, "a") != sample_rank(0, "b")
    other = sorted(keys, key=lambda k: sample_rank(1, k))
    assert other != first and first != keys  # another seed another sample; not the listing order
    assert set(first[:10]) != set(other[:10])


@pytest.mark.parametrize("k", [2, 8, 40])
def test_cluster_colours_are_distinct(k):
    colors = cluster_colors(k)
    assert len(colors) == k and len(set(colors)) == k
    assert all(len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in colors)
    assert cluster_colors(k) == colors


def geometry_rows(sizes: list[tuple[int, int]]) -> dict:
    rows = {k: [] for k in ("grid_h", "grid_w", "pad_top", "pad_left", "resized_h", "resized_w")}
    for h, w in sizes:
        gh, gw, top, left = padded_geometry(h, w)
        for k, v in zip(rows, (gh, gw, top, left, h, w), strict=True):
            rows[k].append(v)
    return {k: np.asarray(v) for k, v in rows.items()}


def test_inside_cells_leave_out_cells_centred_on_padding():
    # (15, 30): padded to 28 x 42, 6 rows above; row centres at image rows 1 and 15: only row 0
    # (15, 15): 28 x 28, 6 above and 6 left: only cell 0
    # (29, 15): 42 x 28, 6 above: row centres 1, 15, 29 (29 is past the image); column 1 is padding
    # (56, 70): no padding: all 20 cells
    row = geometry_rows([(15, 30), (15, 15), (29, 15), (56, 70)])
    assert inside_cells(row, 0).tolist() == [0, 1, 2]
    assert inside_cells(row, 1).tolist() == [0]
    assert inside_cells(row, 2).tolist() == [0, 2]
    assert inside_cells(row, 3).tolist() == list(range(20))


# ---- the SampleFeatures actor ----------------------------------------------------------------

FEATURES = FeatureConfig(
    backbone="dinov2_vits14", layers=(11,), resolution=56, backbone_weights="random", device="cpu", precision="fp32"
)


@pytest.fixture(scope="module")
def sampler():
    return SampleFeatures(SampleConfig(FEATURES, patches=5, seed=0))


def batch_of(pixels: list[np.ndarray], keys: list[str], sheet: list[bool], failed: set[int] = frozenset()) -> dict:
    n = len(pixels)
    batch = {
        "path": np.array([f"/in/{k}.png" for k in keys], dtype=object),
        "key": np.array(keys, dtype=object),
        "sheet": np.array(sheet),
        "pixels": np.empty(n, dtype=object),
        **{f: np.full(n, "", dtype=object) for f in ERROR_FIELDS},
    }
    for i, p in enumerate(pixels):
        batch["pixels"][i] = p
    for i in failed:
        batch["error_stage"][i], batch["error_message"][i] = "decode", "the file is empty (0 bytes)."
    return batch


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    out = [rng.integers(0, 256, (56, 70, 3), dtype=np.uint8) for _ in range(3)]
    out.append(rng.integers(0, 256, (15, 30, 3), dtype=np.uint8))  # 3 cells on the image, 3 on padding
    return out


def full_map(batch_out: dict, i: int) -> np.ndarray:
    c, gh, gw = (int(batch_out[k][i]) for k in ("channels", "grid_h", "grid_w"))
    return np.frombuffer(batch_out["features"][i], np.float16).reshape(c, gh * gw).astype(np.float32)


def sample_of(out: dict, i: int) -> np.ndarray:
    return np.frombuffer(out["sample"][i], np.float16).reshape(-1, int(out["channels"][i])).astype(np.float32)


def matched_cells(sample: np.ndarray, grid: np.ndarray) -> list[int]:
    """The cell each sampled row is (cosine > 0.999 with that cell's unit feature)."""
    unit = grid / np.linalg.norm(grid, axis=0, keepdims=True)
    cos = sample @ unit
    assert (cos.max(axis=1) > 0.999).all(), cos.max(axis=1)
    return cos.argmax(axis=1).tolist()


def test_sample_features_takes_unit_features_of_cells_on_the_image(sampler, images):
    keys = ["k0", "k1", "k2", "k3", "bad"]
    batch = batch_of([*images, np.zeros((0, 0, 3), np.uint8)], keys, [True, False, True, False, True], failed={4})
    full = sampler.compute(batch_of([*images, np.zeros((0, 0, 3), np.uint8)], keys, [True] * 5, failed={4}))
    out = sampler(batch)
    assert list(out["key"]) == keys and "pixels" not in out
    for i in range(4):
        grid = full_map(full, i)
        inside = inside_cells(out, i)
        x = sample_of(out, i)
        assert x.shape == (min(5, len(inside)), 384) and len(out["sample"][i]) == x.size * 2  # float16
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=2e-3)
        cells = matched_cells(x, grid)
        assert len(set(cells)) == len(cells) and set(cells) <= set(inside.tolist())
    assert len(inside_cells(out, 3)) == 3 and sample_of(out, 3).shape == (3, 384)
    # sheet rows keep their whole grid; the others lose it
    for i, keep in enumerate([True, False, True, False]):
        if keep:
            assert np.array_equal(full_map(out, i), full_map(full, i))
        else:
            assert out["features"][i] == b""
    # the failed row passes through: nothing sampled, its error kept
    assert out["sample"][4] == b"" and out["features"][4] == b"" and out["error_stage"][4] == "decode"


def test_the_same_key_samples_the_same_cells(sampler, images):
    together = sampler(batch_of(images[:3], ["a", "b", "c"], [True] * 3))
    alone = sampler(batch_of([images[1]], ["b"], [True]))
    grid = full_map(together, 1)
    assert matched_cells(sample_of(alone, 0), grid) == matched_cells(sample_of(together, 1), grid)
    renamed = sampler(batch_of([images[1]], ["b2"], [True]))
    assert matched_cells(sample_of(renamed, 0), grid) != matched_cells(sample_of(together, 1), grid)
    reseeded = SampleFeatures(SampleConfig(FEATURES, patches=5, seed=1))(batch_of([images[1]], ["b"], [True]))
    assert matched_cells(sample_of(reseeded, 0), grid) != matched_cells(sample_of(together, 1), grid)


def test_decode_resized_shrinks_to_the_short_side(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (140, 112), (10, 200, 30)).save(buf, "PNG")
    batch = {
        "path": np.array(["/a.png", "/b.png"], dtype=object),
        "bytes": np.array([buf.getvalue(), b"not an image"], dtype=object),
        **{f: np.full(2, "", dtype=object) for f in ERROR_FIELDS},
    }
    out = DecodeResized(56, 100)(batch)
    assert out["pixels"][0].shape == (56, 70, 3) and (out["width"][0], out["height"][0]) == (140, 112)
    assert out["error_stage"][1] == "decode" and out["pixels"][1].shape == (0, 0, 3)
    assert "image" not in out and "bytes" not in out


# ---- contact sheets --------------------------------------------------------------------------


def test_tile_tints_only_the_clusters_cells():
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (2 * PATCH, 3 * PATCH, 3), dtype=np.uint8)
    cells = np.array([[True, False, False], [False, False, True]])
    color = (250, 10, 120)
    tile = _tile(picture, cells, color)
    assert tile.shape == picture.shape and tile.dtype == np.uint8  # small: not enlarged
    x = picture.astype(np.float32)
    tinted = np.clip(0.55 * x + 0.45 * np.asarray(color, np.float32), 0, 255).astype(np.uint8)
    dimmed = (0.3 * x).astype(np.uint8)
    on = np.kron(cells, np.ones((PATCH, PATCH), bool))
    assert np.abs(tile[on].astype(int) - tinted[on]).max() <= 1
    assert np.abs(tile[~on].astype(int) - dimmed[~on]).max() <= 1
    big = _tile(np.zeros((40 * PATCH, 20 * PATCH, 3), np.uint8), np.ones((40, 20), bool), color)
    assert max(big.shape[:2]) == TILE  # large pictures shrink to fit a tile


def test_contact_sheets_one_jpeg_per_cluster(tmp_path):
    k, d = 3, 4
    centres = np.eye(k, d, dtype=np.float32)
    classes = ClassMap(tuple(f"cluster_{i}" for i in range(k)), tuple(cluster_colors(k)))
    sheets = []
    # each picture's cells point at clusters: 0 everywhere in the first, 0 and 1 in the second
    for name, assignment in (
        ("p0", [[0, 0, 0], [0, 0, 0]]),
        ("p1", [[1, 1, 0], [1, 1, 1]]),
        ("p2", [[1, 0, 1], [0, 1, 1]]),
    ):
        path = tmp_path / f"{name}.png"
        Image.new("RGB", (84, 56), (100, 150, 200)).save(path)  # resized to 42 x 28 on the sheet
        f = np.zeros((d, 2, 3), np.float16)
        for (y, x), c in np.ndenumerate(np.asarray(assignment)):
            f[c, y, x] = 1 + y  # any positive scale: the argmax of cosines
        sheets.append((name, str(path), f, {"resized_h": 28, "resized_w": 42, "pad_top": 0, "pad_left": 0}))
    sheets.append(("gone", str(tmp_path / "deleted.png"), np.zeros((d, 2, 3), np.float16), sheets[0][3]))
    config = DiscoverConfig("in", str(tmp_path / "out"), sheet_tiles=12)
    urls = write_contact_sheets(config, str(tmp_path / "out"), centres, classes, sheets, None)
    assert urls == [str(tmp_path / "out" / "clusters" / f"cluster_{i}.jpg") for i in range(k)]
    for i, url in enumerate(urls):
        with Image.open(url) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert img.size == (4 * TILE, TILE)  # one row of up to 4 tiles
            sheet = np.asarray(img).astype(int)
        used = {0: 3, 1: 2, 2: 0}[i]  # pictures with cells of the cluster (the missing file: none)
        for t in range(4):
            block = sheet[:28, t * TILE : t * TILE + 42]
            if t < used:
                assert np.abs(block - 32).max() > 20, (i, t)  # a picture
            else:
                assert np.abs(block - 32).max() <= 8, (i, t)  # the sheet's background
    assert write_contact_sheets(config, str(tmp_path / "none"), centres, classes, [], None) == []


def test_summary_names_the_next_command():
    info = {
        "clusters": [{"name": "cluster_0", "patch_share": 0.75}, {"name": "cluster_1", "patch_share": 0.25}],
        "images": 3,
        "problems": 1,
        "patches": 1200,
        "sheets": ["/o/clusters/cluster_0.jpg", "/o/clusters/cluster_1.jpg"],
        "classes": "/o/classes.yaml",
    }
    text = summary(info)
    assert "75.0%" in text and "1,200 patches" in text
    assert "dinoseg prototypes --from-clusters /o --output head.pt" in text


def test_a_small_cluster_in_a_large_picture_is_cropped_around_its_cells():
    from pipeline.label.sheets import MIN_CROP_CELLS, _tile

    cells = np.zeros((20, 30), bool)
    cells[2, 27] = True  # one patch near the top-right corner
    picture = np.full((20 * PATCH, 30 * PATCH, 3), 200, np.uint8)
    tile = _tile(picture, cells, (255, 0, 0))
    # a crop of MIN_CROP_CELLS patches a side around the cell, not the whole 280 x 420 picture
    assert tile.shape == (MIN_CROP_CELLS * PATCH, MIN_CROP_CELLS * PATCH, 3)
    tinted = (tile[..., 0] > tile[..., 1] + 40).sum()
    assert tinted == PATCH * PATCH  # the one cell, whole, inside the crop
    # cells spread over the picture: the whole of it, shrunk to the tile
    cells[:] = False
    cells[0, 0] = cells[19, 29] = True
    assert _tile(picture, cells, (255, 0, 0)).shape[1] == 160


def test_a_discover_output_with_named_clusters_is_not_replaced_without_overwrite(tmp_path):
    from model.errors import DinosegError
    from pipeline.label.discover import run_discover

    out = tmp_path / "clusters"
    out.mkdir()
    (out / "head.pt").write_bytes(b"head")
    (out / "classes.yaml").write_text("classes: [{id: 0, name: sky}]\n")
    with pytest.raises(DinosegError, match="pass --overwrite to replace them"):
        run_discover(DiscoverConfig(str(tmp_path / "nowhere"), str(out), backbone_weights="random"))
    assert "sky" in (out / "classes.yaml").read_text()
    # another command's OUTPUT (a segment run's class map, no head): not replaced either
    (out / "head.pt").unlink()
    with pytest.raises(DinosegError, match="classes.yaml already"):
        run_discover(DiscoverConfig(str(tmp_path / "nowhere"), str(out), backbone_weights="random"))


def test_overwrite_clears_only_an_earlier_runs_own_files(tmp_path):
    from pipeline.label.discover import _clear_earlier_run

    out = tmp_path / "clusters"
    (out / "clusters").mkdir(parents=True)
    for name in ("head.pt", "classes.yaml", "discover.json", "problems.jsonl", "notes.txt"):
        (out / name).write_text("x")
    for i in range(8):  # an earlier run with 8 clusters; the new one has 5
        (out / "clusters" / f"cluster_{i}.jpg").write_bytes(b"jpg")
    (out / "clusters" / "mine.jpg").write_bytes(b"a person's file")
    _clear_earlier_run(str(out), None)
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["mine.jpg", "notes.txt"]
