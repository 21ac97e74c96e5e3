"""The synthetic segmentation set: determinism, labels and ignore outlines, colour separability
(what makes a linear probe on random-ViT features learnable), and writing it locally and to S3."""

from __future__ import annotations

import io

import fsspec
import numpy as np
import pytest
from PIL import Image

from model.classes import load_class_map
from model.errors import DinosegError
from pipeline.data.synthetic import SYNTHETIC_CLASSES, make_sample, sample_size, write_synthetic
from pipeline.io.masks import decode_mask_png

IGNORE = SYNTHETIC_CLASSES.ignore_index


def sample_set(n: int = 48, size: int = 112, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    return [make_sample(np.random.default_rng([seed, i]), *sample_size(i, size)) for i in range(n)]


@pytest.fixture(scope="module")
def samples():
    return sample_set()


def test_class_map():
    assert SYNTHETIC_CLASSES.names == ("background", "disc", "square", "triangle", "ring")
    assert len(set(SYNTHETIC_CLASSES.colors)) == 5 and IGNORE == 255
    assert IGNORE >= len(SYNTHETIC_CLASSES)


def test_same_rng_state_same_sample_other_seed_other_sample():
    a = make_sample(np.random.default_rng(7), 112, 140)
    b = make_sample(np.random.default_rng(7), 112, 140)
    c = make_sample(np.random.default_rng(8), 112, 140)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_shapes_types_and_sizes(samples):
    sizes = set()
    for image, mask in samples:
        assert image.dtype == np.uint8 and mask.dtype == np.uint8
        assert image.ndim == 3 and image.shape[2] == 3 and image.shape[:2] == mask.shape
        sizes.add(mask.shape)
    assert sizes == {(112, 112), (112, 140), (140, 112)}


def test_labels_every_class_and_mostly_background(samples):
    masks = np.concatenate([m.ravel() for _, m in samples])
    assert set(np.unique(masks)) == {0, 1, 2, 3, 4, IGNORE}
    counts = np.bincount(masks, minlength=256)
    assert counts[0] > 0.5 * masks.size
    assert counts[1:5].min() > 0.01 * masks.size  # no class is a rare accident
    for _, mask in samples:
        assert (mask > 0).any()  # every image has at least one shape


def test_ignore_band_separates_every_pair_of_classes(samples):
    """Two 4-neighbours never hold two different classes: a band of 255 lies along every edge."""
    for _, mask in samples:
        assert (mask == IGNORE).any() and (mask == IGNORE).mean() < 0.1
        for a, b in ((mask[:, :-1], mask[:, 1:]), (mask[:-1], mask[1:])):
            assert not ((a != b) & (a != IGNORE) & (b != IGNORE)).any()
        # One pixel wide: every ignore pixel touches a labelled pixel.
        p = np.pad(mask, 1, constant_values=IGNORE)
        near = [p[1:-1, :-2], p[1:-1, 2:], p[:-2, 1:-1], p[2:, 1:-1], p[:-2, :-2], p[:-2, 2:], p[2:, :-2], p[2:, 2:]]
        labelled_neighbour = np.any([n != IGNORE for n in near], axis=0)
        assert labelled_neighbour[mask == IGNORE].all()


def test_backgrounds_differ_between_images(samples):
    means = np.array([image[mask == 0].mean(0) for image, mask in samples])
    assert means.std(0).min() > 5


def pixels_and_labels(samples) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.concatenate([i.reshape(-1, 3) for i, _ in samples]).astype(np.float32)
    labels = np.concatenate([m.ravel() for _, m in samples])
    keep = labels != IGNORE
    return pixels[keep], labels[keep]


def test_colour_alone_separates_the_classes(samples):
    """Mean colours fitted on one set classify the pixels of another, every class, not just the
    background: the nearest-mean rule is linear, so a linear head on colour features can learn it."""
    pixels, labels = pixels_and_labels(samples)
    means = np.stack([pixels[labels == c].mean(0) for c in range(len(SYNTHETIC_CLASSES))])
    gaps = np.linalg.norm(means[:, None] - means[None], axis=-1)[np.triu_indices(len(means), 1)]
    assert gaps.min() > 60, means
    pixels, labels = pixels_and_labels(sample_set(16, seed=1))
    guess = ((pixels[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    recall = np.array([(guess[labels == c] == c).mean() for c in range(len(SYNTHETIC_CLASSES))])
    assert (guess == labels).mean() > 0.9 and recall.min() > 0.8, recall


@pytest.mark.parametrize("kwargs", [{"train": 0}, {"size": 27}, {"val": -1}, {"seed": -1}])
def test_bad_arguments_fail_in_one_sentence(tmp_path, kwargs):
    with pytest.raises(DinosegError) as e:
        write_synthetic(str(tmp_path / "out"), **kwargs)
    assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")
    assert not (tmp_path / "out").exists()


def read_set(info: dict, split: str, storage_options: dict | None = None):
    fs, root = fsspec.core.url_to_fs(info["images"][split], **(storage_options or {}))
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(root, detail=False))
    out = []
    for name in names:
        with fsspec.open(f"{info['images'][split]}/{name}", "rb", **(storage_options or {})) as f:
            image = Image.open(f)
            assert image.format == "PNG" and image.mode == "RGB"
            image = np.asarray(image)
        with fsspec.open(f"{info['masks'][split]}/{name}", "rb", **(storage_options or {})) as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as m:
            assert m.mode == "P"
        out.append((name, image, decode_mask_png(data)))
    return out


def test_write_local_reads_back_as_generated(tmp_path):
    info = write_synthetic(str(tmp_path / "syn"), train=5, val=2, size=56, seed=3)
    root = str(tmp_path / "syn")
    assert info == {
        "train": 5,
        "val": 2,
        "classes": f"{root}/classes.yaml",
        "images": {"train": f"{root}/train/images", "val": f"{root}/val/images"},
        "masks": {"train": f"{root}/train/masks", "val": f"{root}/val/masks"},
    }
    assert load_class_map(info["classes"]) == SYNTHETIC_CLASSES
    train = read_set(info, "train")
    assert [n for n, _, _ in train] == [f"{i:04d}.png" for i in range(5)]
    assert [im.shape[:2] for _, im, _ in train] == [(56, 56), (56, 70), (56, 56), (70, 56), (56, 56)]
    for i, (_, image, mask) in enumerate(train):
        want_image, want_mask = make_sample(np.random.default_rng([3, 0, i]), *sample_size(i, 56))
        assert np.array_equal(image, want_image) and np.array_equal(mask, want_mask)
    assert len(read_set(info, "val")) == 2
    # Same seed, same bytes; another seed, other images.
    again = write_synthetic(str(tmp_path / "again"), train=5, val=2, size=56, seed=3)
    other = write_synthetic(str(tmp_path / "other"), train=5, val=2, size=56, seed=4)
    for split in ("train", "val"):
        for (_, a, am), (_, b, bm) in zip(read_set(info, split), read_set(again, split), strict=True):
            assert np.array_equal(a, b) and np.array_equal(am, bm)
    assert not np.array_equal(read_set(info, "train")[0][1], read_set(other, "train")[0][1])


def test_val_does_not_depend_on_train_count_and_can_be_empty(tmp_path):
    a = write_synthetic(str(tmp_path / "a"), train=1, val=2, size=28)
    b = write_synthetic(str(tmp_path / "b"), train=3, val=2, size=28)
    for (_, x, xm), (_, y, ym) in zip(read_set(a, "val"), read_set(b, "val"), strict=True):
        assert np.array_equal(x, y) and np.array_equal(xm, ym)
    c = write_synthetic(str(tmp_path / "c"), train=1, val=0, size=28)
    assert set(c["images"]) == set(c["masks"]) == {"train"} and not (tmp_path / "c" / "val").exists()


def test_write_to_s3(s3_bucket):
    bucket, so = s3_bucket
    info = write_synthetic(f"s3://{bucket}/syn/", train=3, val=1, size=28, seed=1, storage_options=so)
    assert info["images"]["train"] == f"s3://{bucket}/syn/train/images"
    assert info["classes"] == f"s3://{bucket}/syn/classes.yaml"
    assert load_class_map(info["classes"], so) == SYNTHETIC_CLASSES
    train = read_set(info, "train", so)
    assert len(train) == 3 and len(read_set(info, "val", so)) == 1
    for i, (_, image, mask) in enumerate(train):
        want_image, want_mask = make_sample(np.random.default_rng([1, 0, i]), *sample_size(i, 28))
        assert np.array_equal(image, want_image) and np.array_equal(mask, want_mask)


def test_job_writes_and_prints_the_train_command(tmp_path, capsys):
    from jobs.options import main

    out = tmp_path / "my set"
    assert main("jobs.synthetic", [str(out), "--train", "2", "--val", "1", "--size", "28"]) == 0
    text = capsys.readouterr().out
    assert (out / "classes.yaml").exists() and len(list((out / "train" / "masks").iterdir())) == 2
    assert f"dinoseg train '{out}/train/images' '{out}/train/masks' --val-images '{out}/val/images'" in text
    assert f"--classes '{out}/classes.yaml' --output OUT" in text
    assert main("jobs.synthetic", [str(tmp_path / "bad"), "--size", "10"]) == 2
    assert "size=10 is too small" in capsys.readouterr().err
    assert main("jobs.synthetic", [str(tmp_path / "bad"), "--storage-options", "{"]) == 2


def read_clicks(path) -> list[tuple[str, float, float, str]]:
    lines = path.read_text().splitlines()
    assert lines[0] == "image,x,y,class"
    out = []
    for line in lines[1:]:
        name, x, y, cls = line.split(",")
        out.append((name, float(x), float(y), cls))
    return out


def test_points_lie_on_their_class_and_cover_every_class(tmp_path):
    info = write_synthetic(str(tmp_path / "syn"), train=6, val=2, size=56, seed=2, points=3)
    assert info["points"] == str(tmp_path / "syn" / "train" / "points.csv")
    clicks = read_clicks(tmp_path / "syn" / "train" / "points.csv")
    masks = {name: mask for name, _, mask in read_set(info, "train")}
    assert {name for name, *_ in clicks} == set(masks)  # every training image, no validation image
    for name, mask in masks.items():
        mine = [(x, y, SYNTHETIC_CLASSES.names.index(c)) for n, x, y, c in clicks if n == name]
        per_class = {}
        for x, y, c in mine:
            assert 0 <= x < mask.shape[1] and 0 <= y < mask.shape[0]
            assert x % 1 == 0.5 and y % 1 == 0.5  # pixel centres
            assert mask[int(y), int(x)] == c, (name, x, y, c)
            per_class[c] = per_class.get(c, 0) + 1
        present = set(np.unique(mask[mask != IGNORE]).tolist())
        assert set(per_class) == present, name
        assert max(per_class.values()) <= 3
        assert len(set(mine)) == len(mine)  # no pixel clicked twice
    # the same seed clicks the same pixels
    again = write_synthetic(str(tmp_path / "again"), train=6, val=0, size=56, seed=2, points=3)
    assert read_clicks(tmp_path / "again" / "train" / "points.csv") == clicks
    assert again["points"].endswith("again/train/points.csv")


def test_points_file_reads_back_through_the_point_reader(tmp_path):
    from pipeline.data.points import points_to_pairs

    info = write_synthetic(str(tmp_path / "syn"), train=3, val=0, size=28, points=2)
    pairs = points_to_pairs(info["images"]["train"], info["points"], SYNTHETIC_CLASSES, str(tmp_path / "pm"), radius=1)
    assert pairs.keys == ["0000", "0001", "0002"] and pairs.problems == []


def test_without_points_no_points_file(tmp_path):
    info = write_synthetic(str(tmp_path / "syn"), train=2, val=1, size=28)
    assert "points" not in info
    assert not list((tmp_path / "syn").rglob("*.csv"))
