"""Building prototype heads: labels to patch weights at the mask's resolution, the per-class
accumulator (weighted mean, k-means centroids, bounded sample), --layers, and --from-clusters
on an edited discover folder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from model.checkpoint import HeadCheckpoint, save_head_checkpoint
from model.classes import IGNORE_INDEX as IGNORE
from model.classes import ClassMap, default_color, save_class_map
from model.errors import DinosegError
from model.geometry import PATCH_SIZE as PATCH
from model.geometry import resized_size
from model.heads import HeadConfig, PrototypeHead, build_head, prototype_config, prototype_state
from model.hub import load_head
from pipeline.features.config import parse_layers
from pipeline.features.pairs import padded_geometry
from pipeline.label.accumulate import ClassAccumulator, patch_weights
from pipeline.label.clusters import from_clusters
from pipeline.label.prototypes import PrototypeConfig, record_url, run_prototypes, summary
from pipeline.label.sheets import cluster_colors


def geometry(h: int, w: int, resolution: int) -> dict:
    """A feature-cache row's geometry for an image of h x w at `resolution`."""
    rh, rw = resized_size(h, w, resolution, 4 * resolution)
    gh, gw, top, left = padded_geometry(rh, rw)
    return {"resized_h": rh, "resized_w": rw, "grid_h": gh, "grid_w": gw, "pad_top": top, "pad_left": left}


def weights_by_loop(label: np.ndarray, g: dict, num_classes: int) -> np.ndarray:
    """Every labeled pixel's centre, resized and padded, lands in one 14 px cell: 1/area there."""
    h, w = label.shape
    rh, rw = g["resized_h"], g["resized_w"]
    area = (PATCH * h / rh) * (PATCH * w / rw)
    out = np.zeros((num_classes, g["grid_h"], g["grid_w"]))
    for y in range(h):
        for x in range(w):
            c = int(label[y, x])
            if c == IGNORE or c >= num_classes:
                continue
            cy = (y + 0.5) * rh / h + g["pad_top"]  # position in the padded, resized image
            cx = (x + 0.5) * rw / w + g["pad_left"]
            i = min(g["grid_h"] - 1, math.floor(cy / PATCH))
            j = min(g["grid_w"] - 1, math.floor(cx / PATCH))
            out[c, i, j] += 1 / area
    return out


# ---- patch weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [28, 40, 56])
def test_patch_weights_match_a_per_pixel_loop(resolution):
    rng = np.random.default_rng(resolution)
    label = rng.integers(0, 3, (30, 44)).astype(np.uint8)
    label[rng.random(label.shape) < 0.3] = IGNORE
    label[0, :5] = 7  # a class the map does not have: not counted
    g = geometry(30, 44, resolution)
    if resolution == 40:  # 40 x 59, padded to 42 x 70: 1 row above, 5 columns left
        assert (g["pad_top"], g["pad_left"], g["grid_h"], g["grid_w"]) == (1, 5, 3, 5)
    got = patch_weights(label, g, 3)
    assert got.shape == (3, g["grid_h"], g["grid_w"]) and got.dtype == np.float32
    np.testing.assert_allclose(got, weights_by_loop(label, g, 3), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("resolution", [28, 56])
def test_patch_weights_are_shares_of_each_patch(resolution):
    h, w = 30, 44
    g = geometry(h, w, resolution)
    ly, lx = PATCH * h / g["resized_h"], PATCH * w / g["resized_w"]  # original pixels per patch side
    full = patch_weights(np.zeros((h, w), np.uint8), g, 2)
    assert (full[1] == 0).all()
    # a patch holds at most ceil(ly) x ceil(lx) pixel centres: its share passes 1 by rounding only
    bound = math.ceil(ly) * math.ceil(lx) / (ly * lx)
    assert full[0].max() <= bound + 1e-6 and bound < 1.15
    # the weights of the whole image add up to its pixels in patch areas
    assert full.sum() == pytest.approx(h * w / (ly * lx), rel=1e-5)
    # every patch whose 14 px square lies on the image is (about) fully labeled
    inside = [
        (i, j)
        for i in range(g["grid_h"])
        for j in range(g["grid_w"])
        if PATCH * i >= g["pad_top"]
        and PATCH * (i + 1) <= g["pad_top"] + g["resized_h"]
        and PATCH * j >= g["pad_left"]
        and PATCH * (j + 1) <= g["pad_left"] + g["resized_w"]
    ]
    assert inside
    low = math.floor(ly) * math.floor(lx) / (ly * lx)  # and at least floor(ly) x floor(lx)
    for i, j in inside:
        assert low - 1e-6 <= full[0, i, j] <= bound + 1e-6


@pytest.mark.parametrize("resolution", [28, 56])
def test_one_labeled_pixel_is_one_patch_with_weight_one_over_the_area(resolution):
    h, w = 30, 44
    g = geometry(h, w, resolution)
    area = (PATCH * h / g["resized_h"]) * (PATCH * w / g["resized_w"])
    seen = set()
    for y, x in [(0, 0), (29, 43), (0, 43), (29, 0), (15, 22), (14, 15), (7, 30)]:
        label = np.full((h, w), IGNORE, np.uint8)
        label[y, x] = 1
        got = patch_weights(label, g, 2)
        nz = np.argwhere(got)
        assert len(nz) == 1 and nz[0][0] == 1
        assert got[tuple(nz[0])] == pytest.approx(1 / area, rel=1e-6)
        seen.add(tuple(nz[0][1:]))
    assert (0, 0) in seen and (g["grid_h"] - 1, g["grid_w"] - 1) in seen  # corners map to corner patches
    assert len(seen) >= 4


def test_ignored_pixels_contribute_nothing():
    g = geometry(30, 44, 28)
    assert not patch_weights(np.full((30, 44), IGNORE, np.uint8), g, 3).any()
    label = np.full((30, 44), IGNORE, np.uint8)
    label[:, :10] = 2
    got = patch_weights(label, g, 3)
    assert not got[:2].any() and not got[2, :, 1:].any() and got[2, :, 0].all()


# ---- the accumulator -------------------------------------------------------------------------


def unit(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


def test_k1_prototype_is_the_weighted_mean_of_unit_features():
    rng = np.random.default_rng(0)
    d, c = 8, 3
    acc = ClassAccumulator(c, d, max_patches=100, seed=0, keep_samples=False)
    images = []
    for _ in range(3):
        f = (rng.normal(size=(d, 3, 4)) * rng.uniform(0.5, 5, (1, 3, 4))).astype(np.float16)
        wt = rng.uniform(0, 1, (c, 3, 4)).astype(np.float32)
        wt[rng.random(wt.shape) < 0.4] = 0
        wt[2] = 0  # class 2: never labeled
        acc.add(f, wt)
        images.append((f, wt))
    protos, valid = acc.prototypes(1, seed=0)
    assert protos.shape == (c, 1, d) and valid.tolist() == [[True], [True], [False]]
    for ci in range(2):
        total = np.zeros(d)
        for f, wt in images:
            for y in range(3):
                for x in range(4):
                    total += wt[ci, y, x] * unit(f[:, y, x].astype(np.float64))
        np.testing.assert_allclose(protos[ci, 0], unit(total), atol=1e-5)
        assert acc.weight[ci] == pytest.approx(sum(float(wt[ci].sum()) for _, wt in images), rel=1e-6)
        assert acc.patches[ci] == sum(int((wt[ci] > 0).sum()) for _, wt in images) and acc.images[ci] == 3
    assert (protos[2] == 0).all() and acc.images[2] == 0 and acc.patches[2] == 0


def two_clusters(rng, d: int = 16, n: int = 60):
    a, b = unit(rng.normal(size=d)), unit(rng.normal(size=d))
    points = np.concatenate([a + 0.05 * rng.normal(size=(n // 2, d)), b + 0.05 * rng.normal(size=(n // 2, d))])
    points = points[rng.permutation(n)]
    return a, b, points


def test_k_means_finds_the_two_clusters_of_a_class_deterministically():
    rng = np.random.default_rng(1)
    a, b, points = two_clusters(rng)
    features = points.T.reshape(16, 6, 10)  # one image, 60 patches
    weights = np.zeros((2, 6, 10), np.float32)
    weights[0] = 1.0  # class 0 everywhere; class 1 nowhere

    def build(seed: int):
        acc = ClassAccumulator(2, 16, max_patches=1000, seed=seed, keep_samples=True)
        acc.add(features.astype(np.float16), weights)
        return acc.prototypes(2, seed=seed)

    protos, valid = build(0)
    assert valid.tolist() == [[True, True], [False, False]]
    np.testing.assert_allclose(np.linalg.norm(protos[0], axis=1), 1, atol=1e-5)
    cos = np.stack([a, b]) @ protos[0].T  # (true centre, centroid)
    assert cos.max(axis=1).min() > 0.99, cos
    assert sorted(cos.argmax(axis=1)) == [0, 1]  # one centroid per cluster
    again, _ = build(0)
    assert np.array_equal(protos, again)


def test_k_larger_than_the_patches_gives_as_many_prototypes_as_patches():
    acc = ClassAccumulator(2, 4, max_patches=100, seed=0, keep_samples=True)
    f = np.eye(4, dtype=np.float16).reshape(4, 2, 2)  # 4 patches, 4 distinct directions
    wt = np.zeros((2, 2, 2), np.float32)
    wt[0, 0, :] = 1  # two patches of class 0
    wt[1, 1, 1] = 0.5  # one of class 1
    acc.add(f, wt)
    protos, valid = acc.prototypes(3, seed=0)
    assert valid.tolist() == [[True, True, False], [True, False, False]]
    np.testing.assert_allclose(protos[1, 0], [0, 0, 0, 1], atol=1e-6)
    got = {tuple(np.round(p).astype(int)) for p in protos[0, :2]}
    assert got == {(1, 0, 0, 0), (0, 1, 0, 0)}
    assert (protos[0, 2] == 0).all()


def test_the_kmeans_sample_stays_bounded_and_a_subset_of_the_patches():
    d, max_patches = 6, 10
    firsts, lasts = set(), set()
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        acc = ClassAccumulator(1, d, max_patches=max_patches, seed=seed, keep_samples=True)
        given = {}  # unit feature (fp16 bytes) -> (weight, image)
        for image in range(5):
            f = rng.normal(size=(d, 2, 4)).astype(np.float16)
            wt = rng.uniform(0.1, 1, (1, 2, 4)).astype(np.float32)
            acc.add(f, wt)
            rows = f.reshape(d, -1).T.astype(np.float32)
            rows /= np.linalg.norm(rows, axis=1, keepdims=True)
            for r, w_ in zip(rows.astype(np.float16), wt.reshape(-1), strict=True):
                given[r.tobytes()] = (w_, image)
            x, wts = acc.sample(0)
            assert len(x) == len(wts) == min(max_patches, 8 * (image + 1))
            assert x.dtype == np.float32 and x.shape[1] == d
            keys = [r.tobytes() for r in x.astype(np.float16)]  # stored as float16: exact
            assert len(set(keys)) == len(keys)  # no patch twice
            for key, w_ in zip(keys, wts, strict=True):
                assert key in given and given[key][0] == w_  # a patch of the inputs, with its own weight
        images = {given[r.tobytes()][1] for r in acc.sample(0)[0].astype(np.float16)}
        firsts.add(0 in images)
        lasts.add(4 in images)
        assert acc.patches[0] == 40  # the statistics count every patch, not only the sample
    assert True in firsts and True in lasts  # a sample of all the images, not the first or the last ones


def test_a_class_without_pixels_has_no_prototype():
    acc = ClassAccumulator(3, 4, max_patches=10, seed=0, keep_samples=True)
    wt = np.zeros((3, 2, 2), np.float32)
    wt[1] = 1
    acc.add(np.random.default_rng(0).normal(size=(4, 2, 2)).astype(np.float16), wt)
    for k in (1, 2):
        protos, valid = acc.prototypes(k, seed=0)
        assert valid[1].any() and not valid[0].any() and not valid[2].any()
        assert (protos[0] == 0).all() and (protos[2] == 0).all()


# ---- --layers --------------------------------------------------------------------------------


def test_parse_layers():
    last = (11,)
    assert parse_layers(None, 12, last) == (11,) and parse_layers("", 24, (23,)) == (23,)
    assert parse_layers(None, 12, (8, 9, 10, 11)) == (8, 9, 10, 11)  # the caller's default
    assert parse_layers("11", 12, last) == (11,)
    assert parse_layers("8, 9,10,11", 12, last) == (8, 9, 10, 11)
    assert parse_layers("11,8", 12, last) == (8, 11)  # block order, whatever the order given
    assert parse_layers("-1", 12, last) == (11,) and parse_layers("-4,-1", 12, last) == (8, 11)  # from the end
    for bad in ("12", "-13", "11,11", "11,-1", "a", "1.5", "3,,4"):
        with pytest.raises(DinosegError, match="--layers") as e:
            parse_layers(bad, 12, last)
        assert "0..11" in str(e.value)


# ---- --from-clusters -------------------------------------------------------------------------


def cluster_folder(tmp_path, clusters: int = 4, seed: int = 0):
    """A discover OUTPUT: head.pt (a prototype head, one prototype per cluster) and classes.yaml."""
    folder = tmp_path / "discover"
    classes = ClassMap(tuple(f"cluster_{i}" for i in range(clusters)), tuple(cluster_colors(clusters)))
    protos = torch.randn(clusters, 1, 384, generator=torch.Generator().manual_seed(seed))
    ckpt = HeadCheckpoint(
        "dinov2_vits14",
        prototype_config((11,), 384, clusters, 1),
        classes,
        prototype_state(protos, torch.ones(clusters, 1, dtype=torch.bool), 0.08),
        resolution=56,
        meta={"source": "discover"},
    )
    save_head_checkpoint(ckpt, str(folder / "head.pt"))
    save_class_map(classes, str(folder / "classes.yaml"))
    return folder, ckpt


def edit(folder, change) -> None:
    path = folder / "classes.yaml"
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def name_them(data: dict) -> None:
    entries = data["classes"]
    entries[0]["name"] = "sky"
    entries[1]["name"] = entries[2]["name"] = "ground"
    del entries[3]


def named_config(tmp_path, folder, **kw) -> PrototypeConfig:
    # IMAGES and MASKS are positional fields of the config (the command line defaults them to None)
    return PrototypeConfig(None, None, output=str(tmp_path / "named.pt"), from_clusters=str(folder), **kw)


def test_from_clusters_renames_merges_and_drops(tmp_path):
    folder, source = cluster_folder(tmp_path)
    edit(folder, name_them)
    info = from_clusters(named_config(tmp_path, folder))
    assert info["classes"] == ["sky", "ground"] and info["members"] == {"sky": [0], "ground": [1, 2]}
    loaded = load_head(str(tmp_path / "named.pt"))
    head = loaded.head
    assert isinstance(head, PrototypeHead)
    assert loaded.classes.names == ("sky", "ground") and loaded.backbone == "dinov2_vits14"
    colors = cluster_colors(4)
    assert loaded.classes.colors == (colors[0], colors[1])  # each class keeps its first cluster's colour
    assert head.config.extra == {"k": 2} and head.config.num_classes == 2 and head.config.layers == (11,)
    assert loaded.resolution == 56
    assert head.valid.tolist() == [[True, False], [True, True]]
    src = source.state_dict["prototypes"]
    torch.testing.assert_close(head.prototypes[0, 0], src[0, 0])
    assert (head.prototypes[0, 1] == 0).all()
    torch.testing.assert_close(head.prototypes[1], src[1:3, 0])
    assert float(head.temperature) == pytest.approx(0.08)  # the clusters' temperature
    # a feature at a cluster's prototype is segmented as the class that cluster went to
    feats = src[[0, 1, 2, 3], 0].T.reshape(1, 384, 2, 2)
    assert head([feats]).argmax(1).flatten().tolist()[:3] == [0, 1, 1]


def test_from_clusters_with_a_temperature_and_through_run_prototypes(tmp_path):
    folder, _ = cluster_folder(tmp_path)
    edit(folder, name_them)
    config = named_config(tmp_path, folder, temperature=0.5)
    info = run_prototypes(config)
    assert float(load_head(config.output).head.temperature) == pytest.approx(0.5)
    record = (tmp_path / "named.json").read_text()
    assert record_url(config.output) == str(tmp_path / "named.json") and '"ground"' in record
    text = summary(info)
    assert "sky" in text and "1, 2" in text and config.output in text


def test_from_clusters_keeps_the_order_of_the_first_entries_and_default_colours(tmp_path):
    folder, source = cluster_folder(tmp_path)

    def change(data):
        e = data["classes"]
        e[0]["name"], e[1]["name"], e[2]["name"], e[3]["name"] = "b", "a", "b", "c"
        del e[3]["color"]
        data["classes"] = [e[3], e[1], e[0], e[2]]  # listed out of id order

    edit(folder, change)
    from_clusters(named_config(tmp_path, folder))
    loaded = load_head(str(tmp_path / "named.pt"))
    assert loaded.classes.names == ("c", "a", "b")
    assert loaded.classes.colors[1:] == (cluster_colors(4)[1], cluster_colors(4)[0])
    assert all(0 <= v <= 255 for v in loaded.classes.colors[0])
    src = source.state_dict["prototypes"]
    torch.testing.assert_close(loaded.head.prototypes[2], src[[0, 2], 0])
    torch.testing.assert_close(loaded.head.prototypes[0, 0], src[3, 0])


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d["classes"][0].update(id=7), "not a cluster"),
        (lambda d: d["classes"][0].update(id=-1), "not a cluster"),
        (lambda d: d["classes"][1].update(id=0), "twice"),
        (lambda d: d.update(classes=[]), "no cluster"),
        (lambda d: d["classes"][2].update(name="  "), "empty name"),
        (lambda d: d.pop("classes"), "not a cluster class map"),
        (lambda d: d["classes"][0].pop("id"), "not a cluster class map"),
    ],
)
def test_from_clusters_rejects_a_bad_edit(tmp_path, change, match):
    folder, _ = cluster_folder(tmp_path)
    edit(folder, change)
    with pytest.raises(DinosegError, match=match) as e:
        from_clusters(named_config(tmp_path, folder))
    assert "classes.yaml" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "named.pt").exists()


def test_from_clusters_needs_the_classes_file_and_a_prototype_head(tmp_path):
    folder, _ = cluster_folder(tmp_path)
    (folder / "classes.yaml").unlink()
    with pytest.raises(DinosegError, match="does not exist"):
        from_clusters(named_config(tmp_path, folder))
    (folder / "classes.yaml").write_text("")  # empty file
    with pytest.raises(DinosegError, match="not a cluster class map"):
        from_clusters(named_config(tmp_path, folder))
    linear = HeadConfig("linear", (11,), 384, 4)
    names = tuple(f"cluster_{i}" for i in range(4))
    ckpt = HeadCheckpoint(
        "dinov2_vits14",
        linear,
        ClassMap(names, tuple(default_color(i) for i in range(4))),
        build_head(linear).state_dict(),
    )
    save_head_checkpoint(ckpt, str(folder / "head.pt"))
    save_class_map(ckpt.classes, str(folder / "classes.yaml"))
    with pytest.raises(DinosegError, match="'linear' head"):
        from_clusters(named_config(tmp_path, folder))
    with pytest.raises(DinosegError):  # no head.pt at all
        from_clusters(named_config(tmp_path, tmp_path / "nowhere"))


def test_an_existing_head_is_not_replaced_without_overwrite(tmp_path):
    head = tmp_path / "head.pt"
    head.write_bytes(b"a trained head someone cares about")
    config = PrototypeConfig(str(tmp_path), str(tmp_path), output=str(head), classes="voc2012")
    with pytest.raises(DinosegError, match="exists already: pass --overwrite"):
        run_prototypes(config)
    assert head.read_bytes() == b"a trained head someone cares about"
    with pytest.raises(DinosegError, match="must name a .pt file"):
        run_prototypes(PrototypeConfig(str(tmp_path), str(tmp_path), output=str(tmp_path / "out"), classes="voc2012"))


def test_the_sample_and_prototypes_do_not_depend_on_the_order_images_arrive_in():
    """Ray returns cache rows in any order; a seed must give the same prototypes."""
    rng = np.random.default_rng(0)
    images = {f"s3://b/img{i}.png": rng.normal(size=(8, 4, 5)).astype(np.float16) for i in range(6)}
    weights = np.zeros((2, 4, 5), np.float32)
    weights[0, :2], weights[1, 2:] = 1, 0.5

    def build(order):
        acc = ClassAccumulator(2, 8, max_patches=15, seed=3, keep_samples=True)
        for url in order:
            acc.add(images[url], weights, url)
        return acc

    a, b = build(sorted(images)), build(sorted(images, reverse=True))
    for c in (0, 1):
        np.testing.assert_array_equal(a.sample(c)[0], b.sample(c)[0])  # the same patches, in the same order
    pa, va = a.prototypes(3, seed=0)
    pb, vb = b.prototypes(3, seed=0)
    np.testing.assert_array_equal(va, vb)
    np.testing.assert_allclose(pa, pb, atol=1e-6)
    # another seed samples other patches
    other = ClassAccumulator(2, 8, max_patches=15, seed=4, keep_samples=True)
    for url in sorted(images):
        other.add(images[url], weights, url)
    assert not np.array_equal(other.sample(0)[0], a.sample(0)[0])


def test_from_clusters_refuses_what_it_would_ignore_or_destroy(tmp_path):
    folder, _ = cluster_folder(tmp_path)
    with pytest.raises(DinosegError, match="leave --classes out"):
        run_prototypes(
            PrototypeConfig(None, None, output=str(tmp_path / "n.pt"), from_clusters=str(folder), classes="voc2012")
        )
    with pytest.raises(DinosegError, match="would replace the cluster head"):
        run_prototypes(
            PrototypeConfig(None, None, output=str(folder / "head.pt"), from_clusters=str(folder), overwrite=True)
        )
    assert load_head(str(folder / "head.pt")).classes.names[0] == "cluster_0"  # untouched
