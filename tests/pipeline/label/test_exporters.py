"""The export formats, round-tripped: COCO decoded with pycocotools, CVAT's colour PNGs mapped
back through labelmap.txt, Label Studio's brush RLE decoded by a decoder written here from the
thi.ng rle-pack description. Plus the class-map checks each tool needs. No Ray."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.classes import ClassMap, bundled, default_color
from model.errors import DinosegError
from pipeline.io.brush_rle import brush_rle, pack_rle
from pipeline.label.exporters import (
    ExportItem,
    class_stats,
    cvat_labelmap,
    labelstudio_config,
    make_exporter,
    stray_values,
)

CLASSES = ClassMap(("sky", "cat", "dog", "tree"), ((70, 130, 180), (255, 0, 0), (0, 255, 0), (0, 0, 255)))


def masks() -> dict[str, np.ndarray]:
    """Odd sizes, several classes, ignore pixels, keys with folders, a class absent everywhere."""
    rng = np.random.default_rng(7)
    a = rng.integers(0, 3, size=(13, 17)).astype(np.uint8)
    a[2:9, 3:11] = 255
    b = np.zeros((31, 5), dtype=np.uint8)
    b[:, 4] = 2
    b[30, 0] = 255
    b[0, 0] = 1  # a one-pixel region, at the first pixel
    c = np.full((1, 1), 1, dtype=np.uint8)
    return {"x/y/a": a, "b": b, "c c": c}


def ls_decode(rle: list[int]) -> np.ndarray:
    """thi.ng rle-pack: 32-bit count, 5-bit word size - 1, four 4-bit repeat widths - 1, then
    chunks: flag (1 = repeat), 2-bit width choice, count - 1, and one value (repeat) or count values."""
    bits = np.unpackbits(np.asarray(rle, dtype=np.uint8))
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        v = 0
        for b in bits[pos : pos + n]:
            v = (v << 1) | int(b)
        pos += n
        return v

    num, word = read(32), read(5) + 1
    widths = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, dtype=np.int64)
    i = 0
    while i < num:
        repeat = read(1)
        j = i + 1 + read(widths[read(2)])
        if repeat:
            out[i:j] = read(word)
            i = j
        else:
            while i < j:
                out[i] = read(word)
                i += 1
    return out


def ls_mask(rle: list[int], h: int, w: int) -> np.ndarray:
    words = ls_decode(rle)
    assert words.size == 4 * h * w
    rgba = words.reshape(h, w, 4)
    assert (rgba == rgba[..., 3:]).all()  # the four RGBA words of a pixel agree
    return rgba[..., 3] > 0


# --- Label Studio brush RLE --------------------------------------------------------------------


def test_brush_rle_known_bytes_from_label_studio():
    # 128x128 pixels off = 65536 words of 0: the count, then 57, 27 (word size 8, widths 3,4,8,16)
    # and one full 16-bit repeat chunk; real Label Studio exports of masks that start with a long
    # empty run begin with the same 57, 27, 255, 255, 255, 0.
    assert brush_rle(np.zeros((128, 128), dtype=bool)) == [0, 1, 0, 0, 57, 27, 255, 255, 255, 0]
    # the narrowest repeat width that holds the run: 16 words in 4 bits (group 1) ...
    assert brush_rle(np.zeros((2, 2), dtype=bool)) == [0, 0, 0, 16, 57, 27, 253, 240, 0]
    # ... a pixel on (4 words of 255) then a pixel off, in 3 bits each (group 0)
    assert brush_rle(np.array([[1, 0]])) == [0, 0, 0, 8, 57, 27, 252, 127, 241, 128, 0]


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (40, 33), (300, 500)])
def test_brush_rle_round_trip(shape):
    rng = np.random.default_rng(shape[0])
    m = rng.random(shape) < 0.3
    if shape[0] == 300:
        m[:] = False
        m[10:290, :] = True  # 140,000 pixels on: runs past 65536 words go on in more chunks
        m[150, 7] = False
    assert (ls_mask(brush_rle(m), *shape) == m).all()


def test_pack_rle_every_run_width():
    lengths = np.array([1, 8, 9, 16, 17, 256, 257, 65536, 65537, 3 * 65536 + 5])
    values = np.arange(lengths.size) * 20
    words = ls_decode(pack_rle(lengths, values, int(lengths.sum())).tolist())
    assert (words == np.repeat(values, lengths)).all()


# --- helpers -----------------------------------------------------------------------------------


def test_class_stats_areas_and_boxes_also_for_16bit_masks():
    m = np.full((6, 9), 255, dtype=np.uint16)
    m[1:3, 2:5] = 300
    m[5, 8] = 0
    ids, areas, boxes = class_stats(m, 255)
    assert ids.tolist() == [0, 300] and areas.tolist() == [1, 6]
    assert boxes.tolist() == [[8, 5, 1, 1], [2, 1, 3, 2]]


def test_stray_values():
    m = np.array([[0, 3, 255, 7]], dtype=np.uint8)
    assert stray_values(m, CLASSES) == [7]
    assert stray_values(np.array([[0, 3, 255]], dtype=np.uint8), CLASSES) == []


# --- COCO --------------------------------------------------------------------------------------


def export(fmt: str, out: Path, classes: ClassMap = CLASSES, **options) -> list[str]:
    exporter = make_exporter(fmt, str(out), classes, None, **options)
    exporter.begin()
    for key, m in masks().items():
        exporter.add(exporter.encode(ExportItem(key, f"s3://bucket/img/{key}.jpg", m)))
    return exporter.finish()


@pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")  # pycocotools vs numpy 2's copy keyword
def test_coco_round_trip_with_pycocotools(tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    files = export("coco", tmp_path / "coco")
    assert files == [str(tmp_path / "coco" / "annotations.json")]
    assert [p.name for p in (tmp_path / "coco").iterdir()] == ["annotations.json"]  # staging removed
    data = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    assert data["categories"][1] == {"id": 2, "name": "cat", "supercategory": "", "dinoseg_class": 1}
    coco = COCO(str(tmp_path / "coco" / "annotations.json"))  # the reference reader takes the file
    by_key = {img["dinoseg_key"]: img for img in data["images"]}
    assert [img["id"] for img in data["images"]] == [1, 2, 3]
    assert by_key["x/y/a"]["file_name"] == "s3://bucket/img/x/y/a.jpg"
    for key, m in masks().items():
        image = by_key[key]
        assert (image["height"], image["width"]) == m.shape
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        present = sorted(set(np.unique(m).tolist()) - {255})
        assert sorted(a["category_id"] - 1 for a in anns) == present  # one per class present, none for 255
        for a in anns:
            c = a["category_id"] - 1
            decoded = mask_utils.decode(a["segmentation"])
            assert (decoded == (m == c)).all()
            assert a["area"] == int(mask_utils.area(a["segmentation"])) == int((m == c).sum())
            assert a["bbox"] == mask_utils.toBbox(a["segmentation"]).tolist()
            assert a["iscrowd"] == 0 and (coco.annToMask(a) == (m == c)).all()
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])


# --- CVAT --------------------------------------------------------------------------------------


def read_labelmap(path: Path) -> dict[tuple, str]:
    colours = {}
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            continue
        name, rgb, parts, actions = line.split(":")  # Datumaro's reader wants exactly 4 fields
        colours[tuple(int(v) for v in rgb.split(","))] = name
    return colours


def test_cvat_round_trip(tmp_path):
    out = tmp_path / "cvat"
    export("cvat", out, zip=True)
    assert (out / "labelmap.txt").read_text().splitlines()[:2] == [
        "# label:color_rgb:parts:actions",
        "background:0,0,0::",
    ]
    colours = read_labelmap(out / "labelmap.txt")
    assert list(colours.values()) == ["background", "sky", "cat", "dog", "tree"]
    index = {name: i for i, name in enumerate(CLASSES.names)} | {"background": 255}
    assert (out / "ImageSets" / "Segmentation" / "default.txt").read_text().splitlines() == list(masks())
    for key, m in masks().items():
        with Image.open(out / "SegmentationClass" / f"{key}.png") as image:
            assert image.mode == "RGB"
            rgb = np.asarray(image)
        back = np.vectorize(lambda r, g, b: index[colours[(r, g, b)]])(rgb[..., 0], rgb[..., 1], rgb[..., 2])
        assert (back == m).all()  # 255 came back as background, everything else as its class
    import zipfile

    with zipfile.ZipFile(tmp_path / "cvat.zip") as z:
        names = set(z.namelist())
        assert names == {"labelmap.txt", "ImageSets/Segmentation/default.txt"} | {
            f"SegmentationClass/{k}.png" for k in masks()
        }
        assert z.read("SegmentationClass/b.png") == (out / "SegmentationClass" / "b.png").read_bytes()


def test_cvat_voc_background_is_the_black_class():
    text, lut = cvat_labelmap(bundled("voc2012"))
    lines = text.splitlines()
    assert lines[1] == "background:0,0,0::" and len(lines) == 1 + 21 + 1  # no second background line
    # black is a class here, so unsure pixels get a label of their own (VOC's void colour)
    assert lines[-1] == "unlabeled:224,224,192::" and lut[255].tolist() == [224, 224, 192]
    assert lut[15].tolist() == list(bundled("voc2012").colors[15])


@pytest.mark.parametrize(
    "names, colors, words",
    [
        (("a", "b"), ((1, 2, 3), (1, 2, 3)), "share the colour 1,2,3"),
        (("road", "sky"), ((0, 0, 0), (1, 1, 1)), "'road' has colour 0,0,0"),
        (("background", "sky"), ((9, 9, 9), (1, 1, 1)), "CVAT's background is 0,0,0"),
        (("a:b", "sky"), ((5, 5, 5), (1, 1, 1)), "rename it"),
    ],
)
def test_cvat_class_maps_it_cannot_import(names, colors, words):
    with pytest.raises(DinosegError, match=words):
        cvat_labelmap(ClassMap(names, colors))


def test_cvat_bundled_ade20k_shares_a_colour():
    with pytest.raises(DinosegError, match="'road' and 'skyscraper' share the colour 140,140,140"):
        cvat_labelmap(bundled("ade20k"))


def test_cvat_wide_class_maps_are_fine(tmp_path):
    wide = ClassMap(tuple(f"c{i}" for i in range(300)), tuple(default_color(i + 1) for i in range(300)))
    exporter = make_exporter("cvat", str(tmp_path / "w"), wide)
    exporter.begin()
    m = np.array([[299, 65535, 0]], dtype=np.uint16)  # past 255 classes the ignore index is 65535
    exporter.add(exporter.encode(ExportItem("k", "k", m)))
    exporter.finish()
    rgb = np.asarray(Image.open(tmp_path / "w" / "SegmentationClass" / "k.png"))
    assert rgb.tolist() == [[list(default_color(300)), [0, 0, 0], list(default_color(1))]]


# --- Label Studio ------------------------------------------------------------------------------


def test_labelstudio_round_trip(tmp_path):
    out = tmp_path / "ls"
    export("labelstudio", out, from_name="brush", to_name="img", model_version="v7")
    tasks = json.loads((out / "tasks.json").read_text())
    assert [t["data"]["key"] for t in tasks] == list(masks())
    for task, (key, m) in zip(tasks, masks().items(), strict=True):
        assert task["data"]["image"] == f"s3://bucket/img/{key}.jpg"
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == "v7"
        results = prediction["result"]
        assert sorted(r["value"]["brushlabels"][0] for r in results) == sorted(
            CLASSES.names[c] for c in set(np.unique(m).tolist()) - {255}
        )
        for r in results:
            assert (r["from_name"], r["to_name"], r["type"], r["value"]["format"]) == (
                "brush",
                "img",
                "brushlabels",
                "rle",
            )
            assert (r["original_height"], r["original_width"], r["image_rotation"]) == (*m.shape, 0)
            c = CLASSES.names.index(r["value"]["brushlabels"][0])
            assert (ls_mask(r["value"]["rle"], *m.shape) == (m == c)).all()
        assert len({r["id"] for r in results}) == len(results)
    config = ET.fromstring((out / "labeling_config.xml").read_text())
    brush = config.find("BrushLabels")
    assert brush.get("name") == "brush" and brush.get("toName") == "img" and config.find("Image").get("name") == "img"
    assert [(lb.get("value"), lb.get("background")) for lb in brush] == [
        ("sky", "#4682b4"),
        ("cat", "#ff0000"),
        ("dog", "#00ff00"),
        ("tree", "#0000ff"),
    ]


def test_labelstudio_config_escapes_names():
    text = labelstudio_config(ClassMap(('a "b" <c>',), ((1, 2, 3),)))
    assert ET.fromstring(text).find("BrushLabels")[0].get("value") == 'a "b" <c>'


def test_unknown_format_and_abort_leaves_nothing(tmp_path):
    with pytest.raises(DinosegError, match="unknown format 'yolo'"):
        make_exporter("yolo", str(tmp_path), CLASSES)
    exporter = make_exporter("coco", str(tmp_path / "o"), CLASSES)
    exporter.begin()
    exporter.add(exporter.encode(ExportItem("k", "k", np.zeros((2, 2), dtype=np.uint8))))
    exporter.abort()
    assert list((tmp_path / "o").iterdir()) == []
