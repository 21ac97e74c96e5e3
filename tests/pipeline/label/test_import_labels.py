"""`dinoseg import`: our own exports of each format come back as the masks they were made from;
files written the way each tool writes them (COCO polygons and RLEs, CVAT colour PNGs, Label
Studio's annotations with literal-chunk brush RLEs, polygons and rectangles) import to the masks
they describe; the rules (overlaps, crowds, which annotation, keys, empty images) are pinned;
and bad input is one sentence with OUTPUT untouched. No Ray."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from label_samples import CLASSES, masks, write_segmented
from PIL import Image

from jobs.options import main
from model.classes import ClassMap, load_class_map, save_class_map
from model.errors import DinosegError
from pipeline.io.brush_rle import brush_mask, brush_rle, unpack_rle
from pipeline.io.masks import decode_mask_png, encode_mask_png
from pipeline.io.rle import rle_encode
from pipeline.label import ExportConfig, ImportConfig, run_export, run_import


@pytest.fixture
def segmented(tmp_path) -> Path:
    return write_segmented(tmp_path)


def read_set(out: Path) -> dict[str, np.ndarray]:
    with open(out / "pairs.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        assert Path(r["image"]).is_file(), r
    return {r["key"]: decode_mask_png((out / r["mask"]).read_bytes()) for r in rows}


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].shape == want[key].shape, key
        assert (got[key] == want[key]).all(), key


@pytest.mark.parametrize(
    "fmt,path", [("coco", "annotations.json"), ("cvat", ""), ("cvat", ".zip"), ("labelstudio", "tasks.json")]
)
def test_our_exports_round_trip(segmented, tmp_path, fmt, path):
    export = tmp_path / f"export-{fmt}"
    run_export(ExportConfig(str(segmented), str(export), fmt, zip=True))
    source = Path(str(export) + path) if path == ".zip" else export / path
    out = tmp_path / "imported"
    result = run_import(
        ImportConfig(
            str(source),
            str(out),
            fmt,
            classes=str(segmented / "classes.yaml"),
            images=str(tmp_path / "images"),
            predictions=True,  # our Label Studio export holds predictions, not annotations
        )
    )
    assert result["counts"] == {"seen": 3, "imported": 3, "with_problems": 0}
    assert_same(read_set(out), masks())
    assert load_class_map(str(out / "classes.yaml")) == CLASSES
    assert (out / "problems.jsonl").read_text() == ""
    assert json.loads((out / "import.json").read_text())["counts"]["imported"] == 3


def test_import_through_main_prints_the_summary(segmented, tmp_path, capsys):
    run_export(ExportConfig(str(segmented), str(tmp_path / "ls"), "labelstudio"))
    args = [str(tmp_path / "ls" / "tasks.json"), str(tmp_path / "out"), "--format", "labelstudio"]
    assert main("jobs.import_labels", args + ["--images", str(tmp_path / "images")]) == 2  # predictions only
    assert "--predictions imports them" in capsys.readouterr().err
    assert main("jobs.import_labels", args + ["--images", str(tmp_path / "images"), "--predictions"]) == 0
    printed = capsys.readouterr().out
    assert "imported" in printed and "3" in printed and "pairs.csv" in printed
    assert not (tmp_path / "out" / "masks" / "city" / "a.png").with_suffix(".tmp").exists()


def test_the_set_trains(segmented, tmp_path):
    """train's manifest reader takes pairs.csv as it is: keys from its key column, masks relative."""
    from pipeline.data.pairs import list_pairs

    run_export(ExportConfig(str(segmented), str(tmp_path / "coco"), "coco"))
    run_import(
        ImportConfig(
            str(tmp_path / "coco" / "annotations.json"),
            str(tmp_path / "set"),
            "coco",
            classes=str(segmented / "classes.yaml"),
        )
    )
    pairs = list_pairs(str(tmp_path / "set" / "pairs.csv"))
    assert pairs.keys == sorted(masks()) and not pairs.problems
    assert all(Path(m).is_file() for m in pairs.masks) and all(Path(i).is_file() for i in pairs.images)


# ---- COCO as other tools write it -----------------------------------------------------------


def coco_file(tmp_path, annotations, images=None, categories=None) -> Path:
    doc = {
        "images": images or [{"id": 1, "file_name": "x/one.jpg", "width": 8, "height": 6}],
        "categories": categories or [{"id": 1, "name": "road"}, {"id": 2, "name": "car"}, {"id": 3, "name": "person"}],
        "annotations": annotations,
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(doc))
    (tmp_path / "imgs" / "x").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6)).save(tmp_path / "imgs" / "x" / "one.jpg")
    return path


def coco_import(tmp_path, path, **options) -> tuple[dict, np.ndarray | None]:
    out = tmp_path / "out"
    result = run_import(
        ImportConfig(str(path), str(out), "coco", images=str(tmp_path / "imgs"), overwrite=True, **options)
    )
    found = read_set(out) if (out / "pairs.csv").exists() else {}
    return result, found.get("x/one")


def test_coco_polygons_rles_and_the_overlap_rule(tmp_path):
    big = np.zeros((6, 8), dtype=np.uint8)
    big[:, :6] = 1
    small = np.zeros((6, 8), dtype=np.uint8)
    small[2:4, 4:8] = 1
    column_major = big.ravel(order="F")
    change = np.flatnonzero(np.diff(column_major)) + 1
    runs = np.diff(np.concatenate(([0], change, [column_major.size]))).tolist()  # starts with a 0-run? no: big[0,0]=1
    uncompressed = {"size": [6, 8], "counts": [0, *runs]}
    path = coco_file(
        tmp_path,
        [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": uncompressed, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "segmentation": rle_encode(small), "iscrowd": 0},
            # a triangle over the bottom-left corner, as polygon coordinates
            {"id": 3, "image_id": 1, "category_id": 3, "segmentation": [[0, 6, 0, 4, 2, 6]], "iscrowd": 0},
        ],
    )
    result, got = coco_import(tmp_path, path, classes=None)
    assert result["classes"] == ["road", "car", "person"]  # category-id order without --classes
    assert got[0, 0] == 0 and got[2, 5] == 1 and got[2, 7] == 1 and got[0, 7] == 255  # smaller wins
    from pycocotools import mask as coco_mask

    triangle = coco_mask.decode(coco_mask.frPyObjects([[0, 6, 0, 4, 2, 6]], 6, 8)[0]).astype(bool)
    assert triangle.any() and (got[triangle] == 2).all()
    assert result["counts"]["with_problems"] == 1  # the overlap is reported, with the rule
    problems = [json.loads(line) for line in (tmp_path / "out" / "problems.jsonl").read_text().splitlines()]
    assert "went to the smaller shape" in problems[0]["message"]
    _, unsure = coco_import(tmp_path, path, overlap="unsure")
    assert unsure[2, 5] == 255 and unsure[2, 7] == 1 and unsure[0, 0] == 0


def test_coco_crowds_lie_beneath_or_are_left_out(tmp_path):
    crowd = np.ones((6, 8), dtype=np.uint8)
    person = np.zeros((6, 8), dtype=np.uint8)
    person[1:3, 1:3] = 1
    path = coco_file(
        tmp_path,
        [
            {"id": 1, "image_id": 1, "category_id": 2, "segmentation": rle_encode(person), "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "segmentation": rle_encode(crowd), "iscrowd": 1},
        ],
    )
    result, got = coco_import(tmp_path, path)
    assert got[1, 1] == 1 and got[5, 5] == 2 and result["counts"]["with_problems"] == 0  # no conflict
    _, ignored = coco_import(tmp_path, path, crowd="ignore")
    assert ignored[1, 1] == 1 and ignored[5, 5] == 255


def test_coco_by_id_and_the_problems_of_one_image(tmp_path):
    square = np.zeros((6, 8), dtype=np.uint8)
    square[:3, :3] = 1
    path = coco_file(
        tmp_path,
        [
            {"id": 1, "image_id": 1, "category_id": 2, "segmentation": rle_encode(square)},
            {"id": 2, "image_id": 1, "category_id": 9, "segmentation": rle_encode(square)},  # undeclared
            {"id": 3, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 4, 4]]},  # 2 points: no polygon
            {"id": 4, "image_id": 1, "category_id": 1, "segmentation": {"size": [6, 8], "counts": [3, 4]}},  # short
            {"id": 5, "image_id": 1, "category_id": 4, "segmentation": rle_encode(1 - square)},  # not in the map
        ],
        categories=[{"id": i, "name": n} for i, n in ((1, "road"), (2, "car"), (3, "person"), (4, "sky"))],
    )
    save_class_map(CLASSES, str(tmp_path / "classes.yaml"))
    result, got = coco_import(tmp_path, path, classes=str(tmp_path / "classes.yaml"))
    assert (got[:3, :3] == 1).all() and (got[3:, :] == 255).all()
    message = json.loads((tmp_path / "out" / "problems.jsonl").read_text())["message"]
    for part in ("category 9", "malformed", "label 'sky' is not in the class map"):
        assert part in message, message
    _, by_id = coco_import(tmp_path, path, classes=str(tmp_path / "classes.yaml"), match="id")
    assert (by_id[:3, :3] == 1).all() and by_id[5, 7] == 255  # category 2 = class 1; 4 -> class 3 is not a class
    with pytest.raises(DinosegError, match="--match id .*--classes"):
        coco_import(tmp_path, path, match="id")


def test_coco_images_without_labels_and_twice_named_are_skipped(tmp_path):
    images = [
        {"id": 1, "file_name": "x/one.jpg", "width": 8, "height": 6},
        {"id": 2, "file_name": "x/one.png", "width": 8, "height": 6},  # the same key
        {"id": 3, "file_name": "x/none.jpg", "width": 8, "height": 6},  # nothing drawn
        {"id": 4, "file_name": "missing.jpg", "width": 8, "height": 6},  # no such image
    ]
    full = rle_encode(np.ones((6, 8), dtype=np.uint8))
    path = coco_file(
        tmp_path,
        [{"id": i, "image_id": i, "category_id": 1, "segmentation": full} for i in (1, 2, 4)],
        images=images,
    )
    result, got = coco_import(tmp_path, path)
    assert (got == 0).all()
    assert result["counts"] == {"seen": 4, "imported": 1, "with_problems": 0}
    assert result["skipped"] == {"duplicate key": 1, "not annotated": 1, "no image": 1}
    rows = [json.loads(line) for line in (tmp_path / "out" / "problems.jsonl").read_text().splitlines()]
    assert {r["skip"] for r in rows} == set(result["skipped"]) and all(r["message"] for r in rows)


# ---- CVAT as it writes masks ----------------------------------------------------------------


def test_cvat_colours_background_and_undeclared_colours(tmp_path):
    export = tmp_path / "cvat"
    (export / "SegmentationClass").mkdir(parents=True)
    (export / "labelmap.txt").write_text(
        "# label:color_rgb:parts:actions\nbackground:0,0,0::\nroad:128,64,128::\ncar:0,0,142::\n"
    )
    rgb = np.zeros((4, 5, 3), dtype=np.uint8)
    rgb[0] = (128, 64, 128)
    rgb[1] = (0, 0, 142)
    rgb[2, :2] = (1, 2, 3)  # a colour labelmap.txt does not declare
    Image.fromarray(rgb).save(export / "SegmentationClass" / "one.png")
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (5, 4)).save(tmp_path / "imgs" / "one.jpg")
    out = tmp_path / "out"
    result = run_import(ImportConfig(str(export), str(out), "cvat", images=str(tmp_path / "imgs")))
    assert result["classes"] == ["road", "car"]  # CVAT's background is no class of its own
    got = read_set(out)["one"]
    assert (got[0] == 0).all() and (got[1] == 1).all() and (got[2:] == 255).all()
    assert "colour 1,2,3 is not in labelmap.txt" in (out / "problems.jsonl").read_text()
    voc = ClassMap(("background", "road", "car"), ((0, 0, 0), (128, 64, 128), (0, 0, 142)))
    save_class_map(voc, str(tmp_path / "voc.yaml"))
    run_import(
        ImportConfig(
            str(export),
            str(out),
            "cvat",
            classes=str(tmp_path / "voc.yaml"),
            images=str(tmp_path / "imgs"),
            overwrite=True,
        )
    )
    got = read_set(out)["one"]
    assert (got[0] == 1).all() and (got[3] == 0).all() and (got[2, :2] == 255).all()  # black = 'background'


def test_cvat_palette_masks_and_a_labelmap_without_colours(tmp_path):
    """Datumaro writes palette PNGs and, for labels without colours, VOC's colour map."""
    export = tmp_path / "cvat"
    (export / "SegmentationClass").mkdir(parents=True)
    (export / "JPEGImages").mkdir()
    (export / "labelmap.txt").write_text("background:::\nroad:::\ncar:::\n")
    index = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    im = Image.fromarray(index, mode="L").convert("P")
    im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)  # VOC's colours of 0, 1, 2
    im.save(export / "SegmentationClass" / "p.png")
    Image.new("RGB", (3, 2)).save(export / "JPEGImages" / "p.jpg")  # the export's own images
    zipped = tmp_path / "cvat.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        for f in export.rglob("*"):
            if f.is_file():
                z.write(f, f"task_1/{f.relative_to(export)}")  # zipped with its folder
    result = run_import(ImportConfig(str(zipped), str(tmp_path / "out"), "cvat"))
    got = read_set(tmp_path / "out")["p"]
    assert result["classes"] == ["road", "car"]
    assert (got == np.array([[255, 0, 1], [1, 0, 255]])).all()
    assert (tmp_path / "out" / "images" / "p.jpg").is_file()  # copied out of the archive


def test_cvat_round_trip_keeps_unsure_pixels_apart_from_a_black_background(tmp_path):
    """VOC-like maps: black is the background class, so our export gives unsure pixels the
    'unlabeled' label, and they come back as 255 rather than as background."""
    voc = ClassMap(("background", "road"), ((0, 0, 0), (128, 64, 128)))
    labels = tmp_path / "labels"
    m = np.array([[0, 1, 255], [255, 1, 0]], dtype=np.uint8)
    (labels / "masks").mkdir(parents=True)
    (labels / "masks" / "v.png").write_bytes(encode_mask_png(m, voc))
    save_class_map(voc, str(labels / "classes.yaml"))
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (3, 2)).save(tmp_path / "imgs" / "v.jpg")
    run_export(ExportConfig(str(labels), str(tmp_path / "cvat"), "cvat"))
    derived = run_import(
        ImportConfig(str(tmp_path / "cvat"), str(tmp_path / "o"), "cvat", images=str(tmp_path / "imgs"))
    )
    assert derived["classes"] == ["road"] and derived["counts"]["with_problems"] == 0  # no class for the background
    config = ImportConfig(
        str(tmp_path / "cvat"), str(tmp_path / "o"), "cvat", classes=str(labels / "classes.yaml"), overwrite=True
    )
    config.images = str(tmp_path / "imgs")
    run_import(config)
    assert (read_set(tmp_path / "o")["v"] == m).all()


# ---- Label Studio as it writes exports -------------------------------------------------------


def literal_rle(words: np.ndarray) -> list[int]:
    """thi.ng rle-pack with literal chunks only, as Label Studio's frontend writes colour
    strokes (RGBA words that change every word): written here from the format's description."""
    bits: list[int] = []

    def put(v: int, n: int) -> None:
        bits.extend((v >> (n - 1 - i)) & 1 for i in range(n))

    put(len(words), 32)
    put(7, 5)
    for width in (3, 4, 8, 16):
        put(width - 1, 4)
    for start in range(0, len(words), 1 << 16):
        chunk = words[start : start + (1 << 16)]
        put(0, 1)  # literal
        put(3, 2)  # the 16-bit count
        put(len(chunk) - 1, 16)
        for w in chunk:
            put(int(w), 8)
    bits += [0] * (-len(bits) % 8)
    return np.packbits(np.asarray(bits, dtype=np.uint8)).tolist()


def test_brush_decoder_reads_both_chunk_kinds():
    on = np.zeros((5, 7), dtype=bool)
    on[1:4, 2:6] = True
    assert (brush_mask(brush_rle(on), 5, 7) == on).all()  # repeat chunks (our writer)
    rgba = np.zeros((5, 7, 4), dtype=np.uint8)
    rgba[on] = (220, 20, 60, 255)  # the label's colour, opaque
    rgba[0, 0] = (220, 20, 60, 100)  # a soft edge: under half alpha is off
    assert (brush_mask(literal_rle(rgba.ravel()), 5, 7) == on).all()
    with pytest.raises(ValueError, match="cut short"):
        unpack_rle(brush_rle(on)[:-3])
    with pytest.raises(ValueError, match="words"):
        brush_mask(brush_rle(on), 5, 8)


def ls_result(kind: str, label: str, value: dict, w: int = 10, h: int = 8) -> dict:
    return {
        "type": kind,
        "from_name": "tag",
        "to_name": "image",
        "original_width": w,
        "original_height": h,
        "value": value | {kind: [label]},
    }


def test_labelstudio_annotations_shapes_and_references(tmp_path):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    for name in ("one.jpg", "two.jpg", "three.jpg"):
        Image.new("RGB", (10, 8)).save(uploads / name)
    on = np.zeros((8, 10), dtype=bool)
    on[:4] = True
    rgba = np.zeros((8, 10, 4), dtype=np.uint8)
    rgba[on] = (0, 0, 142, 255)
    brush = ls_result("brushlabels", "car", {"format": "rle", "rle": literal_rle(rgba.ravel())})
    rect = ls_result("rectanglelabels", "person", {"x": 50, "y": 50, "width": 50, "height": 50, "rotation": 0})
    poly = ls_result("polygonlabels", "road", {"points": [[0, 0], [100, 0], [100, 100], [0, 100]]})
    tasks = [
        {  # the latest annotation that was not cancelled wins; its rectangle is drawn over the brush
            "id": 1,
            "data": {"image": "/data/upload/3/1a2b3c4d-one.jpg"},
            "annotations": [
                {"id": 1, "result": [poly], "updated_at": "2026-01-01T10:00:00Z"},
                {"id": 2, "result": [brush, rect], "updated_at": "2026-01-02T10:00:00Z"},
                {"id": 3, "result": [], "was_cancelled": True, "updated_at": "2026-01-03T10:00:00Z"},
            ],
        },
        {  # a ground-truth annotation wins over a later one; a keypoint is reported and left out
            "id": 2,
            "data": {"image": "/data/local-files/?d=two.jpg"},
            "annotations": [
                {"id": 4, "ground_truth": True, "result": [poly, {"type": "keypointlabels", "value": {}}]},
                {"id": 5, "result": [brush], "updated_at": "2027-01-01T00:00:00Z"},
            ],
        },
        {
            "id": 3,
            "data": {"image": "/data/upload/3/three.jpg"},
            "annotations": [],
            "predictions": [{"result": [poly]}],
        },
    ]
    export = tmp_path / "project-3.json"
    export.write_text(json.dumps(tasks))
    save_class_map(CLASSES, str(tmp_path / "classes.yaml"))
    out = tmp_path / "out"
    config = ImportConfig(
        str(export), str(out), "labelstudio", classes=str(tmp_path / "classes.yaml"), images=str(uploads)
    )
    result = run_import(config)
    assert result["counts"]["imported"] == 2 and result["skipped"] == {"not annotated": 1}
    got = read_set(out)
    want = np.full((8, 10), 255, dtype=np.uint8)
    want[:4] = 1
    want[4:, 5:] = 2
    assert (got["one"] == want).all()
    assert (got["two"] == 0).all()
    assert "'keypointlabels' result is not a region" in (out / "problems.jsonl").read_text()
    config.predictions, config.overwrite = True, True
    assert (read_set(out)["three"] == 0).all() if run_import(config)["counts"]["imported"] == 3 else False


# ---- refusals: one sentence, nothing touched ---------------------------------------------------


def imported_set(segmented: Path, tmp_path: Path) -> tuple[str, Path]:
    """(SOURCE, OUTPUT) of a finished import of our COCO export of `segmented`."""
    run_export(ExportConfig(str(segmented), str(tmp_path / "coco"), "coco"))
    source = str(tmp_path / "coco" / "annotations.json")
    run_import(ImportConfig(source, str(tmp_path / "set"), "coco"))
    return source, tmp_path / "set"


def files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_output_is_refused_before_anything_changes(segmented, tmp_path):
    source, out = imported_set(segmented, tmp_path)
    before = files(out)
    with pytest.raises(DinosegError, match="holds a labeled set already.*--overwrite"):
        run_import(ImportConfig(source, str(out), "coco"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DinosegError, match="not valid JSON"):
        run_import(ImportConfig(str(tmp_path / "bad.json"), str(out), "coco", overwrite=True))
    with pytest.raises(DinosegError, match="no labelmap.txt"):
        run_import(ImportConfig(str(tmp_path / "coco"), str(out), "cvat", overwrite=True))  # the wrong --format
    with pytest.raises(DinosegError, match="does not exist"):
        run_import(ImportConfig(str(tmp_path / "nope"), str(out), "coco", overwrite=True))
    with pytest.raises(DinosegError, match="OUTPUT is SOURCE"):
        run_import(ImportConfig(str(tmp_path / "coco"), str(tmp_path / "coco"), "coco", overwrite=True))
    assert files(out) == before


# ---- object storage ------------------------------------------------------------------------------


def test_from_and_to_s3(segmented, tmp_path, s3_bucket):
    """SOURCE a zip in a bucket, images in the bucket, OUTPUT in the bucket: masks, pairs.csv and
    the images' s3:// URLs, read back through train's manifest reader."""
    import fsspec

    from pipeline.data.pairs import list_pairs

    bucket, so = s3_bucket
    fs = fsspec.filesystem("s3", **so)
    for key in masks():
        fs.put_file(str(tmp_path / "images" / f"{key}.jpg"), f"{bucket}/images/{key}.jpg")
    run_export(ExportConfig(str(segmented), str(tmp_path / "cvat"), "cvat", zip=True))
    fs.put_file(str(tmp_path / "cvat.zip"), f"{bucket}/exports/cvat.zip")
    out = f"s3://{bucket}/set"
    config = ImportConfig(
        f"s3://{bucket}/exports/cvat.zip",
        out,
        "cvat",
        classes=str(segmented / "classes.yaml"),
        images=f"s3://{bucket}/images",
        storage_options=so,
    )
    assert run_import(config)["counts"]["imported"] == 3
    pairs = list_pairs(f"{out}/pairs.csv", None, so)
    assert pairs.keys == sorted(masks())
    assert all(i.startswith(f"s3://{bucket}/images/") for i in pairs.images)
    for key, mask in zip(pairs.keys, pairs.masks, strict=True):
        with fs.open(mask, "rb") as f:
            assert (decode_mask_png(f.read()) == masks()[key]).all()
    imported = json.loads(fs.cat(f"{bucket}/set/import.json"))
    assert imported["arguments"]["storage_options"] == sorted(so)  # names, never the secrets
    assert "testing" not in json.dumps(imported)


def test_overwrite_never_touches_another_commands_output_or_the_users_images(segmented, tmp_path):
    run_export(ExportConfig(str(segmented), str(tmp_path / "coco"), "coco"))
    source = str(tmp_path / "coco" / "annotations.json")
    with pytest.raises(DinosegError, match="output of another command"):
        run_import(ImportConfig(source, str(segmented), "coco", overwrite=True))  # a segment OUTPUT
    assert len(list((segmented / "masks").rglob("*.png"))) == 3
    out = tmp_path / "set"
    (out / "images").mkdir(parents=True)
    (out / "images" / "mine.jpg").write_bytes(b"the user's own")
    run_import(ImportConfig(source, str(out), "coco"))
    run_import(ImportConfig(source, str(out), "coco", overwrite=True))
    assert (out / "images" / "mine.jpg").read_bytes() == b"the user's own"  # not an import's copy


def test_cvat_coco_zip_with_its_images(tmp_path):
    """CVAT's 'COCO 1.0' export: annotations/instances_default.json and images/ in one zip."""
    square = np.zeros((6, 8), dtype=np.uint8)
    square[1:4, 2:6] = 1
    doc = {
        "images": [{"id": 5, "file_name": "street/one.jpg", "width": 8, "height": 6}],
        "categories": [{"id": 1, "name": "car"}],
        "annotations": [{"id": 1, "image_id": 5, "category_id": 1, "segmentation": rle_encode(square), "iscrowd": 0}],
    }
    image = io.BytesIO()
    Image.new("RGB", (8, 6)).save(image, format="JPEG")
    with zipfile.ZipFile(tmp_path / "task.zip", "w") as z:
        z.writestr("annotations/instances_default.json", json.dumps(doc))
        z.writestr("images/street/one.jpg", image.getvalue())
    result = run_import(ImportConfig(str(tmp_path / "task.zip"), str(tmp_path / "out"), "coco"))
    assert result["classes"] == ["car"] and result["counts"]["imported"] == 1
    got = read_set(tmp_path / "out")["street/one"]
    assert (got == np.where(square == 1, 0, 255)).all()
    assert (tmp_path / "out" / "images" / "street" / "one.jpg").read_bytes() == image.getvalue()


# ---- what a careless or hostile export holds: one problem row each, never the run ----------------


def test_absurd_polygon_coordinates_are_malformed_shapes_not_a_crash(tmp_path):
    """pycocotools allocates by the coordinates' extent: 1e7 took 1.2 GB, 1e8 a segfault."""
    good = [[0, 0, 8, 0, 8, 6, 0, 6]]
    path = coco_file(
        tmp_path,
        [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": good},
            {"id": 2, "image_id": 1, "category_id": 2, "segmentation": [[0, 0, 1e8, 0, 0, 1e8]]},
            {"id": 3, "image_id": 1, "category_id": 2, "segmentation": [[0, 0, float("nan"), 0, 0, 3]]},
            {"id": 4, "image_id": 1, "category_id": 2, "segmentation": [["a", "b", "c", "d", "e", "f"]]},
        ],
    )
    result, got = coco_import(tmp_path, path)
    assert (got == 0).all() and result["counts"]["with_problems"] == 1
    (row,) = [json.loads(line) for line in (tmp_path / "out" / "problems.jsonl").read_text().splitlines()]
    assert len(row["problems"]) == 3 and all("malformed" in p for p in row["problems"])


def test_sizes_follow_exif_and_a_mismatch_is_a_problem_row(tmp_path):
    from PIL.Image import Exif

    exif = Exif()
    exif[0x0112] = 6  # stored 20 wide, 10 high; shown turned: 10 wide, 20 high
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (20, 10)).save(tmp_path / "imgs" / "turned.jpg", exif=exif.tobytes())
    Image.new("RGB", (8, 6)).save(tmp_path / "imgs" / "small.jpg")
    doc = {
        "images": [
            {"id": 1, "file_name": "turned.jpg"},  # no size: from the header, as segment sees it
            {"id": 2, "file_name": "small.jpg", "width": 80, "height": 60},  # drawn on another size
        ],
        "categories": [{"id": 1, "name": "road"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 10, 0, 10, 20, 0, 20]]},
            {"id": 2, "image_id": 2, "category_id": 1, "segmentation": [[0, 0, 8, 0, 8, 6]]},
        ],
    }
    (tmp_path / "c.json").write_text(json.dumps(doc))
    result = run_import(
        ImportConfig(str(tmp_path / "c.json"), str(tmp_path / "out"), "coco", images=str(tmp_path / "imgs"))
    )
    assert read_set(tmp_path / "out")["turned"].shape == (20, 10)
    assert result["skipped"] == {"size mismatch": 1}


def test_an_empty_record_does_not_take_the_key_of_an_annotated_one(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (10, 8)).save(tmp_path / "imgs" / "a.png")
    poly = ls_result("polygonlabels", "road", {"points": [[0, 0], [100, 0], [100, 100]]})
    tasks = [
        {"id": 1, "data": {"image": "/data/upload/1/a.png"}, "annotations": [{"id": 1, "result": []}]},
        {"id": 2, "data": {"image": "/data/upload/1/a.png"}, "annotations": [{"id": 2, "result": [poly]}]},
        {"id": 3, "data": {"image": "http://[::1/a.png"}, "annotations": [{"id": 3, "result": [poly]}]},
        {"id": 4, "data": {"image": "/data/upload/1/b.png"}, "annotations": 5},
    ]
    (tmp_path / "ls.json").write_text(json.dumps(tasks))
    save_class_map(CLASSES, str(tmp_path / "classes.yaml"))
    config = ImportConfig(
        str(tmp_path / "ls.json"), str(tmp_path / "out"), "labelstudio", classes=str(tmp_path / "classes.yaml")
    )
    config.images = str(tmp_path / "imgs")
    result = run_import(config)
    assert result["counts"]["imported"] == 1 and "a" in read_set(tmp_path / "out")
    assert result["skipped"] == {"empty": 1, "bad reference": 1, "not annotated": 1}


def test_malformed_coco_entries_are_problem_rows(tmp_path):
    full = rle_encode(np.ones((6, 8), dtype=np.uint8))
    path = coco_file(
        tmp_path,
        [
            "x",
            {"id": 1, "image_id": [1], "category_id": 1},
            {"id": 2, "image_id": 1, "category_id": [1]},
            {"id": 3, "image_id": 1, "category_id": 1, "segmentation": full},
            {"id": 4, "image_id": 1, "category_id": 1, "segmentation": {"size": [6, 8], "counts": 7}},
        ],
        images=[{"id": 1, "file_name": "x/one.jpg", "width": 8, "height": 6, "dinoseg_key": 5}, "not an image"],
    )
    result, got = coco_import(tmp_path, path)
    assert (got == 0).all() and result["skipped"] == {"malformed": 1}
    assert "category [1]" in (tmp_path / "out" / "problems.jsonl").read_text()


def test_duplicate_category_names_need_a_class_map(tmp_path):
    path = coco_file(tmp_path, [], categories=[{"id": 1, "name": "cat"}, {"id": 2, "name": "cat"}])
    with pytest.raises(DinosegError, match=r"\['cat'\] more than once.*--classes"):
        coco_import(tmp_path, path)


def test_crowds_clashing_beneath_a_shape_are_not_unsure_there(tmp_path):
    left, right, person = (np.zeros((6, 8), dtype=np.uint8) for _ in range(3))
    left[:, :5], right[:, 3:], person[:, 2:6] = 1, 1, 1
    path = coco_file(
        tmp_path,
        [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": rle_encode(left), "iscrowd": 1},
            {"id": 2, "image_id": 1, "category_id": 2, "segmentation": rle_encode(right), "iscrowd": 1},
            {"id": 3, "image_id": 1, "category_id": 3, "segmentation": rle_encode(person), "iscrowd": 0},
        ],
    )
    _, got = coco_import(tmp_path, path, overlap="unsure")
    assert (got[:, 2:6] == 2).all()  # the person, over both crowds
    assert (got[:, :2] == 0).all() and (got[:, 6:] == 1).all()


def test_a_failed_overwrite_keeps_the_earlier_set_and_a_zip_never_writes_into_the_users_images(segmented, tmp_path):
    source, out = imported_set(segmented, tmp_path)
    before = files(out)
    other = ClassMap(("sky",), ((1, 2, 3),))
    save_class_map(other, str(tmp_path / "other.yaml"))
    with pytest.raises(DinosegError, match="none of the 3 images"):
        run_import(ImportConfig(source, str(out), "coco", classes=str(tmp_path / "other.yaml"), overwrite=True))
    assert files(out) == before
    export = tmp_path / "cvat"
    (export / "SegmentationClass").mkdir(parents=True)
    (export / "JPEGImages").mkdir()
    (export / "labelmap.txt").write_text("road:128,64,128::\n")
    Image.fromarray(np.full((2, 3, 3), (128, 64, 128), dtype=np.uint8)).save(export / "SegmentationClass" / "a.png")
    Image.new("RGB", (3, 2)).save(export / "JPEGImages" / "a.jpg")
    with zipfile.ZipFile(tmp_path / "cvat.zip", "w") as z:
        for f in export.rglob("*"):
            z.write(f, str(f.relative_to(export)))
    users = tmp_path / "users"
    (users / "images").mkdir(parents=True)
    (users / "images" / "a.jpg").write_bytes(b"the user's own photo")
    with pytest.raises(DinosegError, match="images' exists"):
        run_import(ImportConfig(str(tmp_path / "cvat.zip"), str(users), "cvat"))
    assert (users / "images" / "a.jpg").read_bytes() == b"the user's own photo"
