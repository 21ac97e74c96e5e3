"""`export` on a LABELS folder built here (masks, classes.yaml, a predictions Parquet): the three
formats end to end through `main`, image references, bad masks counted and skipped, and the
one-sentence errors. No Ray."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.options import main
from model.classes import ClassMap, save_class_map
from model.errors import DinosegError
from pipeline.io.masks import encode_mask_png
from pipeline.label import ExportConfig, run_export

CLASSES = ClassMap(("road", "car", "person"), ((128, 64, 128), (0, 0, 142), (220, 20, 60)))


def good_masks() -> dict[str, np.ndarray]:
    a = np.zeros((9, 11), dtype=np.uint8)
    a[2:5, 3:8] = 1
    a[6:, :4] = 255
    b = np.full((4, 3), 2, dtype=np.uint8)
    b[0, 0] = 0
    return {"city/a": a, "b": b}


@pytest.fixture
def labels(tmp_path) -> Path:
    """A segment-like OUTPUT: two good masks, a corrupt one, one with a value outside the map."""
    root = tmp_path / "labels"
    for key, m in good_masks().items():
        (root / "masks" / key).parent.mkdir(parents=True, exist_ok=True)
        (root / "masks" / f"{key}.png").write_bytes(encode_mask_png(m, CLASSES))
    (root / "masks" / "broken.png").write_bytes(b"\x89PNG truncated")
    (root / "masks" / "stray.png").write_bytes(encode_mask_png(np.array([[0, 7]], dtype=np.uint8), CLASSES))
    save_class_map(CLASSES, str(root / "classes.yaml"))
    (root / "predictions").mkdir()
    rows = {
        "path": ["s3://in/city/a.jpg", "s3://in/b.png", "s3://in/stray.jpg"],
        "key": ["city/a", "b", "stray"],
        "width": [11, 3, 2],
        "height": [9, 4, 1],
        "mean_confidence": [0.9, 0.8, 0.7],  # a column export does not read
    }
    pq.write_table(pa.table(rows), root / "predictions" / "part-0.parquet")
    return root


@pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")  # pycocotools vs numpy 2's copy keyword
def test_coco_through_main(labels, tmp_path, capsys):
    from pycocotools import mask as mask_utils

    out = tmp_path / "coco"
    assert main("jobs.export", [str(labels), str(out), "--format", "coco"]) == 0
    printed = capsys.readouterr().out
    assert "exported           2" in printed and "failed             2" in printed and "broken" in printed
    data = json.loads((out / "annotations.json").read_text())
    images = {img["dinoseg_key"]: img for img in data["images"]}
    assert set(images) == {"city/a", "b"}
    assert images["city/a"]["file_name"] == "s3://in/city/a.jpg"  # from the predictions Parquet
    for key, m in good_masks().items():
        anns = [a for a in data["annotations"] if a["image_id"] == images[key]["id"]]
        assert sorted(a["category_id"] for a in anns) == sorted(c + 1 for c in set(np.unique(m).tolist()) - {255})
        for a in anns:
            assert (mask_utils.decode(a["segmentation"]) == (m == a["category_id"] - 1)).all()


def test_run_counts_and_examples(labels, tmp_path):
    result = run_export(ExportConfig(str(labels), str(tmp_path / "o"), "labelstudio"))
    assert result["counts"] == {"masks": 4, "exported": 2, "failed": 2}
    assert result["unnamed"] == 0
    assert any("broken" in e and "cannot be decoded" in e for e in result["examples"])
    assert any(e.startswith("stray: values [7]") for e in result["examples"])
    tasks = json.loads((tmp_path / "o" / "tasks.json").read_text())
    assert [t["data"]["image"] for t in tasks] == ["s3://in/b.png", "s3://in/city/a.jpg"]
    assert (tmp_path / "o" / "labeling_config.xml").is_file()


def test_cvat_through_main_with_zip(labels, tmp_path):
    out = tmp_path / "cvat"
    assert main("jobs.export", [str(labels), str(out), "--format", "cvat", "--zip"]) == 0
    colours = {}
    for line in (out / "labelmap.txt").read_text().splitlines()[1:]:
        name, rgb, _, _ = line.split(":")
        colours[tuple(map(int, rgb.split(",")))] = name
    index = {n: i for i, n in enumerate(CLASSES.names)} | {"background": 255}
    for key, m in good_masks().items():
        rgb = np.asarray(Image.open(out / "SegmentationClass" / f"{key}.png"))
        back = np.array([[index[colours[tuple(p)]] for p in row] for row in rgb.tolist()])
        assert (back == m).all()
    assert sorted((out / "ImageSets" / "Segmentation" / "default.txt").read_text().split()) == ["b", "city/a"]
    with zipfile.ZipFile(tmp_path / "cvat.zip") as z:
        assert sorted(z.namelist()) == sorted(
            [
                "labelmap.txt",
                "ImageSets/Segmentation/default.txt",
                "SegmentationClass/b.png",
                "SegmentationClass/city/a.png",
            ]
        )


def test_images_option_pairs_by_key_and_masks_folder_without_masks_subfolder(labels, tmp_path):
    images = tmp_path / "photos"
    (images / "city").mkdir(parents=True)
    (images / "city" / "a.webp").write_bytes(b"")
    bare = labels / "masks"  # LABELS given as the mask folder itself: no classes.yaml there
    result = run_export(
        ExportConfig(str(bare), str(tmp_path / "o"), "coco", classes=str(labels / "classes.yaml"), images=str(images))
    )
    data = json.loads((tmp_path / "o" / "annotations.json").read_text())
    names = {img["dinoseg_key"]: img["file_name"] for img in data["images"]}
    assert names == {"city/a": str(images / "city" / "a.webp"), "b": "b"}  # no image for 'b': its key
    assert result["unnamed"] == 1


def test_size_mismatch_with_the_image_is_a_failure(labels, tmp_path):
    rows = {"path": ["s3://in/b.png"], "key": ["b"], "width": [30], "height": [40]}
    pq.write_table(pa.table(rows), labels / "predictions" / "part-1.parquet")
    result = run_export(ExportConfig(str(labels), str(tmp_path / "o"), "coco"))
    assert result["counts"]["failed"] == 3
    assert any(e.startswith("b: the mask is 3x4 but its image is 30x40") for e in result["examples"])


def test_missing_labels_is_one_sentence(tmp_path, capsys):
    assert main("jobs.export", [str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is not a folder" in err and "Traceback" not in err


def test_no_classes_says_pass_classes(labels, tmp_path):
    (labels / "classes.yaml").unlink()
    with pytest.raises(DinosegError, match="pass --classes"):
        run_export(ExportConfig(str(labels), str(tmp_path / "o"), "coco"))
    assert (
        run_export(ExportConfig(str(labels), str(tmp_path / "o"), "coco", classes="voc2012"))["counts"]["exported"] == 3
    )  # 7 is a VOC class


def test_nothing_exportable_writes_nothing(tmp_path):
    root = tmp_path / "labels"
    (root / "masks").mkdir(parents=True)
    (root / "masks" / "x.png").write_bytes(b"not a png")
    save_class_map(CLASSES, str(root / "classes.yaml"))
    with pytest.raises(DinosegError, match="none of the 1 masks"):
        run_export(ExportConfig(str(root), str(tmp_path / "o"), "labelstudio"))
    assert list((tmp_path / "o").iterdir()) == []  # the staging folder is gone too


def test_cvat_rejects_a_class_map_it_cannot_import(labels, tmp_path, capsys):
    clash = ClassMap(("road", "car"), ((1, 1, 1), (1, 1, 1)))
    save_class_map(clash, str(labels / "clash.yaml"))
    assert (
        main(
            "jobs.export",
            [str(labels), str(tmp_path / "o"), "--format", "cvat", "--classes", str(labels / "clash.yaml")],
        )
        == 2
    )
    assert "share the colour 1,1,1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # checked before any mask is read


def test_unknown_format(labels, tmp_path, capsys):
    assert main("jobs.export", [str(labels), str(tmp_path / "o"), "--format", "yolo"]) == 2
    assert "unknown format 'yolo'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "fmt, files",
    [
        ("coco", ["annotations.json"]),
        (
            "cvat",
            [
                "labelmap.txt",
                "ImageSets/Segmentation/default.txt",
                "SegmentationClass/b.png",
                "SegmentationClass/city/a.png",
            ],
        ),
        ("labelstudio", ["tasks.json", "labeling_config.xml"]),
    ],
)
def test_remote_output_is_uploaded(labels, fmt, files):
    import fsspec

    out = f"memory://export-test/{fmt}"
    result = run_export(ExportConfig(str(labels), out, fmt, zip=True))
    fs = fsspec.filesystem("memory")
    assert sorted(fs.find(f"/export-test/{fmt}")) == sorted(f"/export-test/{fmt}/{f}" for f in files)
    assert result["counts"]["exported"] == 2
    if fmt == "coco":
        assert len(json.loads(fs.cat_file(f"/export-test/{fmt}/annotations.json"))["images"]) == 2
    if fmt == "cvat":
        with zipfile.ZipFile(fs.open(f"/export-test/{fmt}.zip")) as z:
            assert len(z.namelist()) == len(files)
    fs.rm("/export-test", recursive=True)
