"""`segment --masks parquet` end to end on a real local Ray: the write tasks publish predictions/
themselves, so the driver's result tables carry keys and errors only (never a mask's bytes); every
key has one row, the parts are as big as DINOSEG_PART_ROWS says, a re-run resumes past them, and
Hugging Face `datasets` loads them with `mask_png` decoded as an image."""
# ruff: noqa: F811  (head_file: test_segment's module fixture, taken as an argument)

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_segment import SMALL, head_file, jpeg  # noqa: F401  (head_file: the module's fixture)

from pipeline import runtime
from pipeline.segment.publish import ACCOUNT_SCHEMA

SIZES = {f"img{i}": (24 + 4 * i, 20 + 2 * i) for i in range(5)}


def seen_by_the_driver(monkeypatch) -> list:
    """The schemas of the result tables the driver's loop is handed."""
    schemas, iter_results = [], runtime.iter_results

    def recorded(ds, *args, **kwargs):
        for table in iter_results(ds, *args, **kwargs):
            schemas.append(table.schema)
            yield table

    monkeypatch.setattr(runtime, "iter_results", recorded)
    return schemas


@pytest.mark.slow  # a real Ray
def test_parquet_masks_are_published_by_the_tasks_and_load_as_images(ray_local, tmp_path, head_file, monkeypatch):
    from PIL import Image

    from pipeline.segment import SegmentConfig, run_segment

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i, (key, (w, h)) in enumerate(SIZES.items()):
        (src / f"{key}.jpg").write_bytes(jpeg(w, h, seed=i))
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    monkeypatch.setenv("DINOSEG_PART_ROWS", "2")
    schemas = seen_by_the_driver(monkeypatch)
    config = SegmentConfig(str(src), str(out), model=None, head=head_file, masks="parquet", **SMALL)
    counts = run_segment(config)
    assert counts == {"inputs": 6, "predicted": 5, "skipped": 0, "failed": 1}
    assert schemas and all(s.names == ACCOUNT_SCHEMA.names for s in schemas)  # no mask, no prediction payload

    parts = sorted((out / "predictions").glob("*.parquet"))
    tables = [pq.read_table(p) for p in parts]
    # 6 inputs in publish batches of exactly 2 rows, each batch one part (without its failed row)
    assert len(parts) == 3 and sorted(len(t) for t in tables) == [1, 2, 2]
    rows = [r for t in tables for r in t.to_pylist()]
    assert sorted(r["key"] for r in rows) == sorted(SIZES)  # each key once
    digest = json.loads((out / "run.json").read_text())["identity_digest"]
    assert {r["identity"] for r in rows} == {digest} and all(r["mask"] == "" for r in rows)
    assert not (out / "masks").exists()
    assert [r["key"] for r in pq.read_table(list((out / "errors").glob("*.parquet"))).to_pylist()] == ["broken"]

    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset(
        "parquet", data_files=str(out / "predictions" / "*.parquet"), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert isinstance(loaded.features["mask_png"], datasets.Image)
    for row in loaded:
        image = row["mask_png"]
        assert isinstance(image, Image.Image) and image.size == SIZES[row["key"]]
        counts_of = np.bincount(np.asarray(image).ravel(), minlength=len(row["class_counts"]))
        assert counts_of[: len(row["class_counts"])].tolist() == row["class_counts"]

    again = run_segment(config)  # resume: every key has its row
    assert again == {"inputs": 6, "predicted": 0, "skipped": 5, "failed": 1}
    assert sorted((out / "predictions").glob("*.parquet")) == parts
