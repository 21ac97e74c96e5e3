"""`dinoseg demo` as the README shows it: offline, 2 Ray Train workers on a random backbone, Ray
Data segmentation of the held-out images, evaluation and overlays; it says the backbone is random."""

import json

import pytest
from readme import command, run_in_process

from pipeline.demo import DemoConfig

pytestmark = pytest.mark.slow
REACHED = 0.65  # validation mIoU the 8-epoch, 2-worker run must reach (it reaches about 0.75; chance is ~0.2)


def test_the_demo_trains_segments_evaluates_and_says_the_backbone_is_random(ray_local, tmp_path, capsys):
    argv = command("./dinoseg demo")
    assert run_in_process(argv, tmp_path) == 0
    printed = capsys.readouterr().out
    out = tmp_path / argv[2]
    assert "randomly initialised" in printed and "no pretrained" in printed

    run = out / "run"
    info = json.loads((run / "train.json").read_text())
    assert info["workers"] == 2 and info["counts"] == {"train_pairs": 48, "val_pairs": 16, "problems": 0}
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == list(range(1, DemoConfig.epochs + 1))
    assert all(r["train_samples"] == 48 for r in history)  # both shards, every epoch
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    best = max(r["val_miou"] for r in history)
    assert best >= REACHED

    # the best head segments the held-out images as well as training measured it
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["counts"]["pairs"] == 16
    assert evaluation["miou"] == pytest.approx(best, abs=0.03)
    assert f"{evaluation['miou']:.3f}" in printed
    assert len(list((out / "segment" / "overlays").glob("*.jpg"))) == 16
    assert str(out / "segment" / "overlays") in printed
