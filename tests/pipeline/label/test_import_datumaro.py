"""CVAT's format as the library CVAT itself uses writes and reads it: Datumaro (installed into an
environment of its own, tests/side_venv.py) writes "Segmentation mask 1.1" that `dinoseg import`
reads back to the same masks, and reads our `export --format cvat` with the right labels."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import side_venv
from PIL import Image

from model.classes import ClassMap, save_class_map
from pipeline.io.masks import decode_mask_png, encode_mask_png
from pipeline.label import ExportConfig, ImportConfig, run_export, run_import

DATUMARO_VERSION = "1.13.12"
# a background class, as CVAT's label maps have one (VOC); 255 (unsure) exports as it, too
CLASSES = ClassMap(("background", "road", "car", "person"), ((0, 0, 0), (128, 64, 128), (0, 0, 142), (220, 20, 60)))

WRITE = """
import json, sys, numpy as np, datumaro as dm
from datumaro.components.annotation import AnnotationType, LabelCategories, Mask, MaskCategories
spec = json.load(open(sys.argv[1]))
names = [n for n, _ in spec["labels"]]
categories = {
    AnnotationType.label: LabelCategories.from_iterable(names),
    AnnotationType.mask: MaskCategories(colormap={i: tuple(c) for i, (_, c) in enumerate(spec["labels"])}),
}
items = []
for key, path in spec["masks"].items():
    m = np.load(path)
    items.append(dm.DatasetItem(id=key, subset="default",
        annotations=[Mask(image=(m == c), label=int(c)) for c in np.unique(m) if c != 0]))
dm.Dataset.from_iterable(items, categories=categories).export(spec["out"], "voc_segmentation", label_map="source")
"""

READ = """
import json, sys, numpy as np, datumaro as dm
from datumaro.components.annotation import AnnotationType
src, out = sys.argv[1], sys.argv[2]
ds = dm.Dataset.import_from(src, "voc_segmentation")
names = [c.name for c in ds.categories()[AnnotationType.label]]
found = {}
for item in ds:
    masks = [a for a in item.annotations if a.type == AnnotationType.mask]
    h, w = masks[0].image.shape
    index = np.full((h, w), -1)
    for a in masks:
        index[a.image.astype(bool)] = a.label
    found[item.id] = [[names[v] if v >= 0 else None for v in row] for row in index.tolist()]
json.dump({"labels": names, "items": found}, open(out, "w"))
"""


@pytest.fixture(scope="module")
def datumaro(tmp_path_factory):
    try:
        python = side_venv.ensure("datumaro", "datumaro", DATUMARO_VERSION)
    except side_venv.Unavailable as e:
        pytest.fail(str(e), pytrace=False)
    folder = tmp_path_factory.mktemp("datumaro-scripts")
    (folder / "write.py").write_text(WRITE)
    (folder / "read.py").write_text(READ)

    def run(script: str, *args: str) -> None:
        done = subprocess.run([str(python), str(folder / script), *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    return run


def label_masks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    a = rng.integers(0, 4, (7, 9)).astype(np.uint8)
    b = np.zeros((5, 4), dtype=np.uint8)
    b[1:4, 1:3] = 3
    return {"street/a": a, "b": b}


@pytest.mark.slow
def test_datumaro_written_cvat_imports_to_the_same_masks(datumaro, tmp_path):
    spec = {"labels": [[n, list(c)] for n, c in zip(CLASSES.names, CLASSES.colors, strict=True)], "masks": {}}
    images = tmp_path / "images"
    for key, m in label_masks().items():
        np.save(tmp_path / f"{key.replace('/', '_')}.npy", m)
        spec["masks"][key] = str(tmp_path / f"{key.replace('/', '_')}.npy")
        (images / key).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", m.shape[::-1]).save(images / f"{key}.jpg")
    spec["out"] = str(tmp_path / "cvat")
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    datumaro("write.py", str(tmp_path / "spec.json"))
    save_class_map(CLASSES, str(tmp_path / "classes.yaml"))
    out = tmp_path / "set"
    result = run_import(
        ImportConfig(
            str(tmp_path / "cvat"), str(out), "cvat", classes=str(tmp_path / "classes.yaml"), images=str(images)
        )
    )
    assert result["counts"] == {"seen": 2, "imported": 2, "with_problems": 0}
    for key, m in label_masks().items():
        assert (decode_mask_png((out / "masks" / f"{key}.png").read_bytes()) == m).all(), key


@pytest.mark.slow
def test_datumaro_reads_our_cvat_export_with_the_right_labels(datumaro, tmp_path):
    labels = tmp_path / "labels"
    for key, m in label_masks().items():
        m = m.copy()
        m[0, 0] = 255  # unsure: black is a class here, so unsure pixels are the 'unlabeled' label
        (labels / "masks" / key).parent.mkdir(parents=True, exist_ok=True)
        (labels / "masks" / f"{key}.png").write_bytes(encode_mask_png(m, CLASSES))
    save_class_map(CLASSES, str(labels / "classes.yaml"))
    run_export(ExportConfig(str(labels), str(tmp_path / "cvat"), "cvat"))
    datumaro("read.py", str(tmp_path / "cvat"), str(tmp_path / "read.json"))
    read = json.loads((tmp_path / "read.json").read_text())
    assert read["labels"] == [*CLASSES.names, "unlabeled"]
    for key, m in label_masks().items():
        want = [[CLASSES.names[v] for v in row] for row in m.tolist()]
        want[0][0] = "unlabeled"
        got = [[v or "background" for v in row] for row in read["items"][key]]
        assert got == want, key
