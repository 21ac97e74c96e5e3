"""Point files (CSV image,x,y,class or JSON) as sparse masks: parsing and its errors, telling
a point file from other MASKS, discs and their conflicts, and points_to_pairs on image folders."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.classes import IGNORE_INDEX as IGNORE
from model.classes import ClassMap
from model.errors import DinosegError
from pipeline.data.points import class_index, draw_points, is_point_file, labeled_pairs, points_to_pairs, read_points
from pipeline.io.masks import decode_mask_png

CLASSES = ClassMap(("sky", "tree", "road"), ((10, 20, 200), (20, 160, 30), (90, 90, 90)))
ROWS = [
    {"image": "a/b", "x": 3.5, "y": 4.0, "class": "sky"},
    {"image": "c.png", "x": 0.0, "y": 10.25, "class": "2"},
]


def write_csv(path: Path, rows: list[dict]) -> str:
    lines = ["image,x,y,class"] + [f"{r['image']},{r['x']},{r['y']},{r['class']}" for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def one_sentence(message: str) -> bool:
    body = message.rstrip(".")
    return "\n" not in message and message.endswith(".") and ". " not in body.replace("e.g. ", "")


# ---- reading ---------------------------------------------------------------------------------


def test_csv_and_both_json_layouts_read_the_same_rows(tmp_path):
    csv = write_csv(tmp_path / "p.csv", ROWS)
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    as_json = dict(ROWS[1], x=0, **{"class": 2})  # numbers where the CSV has text: the same row
    (tmp_path / "obj.json").write_text(json.dumps({"points": [ROWS[0], as_json]}))
    expected = [
        {"image": "a/b", "x": 3.5, "y": 4.0, "class": "sky"},
        {"image": "c.png", "x": 0.0, "y": 10.25, "class": "2"},
    ]
    for url in (csv, str(tmp_path / "list.json"), str(tmp_path / "obj.json")):
        rows = read_points(url)
        assert rows == expected, url
        assert all(isinstance(r["x"], float) and isinstance(r["class"], str) for r in rows)


def test_csv_class_column_is_text_even_when_every_class_is_a_number(tmp_path):
    url = write_csv(tmp_path / "p.csv", [{"image": "a.png", "x": 1, "y": 2, "class": "1"}])
    assert read_points(url) == [{"image": "a.png", "x": 1.0, "y": 2.0, "class": "1"}]


def test_csv_image_names_that_look_like_numbers_stay_as_written(tmp_path):
    """Keys such as '0001' (numbered frames) must reach the image lookup as written."""
    url = write_csv(tmp_path / "p.csv", [{"image": "0001", "x": 1, "y": 2, "class": "sky"}])
    assert read_points(url)[0]["image"] == "0001"  # BUG: pyarrow infers int64, the row says '1'


@pytest.mark.parametrize(
    "name, text",
    [
        ("short.csv", "image,x,y,class\na.png,1,2\n"),  # a row missing a column
        ("nocls.csv", "image,x,y\na.png,1,2\n"),  # a column missing
        ("blank.csv", "image,x,y,class\na.png,1,2,\n"),  # an empty value
        ("text_x.csv", "image,x,y,class\na.png,left,2,sky\n"),  # x not a number
        ("empty.csv", ""),
        ("header.csv", "image,x,y,class\n"),  # no points
        ("empty.json", ""),
        ("scalar.json", "3"),
        ("nolist.json", '{"rows": []}'),
        ("text_y.json", '[{"image": "a.png", "x": 1, "y": "top", "class": "sky"}]'),
        ("missing_image.json", '[{"x": 1, "y": 2, "class": "sky"}]'),
        ("nothing.json", "[]"),
    ],
)
def test_bad_point_files_are_one_sentence_naming_the_file(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(DinosegError) as e:
        read_points(str(tmp_path / name))
    message = str(e.value)
    assert name in message and "\n" not in message and message.endswith(".")


def test_a_missing_point_file_is_an_error(tmp_path):
    with pytest.raises(DinosegError, match="does not exist") as e:
        read_points(str(tmp_path / "nope.csv"))
    assert "nope.csv" in str(e.value) and one_sentence(str(e.value))


def test_is_point_file(tmp_path):
    points = write_csv(tmp_path / "p.csv", ROWS)
    quoted = tmp_path / "q.CSV"
    quoted.write_text('"image","x","y","class"\n"a.png",1,2,"sky"\n')
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("image,mask\na.png,a_mask.png\n")
    (tmp_path / "masks").mkdir()
    assert is_point_file(points) and is_point_file(str(quoted))
    assert is_point_file(str(tmp_path / "anything.json"))  # any .json, even one not yet readable
    assert not is_point_file(str(manifest))
    assert not is_point_file(str(tmp_path / "masks"))
    assert not is_point_file(str(tmp_path / "missing.csv"))
    assert not is_point_file(None) and not is_point_file("")
    assert not is_point_file(str(tmp_path / "m.parquet"))


def test_class_index_by_name_and_by_index():
    assert [class_index(n, CLASSES) for n in ("sky", "tree", "road")] == [0, 1, 2]
    assert [class_index(n, CLASSES) for n in ("0", "2")] == [0, 2]
    assert class_index("3", CLASSES) is None  # past the last class
    assert class_index("car", CLASSES) is None and class_index("-1", CLASSES) is None
    assert class_index("Sky", CLASSES) is None  # names are exact


# ---- drawing ---------------------------------------------------------------------------------


def disc_pixels(h: int, w: int, x: float, y: float, r: float) -> np.ndarray:
    """Pixels whose centre lies within r of (x, y), by loops."""
    out = np.zeros((h, w), bool)
    for i in range(h):
        for j in range(w):
            out[i, j] = (j + 0.5 - x) ** 2 + (i + 0.5 - y) ** 2 <= r * r
    return out


@pytest.mark.parametrize("x, y, r", [(10.5, 8.5, 3), (10.0, 8.0, 4.2), (1.2, 0.3, 2.5), (19.9, 14.9, 6)])
def test_a_disc_of_radius_r_has_the_class_and_the_rest_is_ignore(x, y, r):
    mask = draw_points(15, 20, [(x, y, 2)], r)
    assert mask.shape == (15, 20) and mask.dtype == np.uint8
    disc = disc_pixels(15, 20, x, y, r)
    assert disc.sum() > 1
    assert (mask[disc] == 2).all() and (mask[~disc] == IGNORE).all()


@pytest.mark.parametrize("x, y", [(3.2, 5.7), (0.0, 0.0), (7.0, 2.0), (19.99, 14.99), (12.5, 9.5)])
def test_a_radius_under_a_pixel_still_marks_the_clicked_pixel(x, y):
    for r in (0.0, 0.1, 0.4):
        mask = draw_points(15, 20, [(x, y, 1)], r)
        assert mask[int(y), int(x)] == 1
        assert (mask == 1).sum() == 1 and (mask == IGNORE).sum() == 15 * 20 - 1


def test_overlapping_discs_of_two_classes_leave_the_overlap_unsure():
    a, b = (8.0, 8.0, 0), (12.0, 8.0, 1)
    mask = draw_points(16, 24, [a, b], 3)
    da, db = disc_pixels(16, 24, 8, 8, 3), disc_pixels(16, 24, 12, 8, 3)
    assert (da & db).any() and (da & ~db).any()
    assert (mask[da & db] == IGNORE).all()
    assert (mask[da & ~db] == 0).all() and (mask[db & ~da] == 1).all()
    assert (mask[~(da | db)] == IGNORE).all()
    # the order of the points does not matter
    assert np.array_equal(draw_points(16, 24, [b, a], 3), mask)
    # a third disc of the first class over the overlap does not win it back
    assert (draw_points(16, 24, [a, b, (10.0, 8.0, 0)], 3)[da & db] == IGNORE).all()


def test_overlapping_discs_of_one_class_merge():
    mask = draw_points(16, 24, [(8.0, 8.0, 2), (12.0, 8.0, 2)], 3)
    union = disc_pixels(16, 24, 8, 8, 3) | disc_pixels(16, 24, 12, 8, 3)
    assert (mask[union] == 2).all() and (mask[~union] == IGNORE).all()


# ---- points_to_pairs -------------------------------------------------------------------------


def write_png(path: Path, size: tuple[int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 80, 40)).save(path, "PNG")
    return path


def read_mask(url: str) -> tuple[Image.Image, np.ndarray]:
    data = Path(url).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.copy(), decode_mask_png(data)


@pytest.fixture
def folder(tmp_path) -> Path:
    images = tmp_path / "images"
    write_png(images / "a.png", (30, 20))  # (width, height)
    write_png(images / "sub" / "b.png", (16, 24))
    write_png(images / "c.png", (10, 10))
    write_png(images / "d.png", (12, 12))  # no point names it: no mask
    return images


def test_points_become_sparse_masks_at_each_images_size(tmp_path, folder):
    full_c = str(folder / "c.png")
    rows = [
        {"image": "a", "x": 5.5, "y": 5.5, "class": "sky"},  # by key
        {"image": "a", "x": 20.5, "y": 12.5, "class": "2"},  # by class index
        {"image": "sub/b.png", "x": 8.5, "y": 20.5, "class": "tree"},  # by relative path with extension
        {"image": "./sub/b.png", "x": 2.5, "y": 2.5, "class": "tree"},
        {"image": full_c, "x": 4.5, "y": 4.5, "class": "road"},  # by full path
        {"image": "nowhere", "x": 1, "y": 1, "class": "sky"},  # unknown image
        {"image": "a", "x": 1, "y": 1, "class": "car"},  # unknown class
        {"image": "sub/b", "x": 16, "y": 3, "class": "sky"},  # x == width: outside
        {"image": "c", "x": 3, "y": -1, "class": "sky"},  # outside
    ]
    points = write_csv(tmp_path / "points.csv", rows)
    out = tmp_path / "out"
    pairs = points_to_pairs(str(folder), points, CLASSES, str(out), radius=2)
    assert pairs.keys == ["a", "c", "sub/b"]
    assert pairs.images == [str(folder / "a.png"), full_c, str(folder / "sub" / "b.png")]
    assert pairs.masks == [str(out / "a.png"), str(out / "c.png"), str(out / "sub" / "b.png")]
    assert not (out / "d.png").exists()
    sizes = {"a": (30, 20), "c": (10, 10), "sub/b": (16, 24)}
    drawn = {
        "a": [(5.5, 5.5, 0), (20.5, 12.5, 2)],
        "c": [(4.5, 4.5, 2)],
        "sub/b": [(8.5, 20.5, 1), (2.5, 2.5, 1)],
    }
    for key, mask_url in zip(pairs.keys, pairs.masks, strict=True):
        img, mask = read_mask(mask_url)
        assert img.mode == "P" and img.size == sizes[key]
        assert img.getpalette()[:9] == [10, 20, 200, 20, 160, 30, 90, 90, 90]
        w, h = sizes[key]
        assert np.array_equal(mask, draw_points(h, w, drawn[key], 2)), key
        for x, y, c in drawn[key]:
            assert mask[int(y), int(x)] == c
    problems = pairs.problems
    assert all(p["stage"] == "points" and p["mask"] == points for p in problems)
    by_key = {}
    for p in problems:
        by_key.setdefault(p["key"], []).append(p["message"])
    assert set(by_key) == {"nowhere", "a", "sub/b", "c"}
    assert "nowhere" in by_key["nowhere"][0]
    assert any("car" in m for m in by_key["a"])
    assert any("1 points lie outside the 16x24 image" in m for m in by_key["sub/b"])
    assert any("outside the 10x10 image" in m for m in by_key["c"])


def test_an_image_named_by_its_relative_path_keeps_the_case_of_its_extension(tmp_path):
    images = tmp_path / "images"
    write_png(images / "Photo.JPG", (8, 8))  # a PNG with an upper-case name: the decoder sniffs the bytes
    write_png(images / "other.png", (8, 8))
    rows = [
        {"image": "Photo.JPG", "x": 2, "y": 2, "class": "sky"},
        {"image": "other.png", "x": 2, "y": 2, "class": "sky"},
    ]
    pairs = points_to_pairs(str(images), write_csv(tmp_path / "p.csv", rows), CLASSES, str(tmp_path / "out"))
    assert "other" in pairs.keys
    # BUG: the lookup spells the extension lower-case ('Photo.jpg'): the point is an unknown image
    assert pairs.keys == ["Photo", "other"], pairs.problems


def test_no_point_landing_anywhere_is_an_error(tmp_path, folder):
    rows = [
        {"image": "nowhere", "x": 1, "y": 1, "class": "sky"},
        {"image": "a", "x": 100, "y": 1, "class": "sky"},
        {"image": "c", "x": 1, "y": 1, "class": "car"},
    ]
    points = write_csv(tmp_path / "p.csv", rows)
    with pytest.raises(DinosegError, match="no point") as e:
        points_to_pairs(str(folder), points, CLASSES, str(tmp_path / "out"))
    assert "p.csv" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "a.png").exists()


def test_an_exif_rotated_jpeg_gets_a_mask_of_its_displayed_size(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: stored 40x20 shows as 20x40
    Image.new("RGB", (40, 20), (200, 200, 200)).save(images / "r.jpg", "JPEG", exif=exif.tobytes())
    # (15, 35) lies on the displayed image only: stored, y = 35 would be past its 20 rows
    points = write_csv(tmp_path / "p.csv", [{"image": "r.jpg", "x": 15.5, "y": 35.5, "class": "road"}])
    pairs = points_to_pairs(str(images), points, CLASSES, str(tmp_path / "out"), radius=1)
    assert pairs.keys == ["r"] and pairs.problems == []
    img, mask = read_mask(pairs.masks[0])
    assert img.size == (20, 40) and mask.shape == (40, 20)
    assert mask[35, 15] == 2 and (mask == 2).sum() < 10


def test_labeled_pairs_takes_a_point_file_a_mask_folder_or_a_manifest(tmp_path, folder):
    """What train, self-train and prototypes call for IMAGES MASKS: a point file is drawn first."""
    points = write_csv(tmp_path / "points.csv", [{"image": "a", "x": 5.5, "y": 5.5, "class": "sky"}])
    drawn = labeled_pairs(str(folder), points, CLASSES, str(tmp_path / "drawn"), radius=2)
    assert drawn.keys == ["a"] and drawn.masks == [str(tmp_path / "drawn" / "a.png")]
    assert (tmp_path / "drawn" / "a.png").exists()
    # a folder of masks: paired by key, nothing drawn
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "a.png").write_bytes((tmp_path / "drawn" / "a.png").read_bytes())
    paired = labeled_pairs(str(folder), str(masks), CLASSES, str(tmp_path / "unused"))
    assert paired.keys == ["a"] and paired.masks == [str(masks / "a.png")] and not (tmp_path / "unused").exists()
    assert {p["key"] for p in paired.problems} == {"sub/b", "c", "d"}  # images without a mask
    # an image,mask manifest is not a point file
    manifest = tmp_path / "pairs.csv"
    manifest.write_text(f"image,mask\n{folder / 'a.png'},{masks / 'a.png'}\n")
    assert labeled_pairs(str(manifest), None, CLASSES, str(tmp_path / "unused")).masks == [str(masks / "a.png")]
