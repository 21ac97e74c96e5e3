"""The write step, WriteMasks: PNG/Parquet/RLE/overlay/confidence outputs, rows in the declared
schemas, failures as write errors, on local disk and a loopback S3; the summary table. No Ray."""

from __future__ import annotations

import io

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from model.classes import bundled
from model.errors import DinosegError
from pipeline.data.schema import ERROR_SCHEMA, MASK_PNG_FIELD, PREDICTION_SCHEMA, RLE_FIELD, empty_errors, object_array
from pipeline.io.masks import decode_mask_png, existing_keys, overlay_url
from pipeline.io.rle import rle_decode
from pipeline.segment.write import (
    ERROR_COLUMNS,
    WriteConfig,
    WriteMasks,
    prediction_columns,
    summary_table,
    write_schema,
)

VOC = bundled("voc2012")


def blobs(h: int, w: int, n_classes: int, seed: int = 0, cell: int = 8) -> np.ndarray:
    """A segmentation-like mask: constant cells of random classes."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, n_classes, (h // cell + 1, w // cell + 1))
    return low.repeat(cell, 0).repeat(cell, 1)[:h, :w].astype(np.uint8 if n_classes <= 256 else np.uint16)


def make_batch(
    masks: list[np.ndarray], keys: list[str], images: list[np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """A predict-stage batch, as schema.py describes it."""
    n = len(masks)
    return {
        "path": np.array([f"in/{k}.jpg" for k in keys], dtype=object),
        "key": np.array(keys, dtype=object),
        "width": np.array([m.shape[1] if m.ndim == 2 else 0 for m in masks], dtype=np.int32),
        "height": np.array([m.shape[0] if m.ndim == 2 else 0 for m in masks], dtype=np.int32),
        "mask": object_array(masks),
        "class_counts": object_array(
            np.bincount(m.astype(np.int64).ravel(), minlength=len(VOC))[: len(VOC)].astype(np.int64) for m in masks
        ),
        "mean_confidence": np.linspace(0.5, 0.9, n).astype(np.float32),
        **({"image": object_array(images)} if images is not None else {}),
        **empty_errors(n),
    }


def fail_earlier(batch: dict, i: int) -> None:
    batch["mask"][i] = np.zeros((0, 0), np.uint8)
    batch["class_counts"][i] = np.zeros(0, np.int64)
    batch["mean_confidence"][i] = np.nan
    batch["error_stage"][i], batch["error_type"][i], batch["error_message"][i] = (
        "decode",
        "UnidentifiedImageError",
        "not an image",
    )


def rows(table: pa.Table) -> dict[str, dict]:
    return {r["key"]: r for r in table.to_pylist()}


def test_write_config_checks_masks_option_and_makes_local_output_absolute(tmp_path, monkeypatch):
    with pytest.raises(DinosegError, match="masks"):
        WriteConfig("out", VOC, masks="tiff")
    monkeypatch.chdir(tmp_path)
    assert WriteConfig("out", VOC).output == str(tmp_path / "out")
    assert WriteConfig("s3://b/out", VOC).output == "s3://b/out"


@pytest.mark.parametrize("threads", [1, 4])
def test_write_png_masks_and_pass_earlier_failures_through(tmp_path, threads):
    masks = [blobs(30, 40, 21, seed=s) for s in range(3)] + [np.zeros(0, np.uint8)]
    batch = make_batch(masks, ["a", "sub/b", "sub/deep/c", "broken"])
    fail_earlier(batch, 3)
    cfg = WriteConfig(
        str(tmp_path / "out"), VOC, model_id="dinov2_vits14_voc2012_linear", head_checksum="abc", io_threads=threads
    )
    table = WriteMasks(cfg)(batch)
    assert (
        table.schema == write_schema(cfg) and "mask_png" not in table.schema.names and "rle" not in table.schema.names
    )
    got = rows(table)
    for key, mask in zip(["a", "sub/b", "sub/deep/c"], masks[:3], strict=True):
        r = got[key]
        assert r["ok"] and r["stage"] == r["error_type"] == r["message"] == ""
        assert r["mask"] == str(tmp_path / "out" / "masks" / f"{key}.png")
        assert np.array_equal(decode_mask_png(open(r["mask"], "rb").read()), mask)
        assert r["class_counts"] == np.bincount(mask.ravel(), minlength=21).tolist()
        assert (r["width"], r["height"], r["model"], r["head_checksum"]) == (
            40,
            30,
            "dinov2_vits14_voc2012_linear",
            "abc",
        )
    broken = got["broken"]
    assert not broken["ok"] and (broken["stage"], broken["error_type"], broken["message"]) == (
        "decode",
        "UnidentifiedImageError",
        "not an image",
    )
    assert broken["mask"] == "" and broken["class_counts"] is None and broken["mean_confidence"] is None
    assert existing_keys(cfg.output) == {"a", "sub/b", "sub/deep/c"}
    assert [r["key"] for r in table.to_pylist()] == ["a", "sub/b", "sub/deep/c", "broken"]  # order kept


def test_rows_that_fail_while_writing_become_write_errors(tmp_path):
    out = tmp_path / "out"
    (out / "masks").mkdir(parents=True)
    (out / "masks" / "blocked").write_text("a file where a folder should be")
    good = blobs(8, 8, 21)
    masks = [good, good, np.zeros((5, 5), np.uint8), np.full((8, 8), 77, np.uint8), good.astype(np.float32), good]
    batch = make_batch(masks, ["ok", "blocked/x", "wrong-size", "bad-values", "float", "../escape"])
    batch["width"][2] = 6  # the mask is 5x5 but the image 5 high, 6 wide
    got = rows(WriteMasks(WriteConfig(str(out), VOC))(batch))
    assert got["ok"]["ok"]
    for key, error_type in [
        ("blocked/x", None),
        ("wrong-size", "DinosegError"),
        ("bad-values", "DinosegError"),
        ("float", "DinosegError"),
        ("../escape", "DinosegError"),
    ]:
        r = got[key]
        assert not r["ok"] and r["stage"] == "write" and r["message"] and r["mask"] == "", key
        assert error_type is None or r["error_type"] == error_type, (key, r["error_type"])
    assert not (tmp_path / "escape.png").exists() and not (out / "escape.png").exists()
    assert existing_keys(str(out)) == {"ok"}


def test_parquet_masks_are_hf_image_structs_and_no_files(tmp_path):
    masks = [blobs(20, 24, 21, seed=4), blobs(16, 16, 21, seed=5)]
    cfg = WriteConfig(str(tmp_path / "out"), VOC, masks="parquet")
    table = WriteMasks(cfg)(make_batch(masks, ["p/one", "two"]))
    assert table.schema.field("mask_png") == MASK_PNG_FIELD
    for r, mask in zip(table.to_pylist(), masks, strict=True):
        assert r["ok"] and r["mask"] == "" and r["mask_png"]["path"] == f"{r['key']}.png"
        with Image.open(io.BytesIO(r["mask_png"]["bytes"])) as im:
            assert im.mode == "P" and np.array_equal(np.asarray(im), mask)
    assert not (tmp_path / "out").exists() and existing_keys(cfg.output) == set()


def test_both_writes_files_and_the_same_bytes_in_the_column(tmp_path):
    mask = blobs(20, 24, 21, seed=6)
    cfg = WriteConfig(str(tmp_path / "out"), VOC, masks="both")
    (r,) = WriteMasks(cfg)(make_batch([mask], ["k"])).to_pylist()
    assert open(r["mask"], "rb").read() == r["mask_png"]["bytes"]


def test_rle_column_has_one_entry_per_class_present_without_ignore(tmp_path):
    mask = blobs(37, 23, 5, seed=7)
    mask[0:3, :] = 255
    table = WriteMasks(WriteConfig(str(tmp_path / "out"), VOC, rle=True))(make_batch([mask], ["k"]))
    assert table.schema.field("rle") == RLE_FIELD
    (r,) = table.to_pylist()
    present = sorted(set(np.unique(mask).tolist()) - {255})
    assert [e["class_id"] for e in r["rle"]] == present
    for e in r["rle"]:
        assert np.array_equal(
            rle_decode({"size": [37, 23], "counts": e["counts"]}), (mask == e["class_id"]).astype(np.uint8)
        )


def test_overlays_are_resized_blends_and_written_before_the_mask(tmp_path):
    mask = np.zeros((60, 80), np.uint8)
    mask[:, 40:] = 15  # VOC 'person', colour (192, 128, 128)
    mask[:20, :40] = 255
    image = np.full((30, 40, 3), 100, np.uint8)  # shrunk to half by the decode step
    batch = make_batch([mask, mask], ["o/k", "bad-image"], images=[image, np.zeros((30, 40), np.float32)])
    cfg = WriteConfig(str(tmp_path / "out"), VOC, overlays=True)
    got = rows(WriteMasks(cfg)(batch))
    assert got["o/k"]["ok"]
    with Image.open(overlay_url(cfg.output, "o/k")) as im:
        assert im.format == "JPEG" and im.size == (80, 60)
        px = np.asarray(im).astype(int)
    assert np.abs(px[5, 5] - 100).max() <= 3  # ignore: the image alone
    assert np.abs(px[40, 10] - (100 + 0) // 2).max() <= 3  # background (0, 0, 0)
    assert np.abs(px[30, 70] - np.array([146, 114, 114])).max() <= 3  # (100 + person) / 2
    assert not got["bad-image"]["ok"] and got["bad-image"]["stage"] == "write"
    assert existing_keys(cfg.output) == {"o/k"}  # no mask without its overlay: resume redoes it
    with pytest.raises(DinosegError, match="image"):
        WriteMasks(cfg)(make_batch([mask], ["no-image-column"]))


def test_ray_shaped_batches_stacked_and_read_only(tmp_path):
    masks = np.stack([blobs(12, 10, 21, seed=s) for s in range(3)])
    batch = make_batch(list(masks), ["a", "b", "c"])
    batch["mask"] = masks  # Ray gives equal-shaped tensors as one array
    batch["class_counts"] = np.stack(list(batch["class_counts"]))
    batch["key"] = np.array(["a", "b", "c"])  # str dtype, not object
    for v in batch.values():
        v.setflags(write=False)
    table = WriteMasks(WriteConfig(str(tmp_path / "out"), VOC, masks="both", rle=True))(batch)
    assert table.column("ok").to_pylist() == [True] * 3


def test_returned_rows_split_into_the_declared_schemas_and_survive_parquet(tmp_path):
    masks = [blobs(10, 10, 21), np.zeros(0, np.uint8)]
    batch = make_batch(masks, ["good", "bad"])
    fail_earlier(batch, 1)
    cfg = WriteConfig(str(tmp_path / "out"), VOC, masks="both", rle=True)
    table = WriteMasks(cfg)(batch)
    ok = table.column("ok")
    preds = table.filter(ok).select(prediction_columns(cfg))
    errors = table.filter(pa.compute.invert(ok)).select(list(ERROR_COLUMNS))
    assert preds.schema == pa.schema(list(PREDICTION_SCHEMA) + [MASK_PNG_FIELD, RLE_FIELD])
    assert errors.schema == ERROR_SCHEMA and errors.to_pylist()[0]["stage"] == "decode"
    pq.write_table(table, tmp_path / "t.parquet")
    assert pq.read_table(tmp_path / "t.parquet").schema == table.schema
    # all rows failed: the types still hold (a numpy dict would give list<null> and null here)
    fail_earlier(batch, 0)
    assert WriteMasks(cfg)(batch).schema == write_schema(cfg)


def test_write_masks_to_s3_and_to_a_missing_bucket(s3_bucket):
    bucket, so = s3_bucket
    masks = [blobs(20, 30, 21, seed=s) for s in range(3)]
    images = [np.full((10, 15, 3), 50, np.uint8)] * 3
    cfg = WriteConfig(f"s3://{bucket}/out", VOC, masks="both", rle=True, overlays=True, storage_options=so)
    table = WriteMasks(cfg)(make_batch(masks, ["a", "d/b", "d/e/c"], images))
    assert table.column("ok").to_pylist() == [True] * 3
    assert existing_keys(cfg.output, so) == {"a", "d/b", "d/e/c"}
    fs = fsspec.filesystem("s3", **so)
    for r, mask in zip(table.to_pylist(), masks, strict=True):
        assert r["mask"] == f"s3://{bucket}/out/masks/{r['key']}.png"
        assert np.array_equal(decode_mask_png(fs.cat_file(r["mask"])), mask)
        assert fs.exists(overlay_url(cfg.output, r["key"]))
    missing = WriteConfig("s3://no-such-bucket-dinoseg/out", VOC, storage_options=so)
    got = WriteMasks(missing)(make_batch(masks[:2], ["a", "b"]))
    assert got.column("ok").to_pylist() == [False, False] and set(got.column("stage").to_pylist()) == {"write"}


def test_summary_table_checks_that_nothing_is_lost():
    ok = summary_table({"inputs": 1200, "predicted": 1000, "skipped": 150, "failed": 50})
    lines = ok.splitlines()
    assert [ln.split()[0] for ln in lines] == ["inputs", "predicted", "skipped", "failed", "check"]
    assert len({len(ln) for ln in lines[:4]}) == 1  # numbers right-aligned
    assert "ok" in lines[-1] and "MISMATCH" not in ok
    bad = summary_table({"inputs": 10, "predicted": 7, "skipped": 1, "failed": 1})
    assert "MISMATCH" in bad and "+1" in bad


@pytest.mark.parametrize("bits", [8, 16])
def test_confidence_maps_are_written_beside_the_mask_and_before_it(tmp_path, bits):
    from pipeline.io.masks import confidence_url, decode_mask_png, quantize_confidence

    mask = blobs(20, 30, 21)
    conf = np.linspace(0, 1, 600, dtype=np.float32).reshape(20, 30)
    batch = make_batch([mask, mask], ["c/k", "bad"])
    batch["confidence"] = object_array([quantize_confidence(conf), np.zeros((20, 30), np.float32)])  # float: refused
    cfg = WriteConfig(str(tmp_path / "out"), VOC, confidence_bits=bits)
    got = rows(WriteMasks(cfg)(batch))
    written = decode_mask_png(open(confidence_url(cfg.output, "c/k"), "rb").read())
    expected = quantize_confidence(conf) if bits == 16 else np.rint(conf * 255).astype(np.uint8)
    assert written.dtype == expected.dtype and np.abs(written.astype(int) - expected).max() <= (0 if bits == 16 else 1)
    assert got["c/k"]["ok"] and not got["bad"]["ok"] and got["bad"]["stage"] == "write"
    assert existing_keys(cfg.output) == {"c/k"}  # no mask without its confidence map
    with pytest.raises(DinosegError, match="8 or 16"):
        WriteConfig("out", VOC, confidence_bits=4)
