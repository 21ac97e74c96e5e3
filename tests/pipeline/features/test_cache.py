"""The feature cache: its folder name, ComputeFeatures on decoded pairs, WriteFeatures parts and
cached_sizes, and CachedSamples (feature crops and label crops line up)."""

from __future__ import annotations

import io
import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from model.classes import IGNORE_INDEX as IGNORE
from model.geometry import PATCH_SIZE as PATCH
from pipeline.data.pairs import list_pairs
from pipeline.data.schema import ERROR_FIELDS
from pipeline.data.synthetic import write_synthetic
from pipeline.features.cache import (
    CACHE_SCHEMA,
    CachedSamples,
    ComputeFeatures,
    FeatureConfig,
    SampleConfig,
    WriteFeatures,
    cached_sizes,
    part_files,
)
from pipeline.features.pairs import DecodePair, PairConfig, ReadPair, pad_label, padded_geometry

CONFIG = FeatureConfig("dinov2_vits14", (11,), 56, "random", device="cpu", precision="fp32")


def mask_png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


# ---- the folder ------------------------------------------------------------------------------


def test_folder_names_everything_that_changes_the_features():
    base = FeatureConfig("dinov2_vits14", (11,), 448)
    assert base.folder("s3://b/cache") == FeatureConfig("dinov2_vits14", (11,), 448).folder("s3://b/cache/")
    assert base.folder("s3://b/cache").startswith("s3://b/cache/")
    variants = [
        FeatureConfig("dinov2_vitb14", (11,), 448),
        FeatureConfig("dinov2_vits14", (11,), 448, "random"),
        FeatureConfig("dinov2_vits14", (11,), 448, "/w/a.pth"),
        FeatureConfig("dinov2_vits14", (11,), 448, "/w/b.pth"),
        FeatureConfig("dinov2_vits14", (11,), 512),
        FeatureConfig("dinov2_vits14", (8, 9, 10, 11), 448),
        FeatureConfig("dinov2_vits14", (1, 11), 448),
        FeatureConfig("dinov2_vits14", (11, 1), 448),  # order matters: channels are concatenated in it
    ]
    names = [v.folder("/c") for v in [base, *variants]]
    assert len(set(names)) == len(names), names
    # settings that do not change the features do not change the folder
    assert FeatureConfig("dinov2_vits14", (11,), 448, device="cuda", batch_size=2).folder("/c") == base.folder("/c")
    assert all("/" not in n[len("/c/") :] for n in names)  # one folder level, even for weights paths


# ---- computing and writing -------------------------------------------------------------------


@pytest.fixture(scope="module")
def computer():
    return ComputeFeatures(CONFIG)


@pytest.fixture
def decoded(tmp_path):
    """A DecodePair batch at resolution 48 (48 -> 56: 4 above; 60 -> 70: 5 left) plus one failed row."""
    info = write_synthetic(str(tmp_path / "set"), train=4, val=0, size=56)
    pairs = list_pairs(info["images"]["train"], info["masks"]["train"])
    images, masks = list(pairs.images), list(pairs.masks)
    images.append(images[0])
    masks.append(str(tmp_path / "deleted.png"))
    n = len(images)
    batch = {
        "path": np.array(images, dtype=object),
        "key": np.array([f"k{i}" for i in range(n)], dtype=object),
        "image": np.array(images, dtype=object),
        "mask": np.array(masks, dtype=object),
        **{f: np.full(n, "", dtype=object) for f in ERROR_FIELDS},
    }
    out = DecodePair(PairConfig(num_classes=5, resolution=48))(ReadPair()(batch))
    assert list(out["error_stage"]) == ["", "", "", "", "read"]
    return out


def features_of(batch, i) -> np.ndarray:
    c, gh, gw = (int(batch[k][i]) for k in ("channels", "grid_h", "grid_w"))
    return np.frombuffer(batch["features"][i], np.float16).reshape(c, gh, gw)


def test_compute_features_shapes_and_geometry(computer, decoded):
    out = computer(decoded)
    assert "pixels" not in out and "label" not in out
    assert list(out["key"]) == list(decoded["key"]) and list(out["width"]) == list(decoded["width"])
    shapes = set()
    for i in range(4):
        h, w = decoded["pixels"][i].shape[:2]
        assert (out["resized_h"][i], out["resized_w"][i]) == (h, w)
        assert (out["grid_h"][i], out["grid_w"][i], out["pad_top"][i], out["pad_left"][i]) == padded_geometry(h, w)
        assert out["channels"][i] == 384
        assert len(out["features"][i]) == 384 * out["grid_h"][i] * out["grid_w"][i] * 2  # float16
        f = features_of(out, i)
        assert np.isfinite(f).all() and f.std() > 0.1
        shapes.add((h, w))
    assert {(48, 48), (48, 60), (60, 48)} <= shapes  # square, wide and tall; all padded
    wide = [i for i in range(4) if decoded["pixels"][i].shape[:2] == (48, 60)][0]
    assert (out["pad_top"][wide], out["pad_left"][wide], out["grid_w"][wide]) == (4, 5, 5)
    assert out["features"][4] == b"" and out["error_stage"][4] == "read"  # passed through


def test_rows_without_pixels_pass_through(computer, decoded, tmp_path):
    """A cached row (no error, no pixels) gets no features and is not written again."""
    batch = dict(decoded)
    batch["pixels"] = decoded["pixels"].copy()
    batch["pixels"][2] = np.zeros((0, 0, 3), np.uint8)
    out = computer(batch)
    assert out["features"][2] == b"" and out["error_stage"][2] == "" and out["grid_h"][2] == 0
    assert all(len(out["features"][i]) for i in (0, 1, 3))
    WriteFeatures(str(tmp_path / "c"))(out)
    assert set(cached_sizes(str(tmp_path / "c"))) == {decoded["image"][i] for i in (0, 1, 3)}


def test_features_do_not_depend_on_the_batch(computer, decoded):
    together = computer(decoded)
    for i in (1, 3):
        alone = computer({k: v[i : i + 1] for k, v in decoded.items()})
        assert np.allclose(
            features_of(alone, 0).astype(np.float32), features_of(together, i).astype(np.float32), rtol=1e-2, atol=1e-2
        )
    # and different images give different features
    assert not np.allclose(features_of(together, 0), features_of(together, 2), atol=0.1)


def test_cached_features_match_the_uncached_training_path(computer, decoded):
    """The cache pads in normalised space with 0; training without the cache pads the pixels
    with MEAN_RGB: the same features, up to MEAN_RGB's rounding and fp16."""
    from pipeline.train.training import FeatureSource, to_tensors

    cached = computer(decoded)
    source = FeatureSource(CONFIG.layers, 384, computer.backbone, CONFIG.mean, CONFIG.std)
    for i in (0, 1, 3):  # 48x48, 48x60, 60x48: all centre-padded
        kind, x, _ = to_tensors(
            {"pixels": decoded["pixels"][i : i + 1], "label": decoded["label"][i : i + 1]}, torch.device("cpu")
        )
        live = source(kind, x)[0][0].numpy()
        ref = features_of(cached, i).astype(np.float32)
        assert live.shape == ref.shape
        err = np.abs(live - ref).max() / np.abs(ref).max()
        assert err < 0.15, err  # measured ~0.03; padding at the wrong side gives ~1


def test_write_features_and_cached_sizes(computer, decoded, tmp_path):
    folder = CONFIG.folder(str(tmp_path / "cache"))
    assert cached_sizes(folder) == {}  # nothing yet, not an error
    computed = computer(decoded)
    out = WriteFeatures(folder)(computed)
    assert "features" not in out and list(out["error_stage"]) == list(computed["error_stage"])
    parts = part_files(folder)
    assert len(parts) == 1 and parts[0].endswith(".parquet")
    originals = {}
    for url in decoded["image"][:4]:
        with Image.open(url) as im:
            originals[url] = im.size
    assert cached_sizes(folder) == originals  # the failed row is not cached
    table = pq.read_table(parts[0])
    assert table.schema.names == CACHE_SCHEMA.names
    rows = table.to_pylist()
    assert [r["image"] for r in rows] == list(decoded["image"][:4])
    for i, r in enumerate(rows):
        assert r["features"] == computed["features"][i] and r["pad_left"] == computed["pad_left"][i]


def test_write_features_on_s3(s3_bucket):
    bucket, so = s3_bucket
    feats = np.arange(2 * 3 * 4, dtype=np.float16).reshape(2, 3, 4)
    row = {
        "path": ["s3://x/a.png"],
        "image": ["s3://x/a.png"],
        "width": [70],
        "height": [40],
        "resized_h": [35],
        "resized_w": [61],
        "pad_top": [3],
        "pad_left": [4],
        "grid_h": [3],
        "grid_w": [5],
        "channels": [2],
        "features": [feats.tobytes()],
        **{f: [""] for f in ERROR_FIELDS},
    }
    batch = {k: np.array(v, dtype=object) for k, v in row.items()}
    folder = f"s3://{bucket}/cache/x"
    WriteFeatures(folder, so)(batch)
    assert cached_sizes(folder, so) == {"s3://x/a.png": (70, 40)}
    assert [p.startswith(f"s3://{bucket}/cache/x/part-") for p in part_files(folder, so)] == [True]


# ---- CachedSamples ---------------------------------------------------------------------------


def cache_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """Cache rows (as Ray Data hands them from the parquet parts) from dicts with `features`
    as a (C, gh, gw) array and the CACHE_SCHEMA size columns."""
    out = {name: [] for name in CACHE_SCHEMA.names}
    for r in rows:
        f = np.asarray(r["features"], np.float16)
        gh, gw, top, left = padded_geometry(r["resized_h"], r["resized_w"])
        r = {
            "pad_top": top,
            "pad_left": left,
            "grid_h": gh,
            "grid_w": gw,
            "channels": f.shape[0],
            **r,
            "features": f.tobytes(),
        }
        assert (r["grid_h"], r["grid_w"]) == f.shape[1:]
        for name in CACHE_SCHEMA.names:
            out[name].append(r[name])
    return {k: np.array(v, dtype=object if k in ("image", "features") else None) for k, v in out.items()}


def coded_cache_row(tmp_path, name: str, gh: int, gw: int) -> tuple[dict, str]:
    """Channel 0 at cell (y, x) = 100 y + x; the mask's class in cell (y, x) = 16 y + x, except
    each cell's leftmost pixel column, which is ignore: a pixel-exact mirror moves it to the
    right edge of the cell."""
    y, x = np.mgrid[0:gh, 0:gw]
    feats = np.stack([100 * y + x, -(100 * y + x), np.ones_like(y)]).astype(np.float16)
    label = np.kron(16 * y + x, np.ones((PATCH, PATCH), int)).astype(np.uint8)
    label[:, ::PATCH] = IGNORE
    path = tmp_path / f"{name}.png"
    path.write_bytes(mask_png(label))
    h, w = gh * PATCH, gw * PATCH  # no resize, no padding: mask pixels are feature cells x 14
    return {
        "image": f"memory://img/{name}.jpg",
        "width": w,
        "height": h,
        "resized_h": h,
        "resized_w": w,
        "features": feats,
    }, str(path)


def test_crops_of_features_and_labels_line_up(tmp_path):
    row, mask = coded_cache_row(tmp_path, "a", 6, 9)
    n = 4
    samples = CachedSamples(SampleConfig({row["image"]: mask}, num_classes=250, crop_cells=n, seed=0))
    flips = set()
    for _ in range(40):
        out = samples(cache_batch([row, row]))
        assert out["features"].shape == (2, 3, n, n) and out["features"].dtype == np.float16
        assert out["label"].shape == (2, n * PATCH, n * PATCH) and out["label"].dtype == np.uint8
        for f, lb in zip(out["features"], out["label"], strict=True):
            code = f[0].astype(int)
            assert np.array_equal(f[1].astype(int), -code) and (f[2] == 1).all()  # channels cropped alike
            cy, cx = code // 100, code % 100
            assert (np.abs(np.diff(cy, axis=0)) == 1).all()  # a crop of adjacent cells, not a gather
            flipped = cx[0, 0] > cx[0, -1]
            flips.add(bool(flipped))
            ignore_col = PATCH - 1 if flipped else 0  # the label's own evidence of a flip
            for i in range(n):
                for j in range(n):
                    cell = lb[i * PATCH : (i + 1) * PATCH, j * PATCH : (j + 1) * PATCH]
                    assert (cell[:, ignore_col] == IGNORE).all()
                    rest = np.delete(cell, ignore_col, axis=1)
                    assert (rest == 16 * cy[i, j] + cx[i, j]).all(), (i, j, cy[i, j], cx[i, j], np.unique(rest))
    assert flips == {False, True}


def test_small_map_is_padded_to_the_crop(tmp_path):
    row, mask = coded_cache_row(tmp_path, "s", 2, 3)
    out = CachedSamples(SampleConfig({row["image"]: mask}, 250, crop_cells=4, flip=False, seed=0))(cache_batch([row]))
    f, lb = out["features"][0], out["label"][0]
    assert f.shape == (3, 4, 4) and lb.shape == (56, 56)
    assert (f[:, 2:, :] == 0).all() and (f[:, :, 3:] == 0).all()  # zero features beyond the map
    assert (lb[28:, :] == IGNORE).all() and (lb[:, 42:] == IGNORE).all()
    assert np.array_equal(f[0, :2, :3].astype(int), [[0, 1, 2], [100, 101, 102]])
    assert lb[5, 14 + 5] == 1 and lb[14 + 5, 28 + 5] == 18


def test_only_rows_of_the_split_come_out(tmp_path):
    rows, masks = [], {}
    for k, name in enumerate("abc"):
        row, mask = coded_cache_row(tmp_path, name, 2, 2)
        row["features"] = row["features"] + np.float16(k * 1000)
        rows.append(row)
        if name != "b":
            masks[row["image"]] = mask
    for crop in (None, 2):
        out = CachedSamples(SampleConfig(masks, 250, crop_cells=crop, flip=False))(cache_batch(rows))
        assert len(out["features"]) == len(out["label"]) == 2
        assert [int(f[2, 0, 0]) for f in out["features"]] == [1, 2001]  # rows a and c, in order
    none = CachedSamples(SampleConfig({}, 250, crop_cells=2))(cache_batch(rows))
    assert len(none["features"]) == 0 and len(none["label"]) == 0


def test_whole_map_label_is_resized_and_padded_with_ignore(tmp_path):
    mask = np.zeros((60, 80), np.uint8)
    mask[:, 40:] = 1
    mask[30:, :] += 2  # quadrants 0 1 / 2 3
    path = tmp_path / "m.png"
    path.write_bytes(mask_png(mask))
    rh, rw = 30, 40  # the cache's short-side resize, half the mask's size
    gh, gw, top, left = padded_geometry(rh, rw)  # 42 x 42: 6 above, 1 left
    assert (top, left) == (6, 1)
    row = {
        "image": "memory://img/q.jpg",
        "width": 80,
        "height": 60,
        "resized_h": rh,
        "resized_w": rw,
        "features": np.zeros((3, gh, gw)),
    }
    out = CachedSamples(SampleConfig({row["image"]: str(path)}, 4))(cache_batch([row]))
    assert out["features"].dtype == object and out["features"][0].shape == (3, gh, gw)
    lb = out["label"][0]
    assert lb.shape == (gh * PATCH, gw * PATCH)
    inside = lb[top : top + rh, left : left + rw]
    assert (inside[:15, :20] == 0).all() and (inside[:15, 20:] == 1).all()
    assert (inside[15:, :20] == 2).all() and (inside[15:, 20:] == 3).all()
    outside = np.ones_like(lb, bool)
    outside[top : top + rh, left : left + rw] = False
    assert (lb[outside] == IGNORE).all() and outside.sum() == lb.size - rh * rw


def test_cache_and_decode_pair_give_the_same_labels(computer, decoded, tmp_path):
    """A real cache row: CachedSamples' label is DecodePair's resized label, padded like the features."""
    computed = computer(decoded)
    folder = str(tmp_path / "cache")
    WriteFeatures(folder)(computed)
    table = pq.read_table(part_files(folder)[0])
    batch = {name: np.array(table[name].to_pylist(), dtype=object) for name in table.column_names}
    masks = dict(zip(decoded["image"][:4], decoded["mask"][:4], strict=True))
    out = CachedSamples(SampleConfig(masks, 5))(batch)
    for i in range(4):
        expected = pad_label(decoded["label"][i], *padded_geometry(*decoded["label"][i].shape))
        assert np.array_equal(out["label"][i], expected)
        assert np.array_equal(out["features"][i], features_of(computed, i))


@pytest.mark.parametrize("problem", ["deleted", "resized", "class"])
def test_a_mask_that_went_bad_is_ignored_with_a_warning(tmp_path, caplog, problem):
    row, mask = coded_cache_row(tmp_path, "a", 2, 3)
    if problem == "deleted":
        (tmp_path / "a.png").unlink()
    elif problem == "resized":
        (tmp_path / "a.png").write_bytes(mask_png(np.zeros((28, 28), np.uint8)))
    else:
        (tmp_path / "a.png").write_bytes(mask_png(np.full((28, 42), 9, np.uint8)))
    good, good_mask = coded_cache_row(tmp_path, "b", 2, 3)
    config = SampleConfig({row["image"]: mask, good["image"]: good_mask}, num_classes=5 if problem == "class" else 250)
    with caplog.at_level(logging.WARNING, logger="pipeline.features.cache"):
        out = CachedSamples(config)(cache_batch([row, good]))
    assert out["label"][0].shape == (28, 42) and (out["label"][0] == IGNORE).all()
    assert row["image"] in caplog.text
    if problem != "class":  # the other row of the batch is unaffected
        assert out["label"][1][0, 1] == 0 and out["label"][1][0, 14 + 1] == 1


def test_a_small_cache_is_held_in_memory_a_large_one_streams(tmp_path):
    from pipeline.train.data import MEMORY_SHARE, fits_in_memory

    parts = []
    for i, size in enumerate((3000, 1000)):
        parts.append(str(tmp_path / f"part-{i}.parquet"))
        (tmp_path / f"part-{i}.parquet").write_bytes(b"x" * size)
    assert fits_in_memory(parts, None, 4000 / MEMORY_SHARE)  # exactly the share: held
    assert not fits_in_memory(parts, None, 3999 / MEMORY_SHARE)
    assert not fits_in_memory([], None, 1e12)  # nothing cached: nothing to hold
