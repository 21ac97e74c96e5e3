"""`train` end to end on a real local Ray: uncached with bad pairs, resume after a kill, s3 output.
Two workers on the synthetic set, and the head driving `segment`, are in test_demo.py and the
README's training commands (tests/test_readme.py)."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.errors import DinosegError
from pipeline.data.synthetic import write_synthetic
from pipeline.train import TrainConfig, run_train

ROOT = Path(__file__).resolve().parents[2]
# a random backbone's features carry local colour: a linear head learns the synthetic shapes
FAST = {
    "backbone_weights": "random",
    "resolution": 112,
    "crop": 112,
    "batch_size": 8,
    "lr": 0.03,
    "cpus_per_worker": 0.5,
}


@pytest.fixture
def small(tmp_path):
    root = tmp_path / "small"
    write_synthetic(str(root), train=12, val=4, size=56, seed=1)
    return root


def config(root, out, **changes) -> TrainConfig:
    kw = dict(FAST, val_images=f"{root}/val/images", val_masks=f"{root}/val/masks") | changes
    return TrainConfig(f"{root}/train/images", f"{root}/train/masks", f"{root}/classes.yaml", str(out), **kw)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow  # a real Ray
def test_no_cache_reports_bad_pairs_and_trains_on_the_rest(ray_local, small, tmp_path):
    images, masks = small / "train" / "images", small / "train" / "masks"
    (images / "lonely.png").write_bytes((images / "0000.png").read_bytes())  # no mask
    shutil.copy(images / "0001.png", images / "wrong_size.png")
    Image.new("P", (10, 10)).save(masks / "wrong_size.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    shutil.copy(masks / "0002.png", masks / "corrupt.png")
    shutil.copy(images / "0003.png", images / "rgb.png")
    Image.open(images / "0003.png").convert("RGB").save(masks / "rgb.png")
    shutil.copy(images / "0004.png", images / "class9.png")
    m = np.array(Image.open(masks / "0004.png"))
    m[0, 0] = 9
    Image.fromarray(m).save(masks / "class9.png")

    out = tmp_path / "run"
    info = run_train(config(small, out, cache=False, epochs=1, workers=1, resolution=56, crop=56))
    assert info["counts"] == {"train_pairs": 12, "val_pairs": 4, "problems": 5}
    problems = {p["key"]: p for p in lines(out / "problems.jsonl")}
    assert {k: p["stage"] for k, p in problems.items()} == {
        "lonely": "pair",
        "wrong_size": "mask",
        "corrupt": "decode",
        "rgb": "mask",
        "class9": "mask",
    }
    assert "10x10" in problems["wrong_size"]["message"] and "RGB" in problems["rgb"]["message"]
    assert "class 9" in problems["class9"]["message"]
    assert not (out / "cache").exists()  # --no-cache computes no features ahead
    (record,) = lines(out / "metrics.jsonl")
    assert record["train_samples"] == 12 and record["val_miou"] is not None


@pytest.mark.slow  # a real Ray
def test_a_killed_run_resumes_from_last_pt(small, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        f"{small}/train/images",
        f"{small}/train/masks",
        "--val-images",
        f"{small}/val/images",
        "--val-masks",
        f"{small}/val/masks",
        "--classes",
        f"{small}/classes.yaml",
        "--output",
        str(out),
        "--backbone-weights",
        "random",
        "--resolution",
        "56",
        "--crop",
        "56",
        "--batch-size",
        "4",
        "--epochs",
        "3",
        "--workers",
        "1",
        "--cpus-per-worker",
        "0.5",
    ]
    cmd = [sys.executable, "-m", "jobs.train", *args]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (out / "last.pt").exists():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray, the workers: mid-epoch 2 at the latest
    proc.wait()
    first = lines(out / "metrics.jsonl")
    assert 1 <= len(first) < 3

    # the refusals come before Ray starts: the same job in this process (no interpreter to start)
    from jobs.options import main

    capsys.readouterr()
    assert main("jobs.train", args) == 2 and "--resume" in capsys.readouterr().err  # never silently over a run
    assert main("jobs.train", [*args, "--resume", "--lr", "0.5"]) == 2 and "--lr" in capsys.readouterr().err
    assert lines(out / "metrics.jsonl") == first  # a refused run leaves the run as it was

    resumed = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = lines(out / "metrics.jsonl")
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[: len(first)] == first  # the epochs done before the kill are kept, not redone
    info = json.loads((out / "train.json").read_text())
    assert info["epochs_done"] == 3 and "best validation mIoU" in resumed.stdout


@pytest.mark.slow  # a real Ray
def test_s3_output_and_a_cache_streamed_from_s3(ray_local, small, s3_bucket, monkeypatch, caplog):
    import pipeline.train.data as train_data

    bucket, so = s3_bucket
    out = f"s3://{bucket}/runs/a"
    monkeypatch.setattr(train_data, "MEMORY_SHARE", 0.0)  # as a cache too large to hold: streamed from S3
    with caplog.at_level(logging.INFO, logger=train_data.log.name):
        info = run_train(config(small, out, epochs=1, workers=1, resolution=56, crop=56, storage_options=so))
    assert "read every epoch" in caplog.text and "held in memory" not in caplog.text
    assert info["epochs_done"] == 1 and info["history"][0]["train_samples"] == info["counts"]["train_pairs"]
    import fsspec

    fs = fsspec.filesystem("s3", **so)
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/runs/a")}
    assert {"head.pt", "last.pt", "metrics.jsonl", "classes.yaml", "train.json", "cache"} <= names
    assert fs.find(f"{bucket}/runs/a/cache")
    from model.hub import load_head

    loaded = load_head(f"{out}/head.pt", storage_options=so)
    assert loaded.backbone == "dinov2_vits14" and len(loaded.classes) == 5 and loaded.resolution == 56


@pytest.mark.slow  # a real Ray, and reads retried for seconds
def test_a_mask_the_storage_stops_giving_mid_training_fails_in_one_sentence(
    ray_local, small, s3_server, s3_new_bucket, monkeypatch, caplog
):
    import fsspec
    from faults import FaultProxy

    import pipeline.train.data as train_data

    bucket, direct = s3_new_bucket()
    fsspec.filesystem("s3", skip_instance_cache=True, **direct).put(f"{small}/", f"{bucket}/small/", recursive=True)
    proxy = FaultProxy(s3_server, seed=6)
    checked = train_data.refuse_unread_pairs

    def then_the_masks_fail(problems):  # after the check pass read every pair: 503s until the end
        checked(problems)
        proxy.set({"read": 1.0}, ("503",), only="/small/train/masks/")

    monkeypatch.setattr(train_data, "refuse_unread_pairs", then_the_masks_fail)
    so = proxy.storage_options()
    try:
        with caplog.at_level(logging.WARNING, logger="dinoseg.train"), pytest.raises(DinosegError) as refused:
            run_train(
                config(
                    f"s3://{bucket}/small", f"s3://{bucket}/run", cache=False, epochs=1, workers=1, storage_options=so
                )
            )
    finally:
        proxy.close()
    message = str(refused.value)
    assert "re-run with --resume" in message and "Traceback" not in message and "\n" not in message
    assert type(refused.value) is DinosegError  # not Ray's wrapper of it
    assert proxy.injected[("read", "503")] > 0
    assert "starting the workers again" not in caplog.text  # refused at once: the workers are not restarted


def test_option_errors_are_one_sentence(tmp_path, small):
    with pytest.raises(DinosegError, match="--epochs"):
        run_train(config(small, tmp_path / "o", epochs=0))
    with pytest.raises(DinosegError, match="--layers"):
        run_train(config(small, tmp_path / "o", layers="3,99"))
    with pytest.raises(DinosegError, match="class weights|--class-weights"):
        run_train(config(small, tmp_path / "o", class_weights="1,2"))
    with pytest.raises(DinosegError, match="no masks"):
        run_train(
            TrainConfig(
                f"{small}/train/images", None, f"{small}/classes.yaml", str(tmp_path / "o"), backbone_weights="random"
            )
        )
    assert not (tmp_path / "o").exists()  # nothing written for a refused run


def test_the_summary_of_a_run_without_validation_pairs():
    from pipeline.train import summary

    # a small pair set can leave --val-fraction's hash split empty: epochs then have no mIoU
    info = {
        "history": [
            {"epoch": 1, "train_loss": 1.5, "seconds": 2.0},
            {"epoch": 2, "train_loss": 0.5, "val_miou": None, "seconds": 1.0},
        ],
        "counts": {"train_pairs": 22, "val_pairs": 0, "problems": 0},
        "best": {"miou": None, "epoch": 2},
        "head": "run/head.pt",
    }
    lines = summary(info).splitlines()
    assert lines[1].split() == ["1", "1.5000", "-", "2.0"] and lines[2].split()[2] == "-"
    assert "0 validation" in lines[3] and not any("best validation" in line for line in lines)
