"""`./dinoseg demo` as the README shows it, run once as a person runs it (its own process, the
console captured): offline, 2 Ray Train workers on a random backbone, Ray Data segmentation of
the held-out images, evaluation and overlays; it says the backbone is random. And what the
console shows at the default verbosity: the stage headings, training's epochs, the segment
summary table, the evaluation's mIoU and the name of the run's log file; none of Ray's own logs,
no warnings, no forwarded worker lines, no core-worker lines, no colour codes (those are in the
log file)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from readme import command, run_script

from pipeline.demo import DemoConfig
from pipeline.runtime.console import LOG_LINE_PREFIX

REACHED = 0.65  # validation mIoU the 8-epoch, 2-worker run must reach (it reaches about 0.75; chance is ~0.2)
MOST_LINES = 60  # the demo prints about 35; Ray's logs and forwarded worker lines were 120-180 more

# lines that are Ray's, not ours: (what it is, a pattern found anywhere in the line)
NOT_OURS = [
    ("Ray Data's logged progress", re.compile(r"logging_progress\.py")),
    ("a Ray Data execution plan", re.compile(r"Execution plan")),
    ("Ray Data's log location", re.compile(r"Full logs are in")),
    ("a Ray INFO log line", re.compile(r" INFO ")),
    ("Ray's Python log format", re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+[A-Z]+ \S+\.py:\d+ -- ")),
    ("Ray's C++ log format", re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\]")),
    ("a core-worker line", re.compile(r"core_worker\.cc")),
    ("a forwarded worker line", re.compile(r"\(pid=|\(\w+ pid=\d+|RayTrainWorker|\(raylet\)")),
    ("a warning", re.compile(r"warning", re.IGNORECASE)),
    ("an ANSI escape", re.compile("\x1b\\[")),
    ("a Ray notice", re.compile(r"docs\.ray\.io|ray-project|Token authentication|RAY_[A-Z_]+=")),
]


def not_ours(console: str) -> list[str]:
    """The console's lines that a person running the demo should not see, each with what it is."""
    return [f"{what}: {line!r}" for line in console.splitlines() for what, pattern in NOT_OURS if pattern.search(line)]


def test_the_patterns_catch_what_the_demo_printed_before():
    before = [  # lines of `./dinoseg demo` before the console was set up (Ray 2.60)
        "2026-12-01 21:31:29,262\tINFO logging_progress.py:225 -- Total Progress: 0/?",
        "2026-12-01 21:31:28,999\tINFO streaming_executor.py:216 -- Execution plan of Dataset dataset_0: InputDataBuffer",
        "[2026-12-01 21:31:29,047 E 18214 18214] core_worker.cc:2465: Actor with class name: 'MapWorker(...)'",
        "\x1b[36m(RayTrainWorker pid=19996)\x1b[0m epoch 1/8: loss 2.2363, val mIoU 0.3124, lr 2.68e-02, 3.4s",
        "\x1b[36m(MapWorker(MapBatches(Predict)) pid=21134)\x1b[0m dinov2_vits14 has random weights",
        "/work/main/.venv/.../execution_options.py:436: RayDeprecationWarning: `ExecutionOptions.exclude_resources` is deprecated",
        "WARNING model.hub: dinov2_vits14 has random weights: its features mean nothing beyond local colour",
        "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
    ]
    assert all(not_ours(line) for line in before)
    ours = [
        "2/4 training a linear head, Ray Train, 2 workers, 8 epochs",
        "check      ok: inputs = predicted + skipped + failed",
        "mIoU on the 16 held-out images: 0.759 (guessing scores about 0.2); the best validation mIoU during training was 0.763.",
        "  /tmp/demo/run/metrics.jsonl  loss and validation mIoU per epoch; /tmp/demo/run/head.pt the head",
        f"{LOG_LINE_PREFIX}/tmp/dinoseg-logs/dinoseg-20261201-214005-2796.log",
    ]
    assert not_ours("\n".join(ours)) == []


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(console, OUTPUT) of the README's demo command, run in a fresh folder as its own process."""
    cwd = tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONWARNINGS")}
    env.update(
        DINOSEG_CACHE=str(cwd / "cache"), DINOSEG_HUB=str(cwd / "no-hub"), RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25"
    )
    argv = command("./dinoseg demo")
    proc = run_script(argv, cwd, env=env, timeout=600)
    console = proc.stdout + proc.stderr  # a person's terminal shows both
    assert proc.returncode == 0, console[-4000:]
    return console, cwd / argv[2]


@pytest.mark.slow
def test_the_demo_trains_segments_evaluates_and_says_the_backbone_is_random(demo):
    printed, out = demo
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


@pytest.mark.slow
def test_the_demo_console_shows_what_a_person_needs_and_nothing_of_rays(demo):
    console, out = demo
    check_demo_console(console, out)
    # training's progress reaches the console from the driver, one line an epoch
    epochs = [line for line in console.splitlines() if re.match(r"epoch \d+/\d+: loss ", line)]
    assert len(epochs) == DemoConfig.epochs, console


def check_demo_console(console: str, out: Path) -> None:
    assert not_ours(console) == [], console
    lines = console.splitlines()
    assert len(lines) <= MOST_LINES, console

    # what a person needs: the stages, the summary table, the result, where to look, the log
    for stage in ("1/4 ", "2/4 ", "3/4 ", "4/4 "):
        assert any(line.startswith(stage) for line in lines), (stage, console)
    assert re.search(r"^\s*check\s+ok: inputs = predicted \+ skipped \+ failed$", console, re.M), console
    assert re.search(r"^mIoU on the 16 held-out images: \d\.\d{3} ", console, re.M), console
    assert str(out / "segment" / "overlays") in console
    named = [line[len(LOG_LINE_PREFIX) :] for line in lines if line.startswith(LOG_LINE_PREFIX)]
    assert len(named) == 1 and lines[-1].startswith(LOG_LINE_PREFIX), console

    # the log file holds what the console leaves out; no deprecated Ray API was called on the way
    logged = Path(named[0]).read_text()
    assert "Execution plan" in logged and "Started a local Ray instance" in logged
    assert "core_worker.cc" in logged  # the one notice the driver's core worker prints
    assert "Ray's session logs" in logged  # where the workers' output is
    assert "RayDeprecationWarning" not in logged
