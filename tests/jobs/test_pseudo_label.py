"""`pseudo-label` end to end on a real local Ray: layout, rules, resume, and that `train` takes it."""

import json
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from jobs.options import main
from model.checkpoint import HeadCheckpoint, save_head_checkpoint
from model.classes import IGNORE_INDEX as IGNORE
from model.heads import HeadConfig, LinearHead
from pipeline.data.synthetic import SYNTHETIC_CLASSES, write_synthetic
from pipeline.io.masks import decode_mask_png
from pipeline.label import PseudoLabelConfig, run_pseudo_label
from pipeline.label.pseudo import threshold_cutoff
from pipeline.segment import SegmentConfig

SMALL = {"backbone_weights": "random", "decode_cpus": 0.25, "cpus_per_actor": 0.5, "actors": 1, "batch_size": 4}


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    torch.manual_seed(0)
    head = LinearHead(HeadConfig("linear", (11,), 384, len(SYNTHETIC_CLASSES)))
    for p in head.parameters():
        p.data.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("head") / "head.pt"
    save_head_checkpoint(
        HeadCheckpoint("dinov2_vits14", head.config, SYNTHETIC_CLASSES, head.state_dict(), resolution=56), str(path)
    )
    return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    write_synthetic(str(root), train=8, val=0, size=56)
    (root / "train" / "images" / "broken.png").write_bytes(b"not a png")
    return root / "train" / "images"


def config(images, out, head, **rule):
    return PseudoLabelConfig(SegmentConfig(str(images), str(out), model=None, head=head, **SMALL), **rule)


def parts(folder: Path):
    return sorted(folder.glob("*.parquet"))


def rows(folder: Path):
    files = parts(folder)
    return {r["key"]: r for r in pq.read_table(files).to_pylist()} if files else {}


@pytest.mark.slow  # a real Ray
def test_threshold_layout_resume_and_reselect(ray_local, tmp_path, images, head_file):
    out = tmp_path / "out"
    result = run_pseudo_label(config(images, out, head_file, threshold=0.6))
    assert result["model"] == {"inputs": 9, "predicted": 8, "skipped": 0, "failed": 1}
    assert result["counts"] == {"images": 8, "pairs": 8, "below_coverage": 0, "failed": 0}
    for name in ("classes.yaml", "thresholds.json", "selection.json", "run.json", "pairs.csv"):
        assert (out / name).exists(), name
    assert len(rows(out / "raw" / "errors")) == 1 and "broken" in rows(out / "raw" / "errors")
    labels = rows(out / "labels")
    assert set(labels) == {f"{i:04d}" for i in range(8)}
    cutoff = threshold_cutoff(0.6)
    saw_unsure = False
    for key, row in labels.items():
        raw = decode_mask_png((out / "raw" / "masks" / f"{key}.png").read_bytes())
        q = decode_mask_png((out / "raw" / "confidence" / f"{key}.png").read_bytes())
        mask = decode_mask_png((out / "masks" / f"{key}.png").read_bytes())
        assert np.array_equal(mask, np.where(q >= cutoff, raw, IGNORE))
        assert row["coverage"] == pytest.approx((mask != IGNORE).mean())
        assert sum(row["labeled_counts"]) == (mask != IGNORE).sum()
        saw_unsure |= bool((mask == IGNORE).any())
    assert saw_unsure  # the rule did something on this model
    pairs = pacsv.read_csv(out / "pairs.csv").to_pylist()
    assert {p["mask"] for p in pairs} == {f"masks/{k}.png" for k in labels}
    assert all(Path(p["image"]).exists() for p in pairs)
    _export_round_trips(out, tmp_path)

    # the same command again: nothing to predict, nothing to select
    before = parts(out / "labels")
    again = run_pseudo_label(config(images, out, head_file, threshold=0.6))
    assert again["model"]["skipped"] == 8 and again["model"]["predicted"] == 0
    assert parts(out / "labels") == before and again["counts"] == result["counts"]

    # another rule: selected again from raw/ without the model; pairs below coverage leave
    third = run_pseudo_label(config(images, out, head_file, class_balanced=0.5, min_coverage=0.5, confidence=True))
    assert third["model"]["predicted"] == 0
    thresholds = json.loads((out / "thresholds.json").read_text())
    raw = [
        (decode_mask_png(p.read_bytes()), decode_mask_png((out / "raw" / "confidence" / p.name).read_bytes()))
        for p in (out / "raw" / "masks").glob("*.png")
    ]
    for c in thresholds["classes"]:  # the highest threshold that keeps at least half of the class
        q = np.concatenate([conf[mask == c["id"]] for mask, conf in raw])
        assert c["predicted_pixels"] == q.size
        if q.size:
            t = round(c["threshold"] * 65535)
            assert (q >= t).sum() == c["kept_pixels"] >= q.size / 2 > (q > t).sum(), c
    labels = rows(out / "labels")
    assert len(labels) == 8 and parts(out / "labels") != before
    selected = {k for k, r in labels.items() if r["selected"]}
    assert all(labels[k]["coverage"] >= 0.5 for k in selected)
    assert third["counts"]["pairs"] == len(selected) and third["counts"]["below_coverage"] == 8 - len(selected)
    assert 0 < len(selected) < 8
    assert {p.stem for p in (out / "masks").glob("*.png")} == selected
    assert {p.stem for p in (out / "confidence").glob("*.png")} == selected
    assert len(pacsv.read_csv(out / "pairs.csv")) == len(selected)


@pytest.mark.slow  # a real Ray
def test_new_images_resume_and_train_reads_the_pairs(ray_local, tmp_path, images, head_file):
    from pipeline.data.pairs import list_pairs
    from pipeline.features.pairs import decode_label

    subset = tmp_path / "some.txt"
    subset.write_text("".join(f"{images}/{i:04d}.png\n" for i in range(5)))
    out = tmp_path / "out"
    first = run_pseudo_label(config(subset, out, head_file))  # the default rule: threshold 0.9
    assert first["rule"] == {"rule": "threshold", "threshold": 0.9} and first["counts"]["images"] == 5
    before = parts(out / "labels")
    subset.write_text("".join(f"{images}/{i:04d}.png\n" for i in range(8)))
    second = run_pseudo_label(config(subset, out, head_file))
    assert second["model"]["predicted"] == 3 and second["model"]["skipped"] == 5
    new = [p for p in parts(out / "labels") if p not in before]
    assert before == [p for p in parts(out / "labels") if p in before] and len(new) == 1
    assert len(pq.read_table(new[0])) == 3  # only the new keys were selected
    assert second["counts"]["images"] == 8

    # what `train` reads: the manifest's pairs, and each mask passes its label checks (self-train's
    # test runs the training job itself on pseudo-label pairs)
    pairs = list_pairs(str(out / "pairs.csv"), None)
    assert len(pairs) == second["counts"]["pairs"] and not pairs.problems
    for mask in pairs.masks:
        label = decode_label(Path(mask).read_bytes(), len(SYNTHETIC_CLASSES))
        assert label.dtype == np.uint8 and ((label < len(SYNTHETIC_CLASSES)) | (label == IGNORE)).all()


def test_bad_rules_fail_before_any_work(tmp_path, images, head_file):
    from model.errors import DinosegError

    with pytest.raises(DinosegError, match="not both"):
        run_pseudo_label(config(images, tmp_path / "o", head_file, threshold=0.9, class_balanced=0.5))
    with pytest.raises(DinosegError, match="min-coverage"):
        run_pseudo_label(config(images, tmp_path / "o", head_file, min_coverage=2.0))
    assert not (tmp_path / "o").exists()


def test_cli_and_python_m_share_the_options(tmp_path, capsys):
    from jobs.cli import main as dinoseg

    assert (
        dinoseg(["pseudo-label", str(tmp_path), str(tmp_path / "o"), "--threshold", "0.5", "--class-balanced", "0.2"])
        == 2
    )
    assert "not both" in capsys.readouterr().err
    assert main("jobs.pseudo_label", [str(tmp_path), str(tmp_path / "o"), "--class-balanced", "1.5"]) == 2
    assert "--class-balanced 1.5 must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.slow  # a real Ray
def test_s3_output_reselects_and_is_read_by_list_pairs(ray_local, images, head_file, s3_bucket):
    import fsspec

    from pipeline.data.pairs import list_pairs

    bucket, so = s3_bucket
    out = f"s3://{bucket}/pl"
    seg = SegmentConfig(str(images), out, model=None, head=head_file, storage_options=so, **SMALL)
    first = run_pseudo_label(PseudoLabelConfig(seg, threshold=0.6))
    assert first["counts"]["pairs"] == 8
    second = run_pseudo_label(PseudoLabelConfig(seg, class_balanced=0.5, min_coverage=0.5))
    fs = fsspec.filesystem("s3", **so)
    fs.invalidate_cache()
    masks = {p.rsplit("/", 1)[-1][:-4] for p in fs.find(f"{bucket}/pl/masks")}
    assert len(masks) == second["counts"]["pairs"] < 8  # masks that are no longer pairs were removed
    pairs = list_pairs(f"{out}/pairs.csv", None, so)
    assert len(pairs) == len(masks) and all(m.startswith(f"s3://{bucket}/pl/masks/") for m in pairs.masks)
    assert {m.rsplit("/", 1)[-1][:-4] for m in pairs.masks} == masks


def _export_round_trips(out, tmp_path):
    """`export --format coco` reads a pseudo-label output as it is; pycocotools decodes the masks."""
    from pycocotools import mask as mask_utils

    assert main("jobs.export", [str(out), str(tmp_path / "coco"), "--format", "coco"]) == 0
    coco = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    by_id = {im["id"]: im for im in coco["images"]}
    assert {Path(im["file_name"]).stem for im in coco["images"]} == {p.stem for p in (out / "masks").glob("*.png")}
    category = {c["id"]: c["dinoseg_class"] for c in coco["categories"]}
    for ann in coco["annotations"]:
        key = Path(by_id[ann["image_id"]]["file_name"]).stem
        mask = decode_mask_png((out / "masks" / f"{key}.png").read_bytes())
        assert np.array_equal(
            mask_utils.decode(ann["segmentation"]), (mask == category[ann["category_id"]]).astype(np.uint8)
        )


def test_a_held_output_and_an_output_inside_input_are_refused_before_any_work(tmp_path, images, head_file):
    """Both refused in one sentence before the model pass: OUTPUT's lease is held by another run;
    OUTPUT lies inside INPUT (the next run would label its own masks)."""
    from model.errors import DinosegError
    from pipeline.io.lease import Lease

    out = tmp_path / "out"
    with Lease(str(out), "segment"):
        with pytest.raises(DinosegError, match="held by run") as e:
            run_pseudo_label(config(images, out, head_file))
        assert "\n" not in str(e.value)
        assert sorted(p.name for p in out.iterdir()) == ["lease.json"]  # nothing else written
    inside = images / "labels-out"
    with pytest.raises(DinosegError, match="inside INPUT"):
        run_pseudo_label(config(images, inside, head_file))
    assert not inside.exists()
