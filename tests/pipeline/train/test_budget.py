"""The run's budget (issue 14): steps and lr derived from the training set's size when not given,
--epochs/--steps/--lr validation, the last epoch cut at --steps, the checks that keep a resumed
run on its plan, and Meta's protocol reachable from the command line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.errors import DinosegError
from model.heads import HeadConfig, build_head
from pipeline.train import TrainConfig, run_train
from pipeline.train.config import (
    DEFAULT_EPOCHS,
    MAX_AUTO_LR,
    META_LR,
    META_STEPS,
    MIN_STEPS,
    PLANNED,
    RESUME_KEYS,
    Plan,
    auto_lr,
    plan,
)
from pipeline.train.run import _check_plan, _run_id
from pipeline.train.training import FeatureSource, Schedule, make_optimizer, train_epoch

# ---- the rule --------------------------------------------------------------------------------


def test_defaults_train_40_epochs_of_a_large_set_at_an_lr_scaled_to_the_steps():
    p = plan(1000, 1, 16, None, None, None)  # 63 steps an epoch
    assert (p.steps_per_epoch, p.epochs, p.steps) == (63, DEFAULT_EPOCHS, 63 * DEFAULT_EPOCHS)
    assert p.lr == pytest.approx(META_LR * math.sqrt(META_STEPS / 2520))  # about 4e-3
    assert 3.9e-3 < p.lr < 4.1e-3


def test_a_small_set_gets_at_least_min_steps_whole_epochs_and_a_higher_lr():
    small = plan(96, 1, 16, None, None, None)  # 6 steps an epoch: 40 epochs would be 240 steps
    assert small.steps == MIN_STEPS and small.epochs == math.ceil(MIN_STEPS / 6) and small.steps_per_epoch == 6
    assert small.lr == pytest.approx(auto_lr(MIN_STEPS))
    assert small.lr > plan(1000, 1, 16, None, None, None).lr > META_LR
    tiny = plan(5, 1, 16, None, None, None)  # one step an epoch
    assert (tiny.steps, tiny.epochs) == (MIN_STEPS, MIN_STEPS)


def test_the_auto_lr_is_metas_at_metas_budget_shrinks_with_steps_and_is_capped():
    assert auto_lr(META_STEPS) == pytest.approx(META_LR)
    lrs = [auto_lr(s) for s in (10, 100, 300, 1000, 10_000, META_STEPS, 160_000)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False)) and lrs[0] > lrs[-1]
    assert lrs[0] == MAX_AUTO_LR and max(lrs) <= MAX_AUTO_LR
    assert auto_lr(160_000) == pytest.approx(META_LR / 2)  # sqrt(40k / 160k)


def test_given_epochs_are_exact_and_given_steps_cut_the_last_epoch():
    assert plan(96, 1, 16, 3, None, None) == Plan(3, 18, 6, auto_lr(18))  # no MIN_STEPS floor when asked
    assert plan(96, 1, 16, None, 20, 0.05) == Plan(4, 20, 6, 0.05)  # 6 + 6 + 6 + 2
    two = plan(96, 2, 8, None, None, None)  # two workers, 8 per worker: 48 pairs each
    assert two.steps_per_epoch == 6 and two.steps == MIN_STEPS


def test_metas_protocol_is_reachable_with_steps_and_lr():
    # Meta's linear protocol on ADE20K: 40k iterations at batch 16 on 20,210 images, lr 1e-3,
    # 1500 warm-up iterations (--warmup 0.0375)
    p = plan(20_210, 1, 16, None, META_STEPS, 1e-3)
    assert (p.steps, p.lr, p.epochs) == (40_000, 1e-3, 32)
    assert plan(20_210, 1, 16, None, META_STEPS, None).lr == pytest.approx(1e-3)  # the auto lr agrees
    s = Schedule(1e-3, 1e-4, 0.0375, "poly")
    assert int(s.warmup * p.steps) == 1500
    assert s.factor(1499, p.steps) < 1.0 == s.factor(1500, p.steps)


def test_metas_protocol_options_parse_on_the_command_line(tmp_path):
    import typer

    from jobs.options import config_command, run_command

    got = []
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(config_command(TrainConfig, got.append))
    argv = "imgs masks --classes ade20k --output out --steps 40000 --batch-size 16 --lr 1e-3"
    argv += " --weight-decay 1e-4 --warmup 0.0375 --schedule poly --resolution 512 --crop 512 --no-cache"
    assert run_command(app, argv.split()) == 0
    (c,) = got
    assert (c.steps, c.epochs, c.batch_size, c.lr, c.weight_decay) == (40_000, None, 16, 1e-3, 1e-4)
    assert (c.warmup, c.schedule, c.resolution, c.crop, c.cache) == (0.0375, "poly", 512, 512, False)
    got.clear()
    assert run_command(app, ["imgs", "masks", "--classes", "ade20k", "--output", "out"]) == 0
    assert (got[0].steps, got[0].epochs, got[0].lr) == (None, None, None)  # the defaults: derived


# ---- validation ------------------------------------------------------------------------------


def config(tmp_path, **changes) -> TrainConfig:
    return TrainConfig(str(tmp_path / "i"), str(tmp_path / "m"), "voc2012", str(tmp_path / "o"), **changes)


@pytest.mark.parametrize(
    "changes, flag",
    [
        ({"steps": 0}, "--steps"),
        ({"epochs": 0}, "--epochs"),
        ({"lr": -0.1}, "--lr"),
        ({"lr": 0.0}, "--lr"),
        ({"epochs": 5, "steps": 100}, "pass one"),
    ],
)
def test_bad_budget_options_end_in_one_sentence(tmp_path, changes, flag):
    with pytest.raises(DinosegError, match=flag) as e:
        run_train(config(tmp_path, **changes))  # refused before any file is read or Ray starts
    assert str(e.value).endswith(".") and "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


def test_every_planned_option_is_a_resume_key():
    assert set(PLANNED) <= set(RESUME_KEYS) and "steps" in RESUME_KEYS


# ---- the last epoch of a budget in steps -----------------------------------------------------


def test_max_steps_stops_the_epoch_after_that_many_optimizer_steps():
    rng = np.random.default_rng(0)
    batch = {"features": rng.normal(size=(2, 4, 3, 3)).astype(np.float16), "label": np.zeros((2, 42, 42), np.uint8)}
    head = build_head(HeadConfig("linear", (11,), 4, 3))
    opt, sched = make_optimizer(head, Schedule(lr=0.1, warmup=0.0), total_steps=10)
    stats = train_epoch(head, FeatureSource((11,), 4), [batch] * 6, opt, sched, torch.device("cpu"), max_steps=4)
    assert stats["train_samples"] == 8 and sched.last_epoch == 4
    stats = train_epoch(head, FeatureSource((11,), 4), [batch] * 6, opt, sched, torch.device("cpu"))
    assert stats["train_samples"] == 12 and sched.last_epoch == 10


# ---- resume keeps the plan -------------------------------------------------------------------


def state(settings: dict) -> dict:
    return {"run_id": "abc", "epoch": 2, "settings": settings}


def test_a_resumed_run_with_derived_options_must_derive_the_same_plan():
    before = state({"steps": None, "lr": None, "plan": {"epochs": 50, "steps": 300, "steps_per_epoch": 6, "lr": 0.01}})
    _check_plan(before, Plan(50, 300, 6, 0.01), "out")  # the same set: fine
    with pytest.raises(DinosegError, match=r"--steps 300.*resume with --steps 300"):
        _check_plan(before, Plan(40, 520, 13, 0.01), "out")  # the set grew: the derived budget moved
    with pytest.raises(DinosegError, match="--lr"):
        _check_plan(before, Plan(50, 300, 6, 0.02), "out")
    _check_plan(before, Plan(23, 300, 13, 0.01), "out")  # the same steps and lr given on a bigger set
    old = state({"epochs": 40, "lr": 0.001})  # a state written before plans: its epochs and lr
    with pytest.raises(DinosegError, match="--lr 0.001"):
        _check_plan(old, Plan(40, 240, 6, auto_lr(240)), "out")


def test_an_explicit_lr_on_resume_is_compared_with_the_lr_the_run_used(monkeypatch):
    settings = {"lr": None, "steps": None, "epochs": None, "plan": {"epochs": 50, "steps": 300, "lr": 0.01}}
    read = lambda out, so: state(settings)  # noqa: E731
    c = TrainConfig("i", "m", "voc2012", "out", resume=True, lr=0.5)
    with pytest.raises(DinosegError, match="--lr 0.01"):
        _run_id(c, "out", None, {"lr": 0.5, "steps": None, "epochs": None}, read)
    run_id, _ = _run_id(c, "out", None, {"lr": 0.01, "steps": None, "epochs": None}, read)
    assert run_id == "abc"
    assert _run_id(c, "out", None, {"lr": None, "steps": None, "epochs": None}, read)[0] == "abc"  # compared later
