"""Training's epoch lines on the driver, from OUTPUT/metrics.jsonl as rank 0 rewrites it."""

import json
import logging

from pipeline.train.progress import EpochLines


def record(epoch: int, loss: float) -> dict:
    return {"epoch": epoch, "epochs": 3, "train_loss": loss, "val_miou": 0.5, "lr": 1e-3, "seconds": 1.0}


def write(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dinoseg.progress.train"]


def test_new_epochs_are_logged_once_and_a_resumed_runs_earlier_ones_not_again(tmp_path, caplog):
    metrics = tmp_path / "metrics.jsonl"
    write(metrics, [record(1, 0.9)])  # from the run being resumed
    with caplog.at_level(logging.INFO, logger="dinoseg.progress"):
        with EpochLines(str(metrics), None, every=3600) as lines_:
            write(metrics, [record(1, 0.9), record(2, 0.8)])
            lines_.poll()
            lines_.poll()  # nothing new: nothing logged
            write(metrics, [record(1, 0.9), record(2, 0.8), record(3, 0.7)])
    assert [line.split(":")[0] for line in lines(caplog)] == ["epoch 2/3", "epoch 3/3"]  # the last at exit
    assert "loss 0.8000" in lines(caplog)[0]


def test_an_overwritten_run_shows_its_own_first_epoch(tmp_path, caplog):
    metrics = tmp_path / "metrics.jsonl"
    write(metrics, [record(1, 0.9), record(2, 0.8), record(3, 0.7)])  # an older, finished run
    with caplog.at_level(logging.INFO, logger="dinoseg.progress"):
        with EpochLines(str(metrics), None, every=3600):
            write(metrics, [record(1, 0.5)])
    assert lines(caplog) == [lines(caplog)[0]] and "loss 0.5000" in lines(caplog)[0]


def test_no_file_yet_is_no_line(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="dinoseg.progress"):
        with EpochLines(str(tmp_path / "metrics.jsonl"), None, every=3600):
            pass
    assert lines(caplog) == []
