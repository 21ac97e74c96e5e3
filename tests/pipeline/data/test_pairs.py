"""Labeled sets: pairing images with masks by key (folders or a manifest), problem rows for
keys with one half only, and the hash split into train/validation."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from model.errors import DinosegError
from pipeline.data.pairs import Pairs, list_pairs, split_pairs


def png(mode="RGB", size=(6, 4), value=0) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, "PNG")
    return buf.getvalue()


def jpg(size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, "JPEG")
    return buf.getvalue()


def write(root: Path, name: str, data: bytes) -> Path:
    p = root / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def one_sentence(message: str) -> bool:
    body = message.rstrip(".")
    return "\n" not in message and message.endswith(".") and ". " not in body.replace("e.g. ", "")


# ---- pairing folders -------------------------------------------------------------------------


def test_folders_pair_by_key_across_extensions_and_nesting(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    for name in ("a/b.jpg", "a/c/d.jpeg", "e.png"):
        write(images, name, jpg() if name.endswith(("jpg", "jpeg")) else png())
    for key in ("a/b", "a/c/d", "e"):
        write(masks, f"{key}.png", png("L"))
    pairs = list_pairs(str(images), str(masks))
    assert pairs.keys == ["a/b", "a/c/d", "e"]
    assert pairs.images == [str(images / "a/b.jpg"), str(images / "a/c/d.jpeg"), str(images / "e.png")]
    assert pairs.masks == [str(masks / "a/b.png"), str(masks / "a/c/d.png"), str(masks / "e.png")]
    assert pairs.problems == [] and len(pairs) == 3


def test_one_half_only_is_a_problem_and_left_out(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    write(images, "both.jpg", jpg())
    write(images, "sub/no_mask.jpg", jpg())
    write(masks, "both.png", png("L"))
    write(masks, "orphan/no_image.png", png("L"))
    pairs = list_pairs(str(images), str(masks))
    assert pairs.keys == ["both"] and pairs.images == [str(images / "both.jpg")]
    by_key = {p["key"]: p for p in pairs.problems}
    assert set(by_key) == {"sub/no_mask", "orphan/no_image"}
    assert all(p["stage"] == "pair" for p in pairs.problems)
    no_mask, no_image = by_key["sub/no_mask"], by_key["orphan/no_image"]
    assert no_mask["image"] == str(images / "sub/no_mask.jpg") and no_mask["mask"] == ""
    assert no_image["mask"] == str(masks / "orphan/no_image.png") and no_image["image"] == ""
    # the messages name the file that has no partner
    assert "no_mask.jpg" in no_mask["message"] and "no_image.png" in no_image["message"]


def test_only_unpaired_files_is_not_fatal(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    write(images, "x.jpg", jpg())
    write(masks, "y.png", png("L"))
    pairs = list_pairs(str(images), str(masks))
    assert len(pairs) == 0 and sorted(p["key"] for p in pairs.problems) == ["x", "y"]


def test_no_images_at_all_is_an_error(tmp_path):
    (tmp_path / "images").mkdir()
    write(tmp_path / "masks", "a.png", png("L"))
    with pytest.raises(DinosegError, match="images"):
        list_pairs(str(tmp_path / "images"), str(tmp_path / "masks"))
    with pytest.raises(DinosegError, match="does not exist"):
        list_pairs(str(tmp_path / "nowhere"), str(tmp_path / "masks"))


def test_images_without_masks_argument_needs_a_manifest(tmp_path):
    write(tmp_path / "images", "a.jpg", jpg())
    with pytest.raises(DinosegError, match="manifest") as e:
        list_pairs(str(tmp_path / "images"))
    assert one_sentence(str(e.value))


def test_pairs_on_s3(s3_bucket):
    import fsspec

    bucket, so = s3_bucket
    fs = fsspec.filesystem("s3", **so)
    fs.pipe(
        {
            f"{bucket}/in/images/a/b.jpg": jpg(),
            f"{bucket}/in/images/c.png": png(),
            f"{bucket}/in/masks/a/b.png": png("L"),
            f"{bucket}/in/masks/c.png": png("L"),
        }
    )
    pairs = list_pairs(f"s3://{bucket}/in/images", f"s3://{bucket}/in/masks", so)
    assert pairs.keys == ["a/b", "c"]
    assert pairs.images == [f"s3://{bucket}/in/images/a/b.jpg", f"s3://{bucket}/in/images/c.png"]
    assert pairs.masks == [f"s3://{bucket}/in/masks/a/b.png", f"s3://{bucket}/in/masks/c.png"]


# ---- manifests -------------------------------------------------------------------------------


def test_csv_manifest_resolves_relative_entries_against_its_folder(tmp_path, monkeypatch):
    root = tmp_path / "set"
    write(root, "imgs/x.jpg", jpg())
    write(root, "lbl/x.png", png("L"))
    elsewhere = write(tmp_path / "other", "y.jpg", jpg())
    (root / "pairs.csv").write_text(f"image,mask\nimgs/x.jpg,lbl/x.png\n{elsewhere},lbl/x.png\n")
    monkeypatch.chdir(tmp_path)  # not the manifest's folder: relative entries must not follow the cwd
    pairs = list_pairs(str(root / "pairs.csv"))
    assert pairs.images == [str(root / "imgs/x.jpg"), str(elsewhere)]
    assert pairs.masks == [str(root / "lbl/x.png")] * 2
    assert all(Path(p).exists() for p in pairs.images + pairs.masks)
    assert pairs.problems == []


def test_manifest_key_is_the_entry_without_extension(tmp_path):
    # the key must not depend on where the dataset lives, or moving it reshuffles the val split
    elsewhere = write(tmp_path / "other", "y.jpg", jpg())
    for root in (tmp_path / "a", tmp_path / "moved" / "b"):
        write(root, "imgs/x.jpg", jpg())
        write(root, "lbl/x.png", png("L"))
        (root / "pairs.csv").write_text(f"image,mask\n./imgs/x.jpg,lbl/x.png\n{elsewhere},lbl/x.png\n")
        pairs = list_pairs(str(root / "pairs.csv"))
        assert pairs.keys == ["imgs/x", str(elsewhere.with_suffix("")).lstrip("/")]
        assert pairs.images[0] == str(root / "imgs/x.jpg")


def test_parquet_manifest_with_problem_rows(tmp_path):
    write(tmp_path, "a.jpg", jpg())
    write(tmp_path, "b.jpg", jpg())
    write(tmp_path, "a.png", png("L"))
    table = pa.table({"image": ["a.jpg", "b.jpg", "a.jpg"], "mask": ["a.png", None, "a.png"]})
    pq.write_table(table, tmp_path / "m.parquet")
    pairs = list_pairs(str(tmp_path / "m.parquet"))
    assert pairs.images == [str(tmp_path / "a.jpg")] and pairs.masks == [str(tmp_path / "a.png")]
    stages = sorted((p["stage"], Path(p["image"]).name) for p in pairs.problems)
    assert stages == [("list", "a.jpg"), ("pair", "b.jpg")]  # listed twice; no mask entry


def test_manifest_without_the_columns_is_one_sentence(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\na.jpg,a.png\n")
    with pytest.raises(DinosegError) as e:
        list_pairs(str(tmp_path / "m.csv"))
    message = str(e.value)
    assert "'image'" in message and "'mask'" in message and "m.csv" in message
    assert one_sentence(message)


def test_missing_manifest_is_an_error(tmp_path):
    with pytest.raises(DinosegError, match="does not exist"):
        list_pairs(str(tmp_path / "nope.csv"))


# ---- the split -------------------------------------------------------------------------------


def many(n: int, start: int = 0) -> Pairs:
    p = Pairs()
    for i in range(start, start + n):
        p.add(f"k/{i:05d}", f"/img/{i}.jpg", f"/mask/{i}.png")
    return p


def test_split_is_a_deterministic_partition_near_the_fraction():
    pairs = many(1000)
    train, val = split_pairs(pairs, 0.2, seed=0)
    assert sorted(train.keys + val.keys) == pairs.keys and not set(train.keys) & set(val.keys)
    assert 140 <= len(val) <= 260  # binomial(1000, 0.2): sd ~12.6, this is > 4.5 sd
    # rows stay whole: a key keeps its own image and mask
    for part in (train, val):
        for k, im, m in zip(part.keys, part.images, part.masks, strict=True):
            i = int(k.split("/")[1])
            assert (im, m) == (f"/img/{i}.jpg", f"/mask/{i}.png")
    again = split_pairs(many(1000), 0.2, seed=0)
    assert again[0].keys == train.keys and again[1].keys == val.keys
    other = split_pairs(pairs, 0.2, seed=1)
    assert other[1].keys != val.keys  # the seed changes which keys validate


def test_split_is_not_the_first_or_last_keys():
    _, val = split_pairs(many(1000), 0.1)
    idx = sorted(int(k.split("/")[1]) for k in val.keys)
    assert idx[0] < 300 and idx[-1] > 700  # spread over the key range, not a prefix/suffix


def keyed(numbers) -> Pairs:
    p = Pairs()
    for i in sorted(numbers):
        p.add(f"k/{i:05d}", f"/img/{i}.jpg", f"/mask/{i}.png")
    return p


def test_a_key_keeps_its_side_when_the_set_grows():
    # the new keys sort between the old ones (list_pairs returns keys in order), so a split by
    # position, or by a permutation of the whole set, would move old keys
    train, val = split_pairs(keyed(range(0, 2000, 4)), 0.3, seed=7)
    train2, val2 = split_pairs(keyed(range(2000)), 0.3, seed=7)
    assert set(val.keys) <= set(val2.keys) and set(train.keys) <= set(train2.keys)
    assert len(val2) > len(val)  # the new keys were split too


def test_split_fraction_edges():
    train, val = split_pairs(many(50), 0.0)
    assert len(val) == 0 and len(train) == 50
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(DinosegError, match="val-fraction"):
            split_pairs(many(5), bad)
