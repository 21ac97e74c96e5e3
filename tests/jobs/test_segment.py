"""`segment` end to end on a real local Ray: local and s3 in/out, bad inputs, resume, counts."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from model.checkpoint import HeadCheckpoint, save_head_checkpoint
from model.classes import ClassMap
from model.errors import DinosegError
from model.heads import HeadConfig, LinearHead
from pipeline.segment import SegmentConfig, run_segment

ROOT = Path(__file__).resolve().parents[2]
SMALL = {
    "backbone_weights": "random",
    "resolution": 56,
    "decode_cpus": 0.25,
    "cpus_per_actor": 0.5,
    "actors": 1,
    "batch_size": 4,
}


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    torch.manual_seed(0)
    head = LinearHead(HeadConfig("linear", (11,), 384, 4))
    for p in head.parameters():
        p.data.normal_(0, 0.5)
    classes = ClassMap(("bg", "red", "green", "blue"), ((0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)))
    path = tmp_path_factory.mktemp("head") / "head.pt"
    save_head_checkpoint(
        HeadCheckpoint("dinov2_vits14", head.config, classes, head.state_dict(), resolution=56), str(path)
    )
    return str(path)


def jpeg(w, h, seed=0, **save):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", **save)
    return buf.getvalue()


def make_inputs(root: Path) -> dict[str, bytes]:
    files = {
        "a.jpg": jpeg(64, 48, 1),
        "sub/b.jpg": jpeg(30, 90, 2),
        "sub/deeper/c.PNG": None,
        "tiny.png": None,
        "wide.jpg": jpeg(900, 20, 3),
        "empty.jpg": b"",
        "text.jpg": b"this is not an image\n",
        "truncated.jpg": jpeg(64, 64, 4)[:300],
        "notes.txt": b"ignored: not an image extension",
    }
    rgba = Image.new("RGBA", (40, 30), (10, 200, 30, 128))
    for name, image in (("sub/deeper/c.PNG", rgba), ("tiny.png", Image.new("L", (1, 1), 77))):
        buf = io.BytesIO()
        image.save(buf, "PNG")
        files[name] = buf.getvalue()
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


GOOD = {"a": (64, 48), "sub/b": (30, 90), "sub/deeper/c": (40, 30), "tiny": (1, 1), "wide": (900, 20)}
BAD = {"empty", "text", "truncated"}


def read_rows(folder: Path):
    files = sorted(folder.glob("*.parquet"))
    return pq.read_table(files).to_pylist() if files else []


@pytest.mark.slow  # a real Ray
def test_local_folder_with_bad_inputs(ray_local, tmp_path, head_file):
    make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    config = SegmentConfig(str(tmp_path / "in"), str(out), model=None, head=head_file, mean_confidence=True, **SMALL)
    counts = run_segment(config)
    assert counts == {"inputs": 8, "predicted": 5, "skipped": 0, "failed": 3}
    rows = {r["key"]: r for r in read_rows(out / "predictions")}
    assert set(rows) == set(GOOD)
    for key, (w, h) in GOOD.items():
        r = rows[key]
        mask = Image.open(out / "masks" / f"{key}.png")
        assert mask.mode == "P" and mask.size == (w, h) == (r["width"], r["height"])
        values = np.asarray(mask)
        assert np.array_equal(np.bincount(values.ravel(), minlength=4), r["class_counts"])
        assert r["mask"].endswith(f"masks/{key}.png") and 0 < r["mean_confidence"] <= 1
    errors = {r["key"]: r for r in read_rows(out / "errors")}
    assert set(errors) == BAD and all(r["stage"] == "decode" and r["message"] for r in errors.values())
    info = json.loads((out / "run.json").read_text())
    assert info["counts"] == counts and info["model"].startswith("dinov2_vits14")


@pytest.mark.slow  # a real Ray
def test_resume_after_an_interrupted_run(ray_local, tmp_path, head_file):
    make_inputs(tmp_path / "in")
    manifest = tmp_path / "half.txt"  # the "interrupted" run got through two images
    manifest.write_text("\n".join(str(tmp_path / "in" / n) for n in ("a.jpg", "wide.jpg")))
    out = tmp_path / "out"
    first = run_segment(SegmentConfig(str(manifest), str(out), model=None, head=head_file, **SMALL))
    assert first["predicted"] == 2
    a_mtime = (out / "masks" / "a.png").stat().st_mtime_ns
    # --mean-confidence does not change a mask: the run resumes
    again = SegmentConfig(str(tmp_path / "in"), str(out), model=None, head=head_file, mean_confidence=True, **SMALL)
    assert run_segment(again) == {"inputs": 8, "predicted": 3, "skipped": 2, "failed": 3}
    assert (out / "masks" / "a.png").stat().st_mtime_ns == a_mtime  # not redone
    rows = read_rows(out / "predictions")
    assert sorted(r["key"] for r in rows) == sorted(GOOD)  # every mask exactly once
    assert {r["key"] for r in rows if r["mean_confidence"] is None} == {"a", "wide"}  # null unless asked for
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no half-written files
    redo = run_segment(
        SegmentConfig(str(tmp_path / "in"), str(out), model=None, head=head_file, overwrite=True, **SMALL)
    )
    assert redo["predicted"] == 5 and redo["skipped"] == 0
    assert sorted(r["key"] for r in read_rows(out / "predictions")) == sorted(GOOD)  # still once each
    assert len(read_rows(out / "errors")) == 3


@pytest.mark.slow  # a real Ray
def test_another_model_does_not_resume_into_an_output(ray_local, tmp_path, head_file):
    make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    run_segment(SegmentConfig(str(tmp_path / "in" / "a.jpg"), str(out), model=None, head=head_file, **SMALL))
    other = tmp_path / "other.pt"
    head = LinearHead(HeadConfig("linear", (11,), 384, 4))  # another head: default initialisation
    classes = ClassMap(("bg", "red", "green", "blue"), ((0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)))
    save_head_checkpoint(
        HeadCheckpoint("dinov2_vits14", head.config, classes, head.state_dict(), resolution=56), str(other)
    )
    with pytest.raises(DinosegError, match="another model.*--overwrite"):
        run_segment(SegmentConfig(str(tmp_path / "in"), str(out), model=None, head=str(other), **SMALL))
    assert len(read_rows(out / "predictions")) == 1  # nothing changed


@pytest.mark.slow  # a real Ray
def test_s3_in_and_out_with_parquet_masks(ray_local, s3_bucket, head_file, tmp_path):
    import fsspec

    bucket, so = s3_bucket
    fs = fsspec.filesystem("s3", **so)
    fs.pipe({f"{bucket}/in/x/one.jpg": jpeg(50, 40, 5), f"{bucket}/in/two.jpg": jpeg(20, 30, 6)})
    counts = run_segment(
        SegmentConfig(
            f"s3://{bucket}/in",
            f"s3://{bucket}/out",
            model=None,
            head=head_file,
            masks="both",
            storage_options=so,
            **SMALL,
        )
    )
    assert counts == {"inputs": 2, "predicted": 2, "skipped": 0, "failed": 0}
    assert fs.exists(f"{bucket}/out/masks/x/one.png") and fs.exists(f"{bucket}/out/run.json")
    files = fs.glob(f"{bucket}/out/predictions/*.parquet")
    rows = {r["key"]: r for f in files for r in pq.read_table(fs.open(f)).to_pylist()}
    png = rows["x/one"]["mask_png"]
    assert png["path"].endswith("x/one.png") and Image.open(io.BytesIO(png["bytes"])).size == (50, 40)


def test_bad_options_are_one_sentence(tmp_path, head_file):
    from jobs.options import main

    assert (
        main(
            "jobs.segment",
            [str(tmp_path / "missing"), str(tmp_path / "out"), "--head", head_file, "--backbone-weights", "random"],
        )
        == 2
    )
    assert main("jobs.segment", [str(tmp_path), str(tmp_path / "out"), "--storage-options", "{not json"]) == 2
    assert main("jobs.segment", [str(tmp_path), str(tmp_path / "out"), "--model", "nope"]) == 2


@pytest.mark.slow  # a real Ray
def test_listing_errors_overlays_and_rle(ray_local, tmp_path, head_file):
    make_inputs(tmp_path / "in")
    manifest = tmp_path / "m.txt"  # the same image twice: the second line is an error row, never read
    manifest.write_text(
        f"{tmp_path / 'in' / 'a.jpg'}\n{tmp_path / 'in' / 'a.jpg'}\n{tmp_path / 'in' / 'sub' / 'b.jpg'}\n"
    )
    out = tmp_path / "out"
    counts = run_segment(
        SegmentConfig(str(manifest), str(out), model=None, head=head_file, overlays=True, rle=True, **SMALL)
    )
    assert counts == {"inputs": 3, "predicted": 2, "skipped": 0, "failed": 1}
    errors = read_rows(out / "errors")
    assert len(errors) == 1 and errors[0]["stage"] == "list"
    assert not (out / "masks" / ".png").exists()
    rows = {r["key"]: r for r in read_rows(out / "predictions")}
    for key, r in rows.items():
        assert Image.open(out / "overlays" / f"{key}.jpg").size == (r["width"], r["height"])
        present = {i for i, c in enumerate(r["class_counts"]) if c}
        assert {e["class_id"] for e in r["rle"]} == present


@pytest.mark.slow  # a real Ray
def test_a_predictor_that_dies_mid_batch_loses_no_input(ray_local, tmp_path, head_file, monkeypatch):
    """The actor process exits during its first batch; Ray restarts it and retries the batch."""
    import os

    import pipeline.segment.predict

    marker = tmp_path / "died-once"

    class DiesOnce(pipeline.segment.predict.Predict):  # defined here: Ray pickles it by value
        def __call__(self, batch):
            if not marker.exists():
                marker.write_text("dying")
                os._exit(1)
            return super().__call__(batch)

    monkeypatch.setattr(pipeline.segment.predict, "Predict", DiesOnce)
    make_inputs(tmp_path / "in")
    counts = run_segment(
        SegmentConfig(str(tmp_path / "in"), str(tmp_path / "out"), model=None, head=head_file, **SMALL)
    )
    assert marker.exists()  # it really died
    assert counts == {"inputs": 8, "predicted": 5, "skipped": 0, "failed": 3}
    assert sorted(r["key"] for r in read_rows(tmp_path / "out" / "predictions")) == sorted(GOOD)


@pytest.fixture(scope="module")
def killed_and_rerun(tmp_path_factory, head_file):
    """`python -m jobs.segment` in a fresh process (it starts Ray embedded), SIGKILLed once its
    first masks exist, then run again to the end. Returns (inputs, output, masks at the kill, rerun)."""
    import os
    import signal
    import time

    tmp = tmp_path_factory.mktemp("killed")
    src = tmp / "in"
    src.mkdir()
    for i in range(24):
        (src / f"img{i:02d}.jpg").write_bytes(jpeg(96, 64, 100 + i))
    (src / "p.jpg").write_bytes(jpeg(33, 44, 7))
    out = tmp / "out"
    cmd = [
        sys.executable,
        "-m",
        "jobs.segment",
        str(src),
        str(out),
        "--head",
        head_file,
        "--backbone-weights",
        "random",
        "--resolution",
        "56",
        "--batch-size",
        "2",
        "--decode-cpus",
        "0.25",
        "--cpus-per-actor",
        "0.5",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # a module fixture runs before the tests' own isolated environment: isolate it here
    env |= {"DINOSEG_CACHE": str(tmp / "cache"), "DINOSEG_HUB": str(tmp / "no-hub")}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(list((out / "masks").glob("*.png"))) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    interrupted = len(list((out / "masks").glob("*.png")))
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return src, out, interrupted, rerun


@pytest.mark.slow  # a real Ray
def test_local_mode_without_ray_start(killed_and_rerun):
    """`python -m jobs.segment` in a fresh process starts Ray embedded and stops it (the rerun of
    `killed_and_rerun` is such a process)."""
    _, out, _, proc = killed_and_rerun
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "predicted" in proc.stdout and Image.open(out / "masks" / "p.png").size == (33, 44)


@pytest.mark.slow  # a real Ray
def test_a_killed_job_rerun_finishes_every_mask_exactly_once(killed_and_rerun):
    """SIGKILL the job once its first masks exist, run it again: every image ends with exactly
    one mask and one prediction row, and no temporary file is left."""
    _, out, interrupted, rerun = killed_and_rerun
    assert interrupted >= 2
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    masks = sorted(p.stem for p in (out / "masks").glob("*.png"))
    assert masks == sorted([f"img{i:02d}" for i in range(24)] + ["p"])
    keys = [r["key"] for r in read_rows(out / "predictions")]
    assert sorted(keys) == masks  # one row per image, none twice
    for p in (out / "masks").glob("*.png"):  # every mask whole (a write is a rename of a full file)
        with Image.open(p) as m:
            m.load()
            assert m.size == ((33, 44) if p.stem == "p" else (96, 64))
    # parts are renamed into place when complete; a temp name only lives for a write's duration
    assert not [p for p in (out / "predictions").iterdir() if not p.name.endswith(".parquet")]
