"""`evaluate` on hand-made PNG masks: known scores, keys on one side only, bad masks skipped and
counted, one-sentence errors, the JSON report, and ground truth on S3."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.options import main
from model.classes import ClassMap, save_class_map
from model.errors import DinosegError
from pipeline.evaluate import EvaluateConfig, run_evaluate

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ClassMap(("bg", "cat", "dog"), ((0, 0, 0), (255, 0, 0), (0, 255, 0)))
# The pixels of tests/pipeline/test_metrics.py split over two keys: IoU 1/2, 1/3, 1/2; mIoU 4/9.
GT = {"a/b": [[0, 0, 1]], "c": [[1, 2, 255]]}
PRED = {"a/b": [[0, 1, 1]], "c": [[2, 2, 0]]}
IOU = [1 / 2, 1 / 3, 1 / 2]


def png(values, mode: str = "P") -> bytes:
    a = np.asarray(values)
    if mode == "I;16":
        image = Image.fromarray(a.astype("<u2"))  # 16-bit grayscale
    else:
        image = Image.fromarray(a.astype(np.uint8))
        if mode == "P":
            image.putpalette(CLASSES.palette())
        elif mode == "RGB":
            image = image.convert("RGB")
    assert image.mode == mode
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write(root: Path, files: dict[str, bytes]) -> Path:
    for key, data in files.items():
        path = root / (key if "." in key else key + ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@pytest.fixture
def dirs(tmp_path):
    """(pred, gt, classes file): the two known pairs, GT in modes L and I;16, PRED in mode P."""
    pred = write(tmp_path / "pred", {k: png(v, "P") for k, v in PRED.items()})
    gt = write(tmp_path / "gt", {"a/b": png(GT["a/b"], "L"), "c": png(GT["c"], "I;16")})
    classes = tmp_path / "classes.json"
    save_class_map(CLASSES, str(classes))
    return pred, gt, classes


def test_known_scores_and_report(dirs):
    pred, gt, classes = dirs
    result = run_evaluate(EvaluateConfig(str(pred), str(gt), str(classes)))
    assert result["miou"] == pytest.approx(4 / 9)
    assert result["iou"] == pytest.approx(IOU)
    assert result["pixel_accuracy"] == pytest.approx(3 / 5) and result["pixels"] == 5
    assert result["unlabeled_fraction"] == 0.0
    assert result["names"] == ["bg", "cat", "dog"]
    assert result["counts"] == {
        "pairs": 2,
        "only_pred": 0,
        "only_gt": 0,
        "size_mismatch": 0,
        "unreadable": 0,
        "out_of_range": 0,
    }
    report = json.loads((pred / "evaluation.json").read_text())
    assert report == json.loads(json.dumps(result))
    assert report["arguments"]["output"] == str(pred / "evaluation.json")
    assert report["arguments"]["classes"] == str(classes)
    # a second run does not take its own report for a mask
    assert run_evaluate(EvaluateConfig(str(pred), str(gt), str(classes)))["counts"]["pairs"] == 2


def test_skips_are_counted_and_never_fatal(dirs):
    pred, gt, classes = dirs
    write(
        pred,
        {
            "only/in_pred": png([[0]]),
            "small": png([[0, 1], [1, 0]]),
            "rgb": png([[0, 1, 2]], "RGB"),
            "wide_pred": png([[0, 7, 1]]),  # 7 is neither a class nor 'unsure' (255) in a prediction
            "bad_gt": png([[0, 1, 2]]),
        },
    )
    write(
        gt,
        {
            "x/only_in_gt": png([[0]], "L"),
            "y": png([[1]], "L"),
            "small": png([[0, 1, 1], [1, 0, 0], [0, 0, 0]], "L"),
            "rgb": png([[0, 1, 2]], "L"),
            "wide_pred": png([[0, 1, 1]], "L"),
            "bad_gt": png([[0, 7, 255]], "L"),  # 7 is neither a class nor the ignore index
            "corrupt.png": b"this is not a PNG",
        },
    )
    write(pred, {"corrupt.png": png([[0]])})
    result = run_evaluate(EvaluateConfig(str(pred), str(gt), str(classes)))
    assert result["miou"] == pytest.approx(4 / 9)  # only the two good pairs count
    assert result["iou"] == pytest.approx(IOU)
    assert result["counts"] == {
        "pairs": 2,
        "only_pred": 1,
        "only_gt": 2,
        "size_mismatch": 1,
        "unreadable": 2,
        "out_of_range": 2,
    }
    ex = result["examples"]
    assert ex["only_pred"] == ["only/in_pred"] and ex["only_gt"] == ["x/only_in_gt", "y"]
    assert ex["size_mismatch"] == ["small: the prediction is 2x2, the ground truth 3x3."]
    unreadable = " ".join(ex["unreadable"])
    assert "rgb.png' cannot be decoded as an index mask: the mask is an RGB image" in unreadable
    assert "corrupt.png' cannot be decoded" in unreadable
    assert any(e.startswith("bad_gt: the ground truth has values [7]") for e in ex["out_of_range"])
    assert any(e.startswith("wide_pred: the prediction has values [7]") for e in ex["out_of_range"])


def test_unsure_prediction_pixels_are_misses_not_a_skipped_pair(dirs):
    """A pseudo-label's 255 ('unsure') where the ground truth has a class is a false negative of
    that class and nobody's false positive; where the ground truth is 255 it is not scored.
    The two known pairs plus 'u':
        gt   [[0, 1, 255], [2, 2, 1]]    (0, unsure) (1, unsure) (255, unsure: ignored)
        pred [[255, 255, 255], [255, 2, 1]]  (2, unsure) (2, 2) (1, 1)
    class 0: TP 1, GT 3, pred 1 -> IoU 1/3
    class 1: TP 2, GT 4, pred 3 -> IoU 2/5
    class 2: TP 2, GT 3, pred 3 -> IoU 2/4"""
    pred, gt, classes = dirs
    write(pred, {"u": png([[255, 255, 255], [255, 2, 1]])})
    write(gt, {"u": png([[0, 1, 255], [2, 2, 1]], "L")})
    result = run_evaluate(EvaluateConfig(str(pred), str(gt), str(classes)))
    assert result["counts"]["pairs"] == 3 and result["counts"]["out_of_range"] == 0
    assert result["iou"] == pytest.approx([1 / 3, 2 / 5, 1 / 2])
    assert result["miou"] == pytest.approx(37 / 90)
    assert result["pixels"] == 10 and result["pixel_accuracy"] == pytest.approx(5 / 10)
    assert result["unlabeled_pixels"] == 3 and result["unlabeled_fraction"] == pytest.approx(3 / 10)
    assert result["gt_pixels"] == [3, 4, 3] and result["pred_pixels"] == [1, 3, 3]


def test_examples_are_capped(dirs):
    pred, gt, classes = dirs
    write(gt, {f"extra{i}": png([[0]], "L") for i in range(8)})
    result = run_evaluate(EvaluateConfig(str(pred), str(gt), str(classes)))
    assert result["counts"]["only_gt"] == 8 and len(result["examples"]["only_gt"]) == 5


def test_command_prints_table_and_writes_output(dirs, tmp_path, capsys):
    pred, gt, classes = dirs
    out = tmp_path / "reports" / "eval.json"
    write(gt, {"missing": png([[0]], "L")})
    assert main("jobs.evaluate", [str(pred), str(gt), "--classes", str(classes), "--output", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "mIoU 44.44" in stdout and "cat" in stdout and "33.33" in stdout
    assert "pairs compared: 2" in stdout and "skipped, only in GT: 1" in stdout and "    missing" in stdout
    assert json.loads(out.read_text())["miou"] == pytest.approx(4 / 9)
    assert not (pred / "evaluation.json").exists()


def test_bundled_class_map_by_name(dirs):
    pred, gt, _ = dirs
    result = run_evaluate(EvaluateConfig(str(pred), str(gt), "voc2012"))
    assert len(result["iou"]) == 21 and result["names"][0] == "background"
    assert result["miou"] == pytest.approx(4 / 9)  # classes 3..20 are in neither side: left out


def error_of(argv, capsys) -> str:
    assert main("jobs.evaluate", argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_nothing_in_common_is_one_sentence(tmp_path, dirs, capsys):
    _, gt, classes = dirs
    other = write(tmp_path / "other", {"zzz": png([[0]])})
    err = error_of([str(other), str(gt), "--classes", str(classes)], capsys)
    assert "no key is in both" in err and "'zzz'" in err and "'a/b'" in err


def test_no_pair_left_is_one_sentence(tmp_path, dirs, capsys):
    _, _, classes = dirs
    pred = write(tmp_path / "p", {"k": png([[0, 1]])})
    gt = write(tmp_path / "g", {"k": png([[0], [1]], "L")})
    err = error_of([str(pred), str(gt), "--classes", str(classes)], capsys)
    assert "none of the 1 pairs" in err and "1 of different sizes" in err
    with pytest.raises(DinosegError):
        run_evaluate(EvaluateConfig(str(pred), str(gt), str(classes)))


def test_wrong_paths_and_options_are_one_sentence(tmp_path, dirs, capsys):
    pred, gt, classes = dirs
    err = error_of([str(tmp_path / "nope"), str(gt), "--classes", str(classes)], capsys)
    assert err.startswith("error: PRED:") and "does not exist" in err
    err = error_of([str(pred), str(tmp_path / "nope"), "--classes", str(classes)], capsys)
    assert err.startswith("error: GT:") and "does not exist" in err
    assert "class map" in error_of([str(pred), str(gt), "--classes", str(tmp_path / "no.yaml")], capsys)
    assert "storage-options" in error_of(
        [str(pred), str(gt), "--classes", str(classes), "--storage-options", "{"], capsys
    )
    assert not (pred / "evaluation.json").exists()


def test_gt_on_s3_and_report_on_s3(dirs, s3_bucket):
    import fsspec

    pred, gt, classes = dirs
    bucket, so = s3_bucket
    fs = fsspec.filesystem("s3", **so)
    for path in gt.rglob("*.png"):
        fs.pipe_file(f"{bucket}/gt/{path.relative_to(gt).as_posix()}", path.read_bytes())
    result = run_evaluate(
        EvaluateConfig(str(pred), f"s3://{bucket}/gt", str(classes), f"s3://{bucket}/eval/report.json", so)
    )
    assert result["iou"] == pytest.approx(IOU) and result["counts"]["pairs"] == 2
    report = json.loads(fs.cat_file(f"{bucket}/eval/report.json"))
    assert report["miou"] == pytest.approx(4 / 9)
    assert report["arguments"]["storage_options"] == sorted(so)  # option names only, no secrets
    assert "testing" not in json.dumps(report)


def test_python_dash_m(dirs):
    pred, gt, classes = dirs
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.evaluate", str(pred), str(gt), "--classes", str(classes)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "mIoU 44.44" in proc.stdout
    assert (pred / "evaluation.json").exists()


def test_compare_masks_sums_pairs_by_url_and_skips_what_cannot_be_compared(tmp_path):
    """The pair comparison evaluate and self-train's scoring share: any (key, pred, gt) URLs."""
    from pipeline.data.metrics import scores
    from pipeline.evaluate import compare_masks

    files = {name: png(v) for name, v in (("pa", PRED["a/b"]), ("ga", GT["a/b"]), ("pc", PRED["c"]), ("gc", GT["c"]))}
    files["wide"] = png([[0, 0, 0, 0]])
    for name, data in files.items():
        (tmp_path / f"{name}.png").write_bytes(data)
    at = lambda name: str(tmp_path / f"{name}.png")  # noqa: E731
    skipped = []
    pairs = [
        ("a/b", at("pa"), at("ga")),
        ("c", at("pc"), at("gc")),
        ("wide", at("wide"), at("ga")),  # 4 x 1 against 3 x 1
        ("gone", at("nowhere"), at("ga")),
    ]
    confusion, compared = compare_masks(pairs, CLASSES, None, lambda *why: skipped.append(why), threads=2)
    assert compared == 2
    assert scores(confusion, CLASSES.names)["iou"] == pytest.approx(IOU)
    assert sorted(reason for reason, _ in skipped) == ["size_mismatch", "unreadable"]
