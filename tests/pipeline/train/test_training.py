"""Head training math without Ray: the lr schedule, batches to tensors (stacked and ragged),
the loss, an epoch of training and validation on a separable toy, and the resume state."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from model.classes import IGNORE_INDEX as IGNORE
from model.errors import WeightsError
from model.geometry import PATCH_SIZE as PATCH
from model.heads import HeadConfig, build_head
from pipeline.data.metrics import scores
from pipeline.features.pairs import padded_geometry
from pipeline.train.training import (
    STATE_FORMAT,
    STATE_VERSION,
    FeatureSource,
    Schedule,
    loss_fn,
    make_optimizer,
    parse_state,
    state_bytes,
    to_tensors,
    train_epoch,
    validate,
)
from pipeline.train.trainset import MEAN_RGB

CPU = torch.device("cpu")


def obj(*arrays) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


# ---- schedule --------------------------------------------------------------------------------


def test_warmup_rises_linearly_from_the_ratio_to_one():
    s = Schedule(warmup=0.1, warmup_ratio=0.01)
    total = 200  # warm-up: steps 0..19
    assert s.factor(0, total) == pytest.approx(0.01)
    assert s.factor(10, total) == pytest.approx(0.01 + 0.99 * 0.5)
    assert s.factor(20, total) == pytest.approx(1.0)
    warm = [s.factor(i, total) for i in range(21)]
    assert np.allclose(np.diff(warm), 0.99 / 20)  # linear, reaching 1 exactly at int(0.1 * 200)
    assert Schedule(warmup=0.0).factor(0, 100) == 1.0  # no warm-up: the full lr from the start
    # int(0.05 * 50) = 2 warm-up steps: step 1 is halfway, step 2 is the full lr
    assert Schedule(warmup=0.05).factor(1, 50) == pytest.approx(0.5, abs=1e-5)
    assert Schedule(warmup=0.05).factor(2, 50) == pytest.approx(1.0)


def test_poly_and_cosine_decay():
    total, warm = 110, 10
    poly = Schedule(warmup=warm / total, kind="poly", power=1.0)
    assert poly.factor(total, total) == 0.0
    assert poly.factor(warm + 50, total) == pytest.approx(0.5)  # linear: halfway is half
    assert poly.factor(total - 1, total) == pytest.approx(1 / 100)
    decay = [poly.factor(i, total) for i in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    squared = Schedule(warmup=warm / total, kind="poly", power=2.0)
    assert squared.factor(warm + 50, total) == pytest.approx(0.25)
    cosine = Schedule(warmup=warm / total, kind="cosine")
    assert cosine.factor(warm, total) == pytest.approx(1.0)
    assert cosine.factor(warm + 50, total) == pytest.approx(0.5)  # the midpoint of the decay
    assert cosine.factor(warm + 25, total) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine.factor(total, total) == pytest.approx(0.0, abs=1e-12)
    assert poly.factor(total + 5, total) == 0.0  # past the end: stays at 0, never negative


def test_optimizer_follows_the_schedule():
    head = torch.nn.Linear(2, 2)
    s = Schedule(lr=0.1, warmup=0.1, warmup_ratio=0.01)
    opt, sched = make_optimizer(head, s, total_steps=100)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.01)
    assert opt.param_groups[0]["weight_decay"] == s.weight_decay
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # warm-up over at step 10
    for _ in range(45):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


# ---- batches to tensors ----------------------------------------------------------------------


def test_stacked_features_pass_through():
    feats = np.random.default_rng(0).normal(size=(2, 6, 3, 4)).astype(np.float16)
    labels = np.random.default_rng(1).integers(0, 3, (2, 42, 56)).astype(np.uint8)
    kind, x, y = to_tensors({"features": feats, "label": labels}, CPU)
    assert kind == "features" and x.dtype == torch.float32 and y.dtype == torch.int64
    assert np.array_equal(x.numpy(), feats.astype(np.float32)) and np.array_equal(y.numpy(), labels)


def test_ragged_features_pad_with_zero_and_labels_with_ignore():
    a = np.full((4, 2, 3), 1.5, np.float16)
    b = np.full((4, 3, 2), -2.0, np.float16)
    la = np.full((28, 42), 1, np.uint8)
    lb = np.full((42, 28), 2, np.uint8)
    kind, x, y = to_tensors({"features": obj(a, b), "label": obj(la, lb)}, CPU)
    assert kind == "features" and tuple(x.shape) == (2, 4, 3, 3) and tuple(y.shape) == (2, 42, 42)
    assert (x[0, :, :2, :3] == 1.5).all() and (x[0, :, 2:, :] == 0).all()
    assert (x[1, :, :3, :2] == -2).all() and (x[1, :, :, 2:] == 0).all()
    assert (y[0, :28, :42] == 1).all() and (y[0, 28:, :] == IGNORE).all()
    assert (y[1, :42, :28] == 2).all() and (y[1, :, 28:] == IGNORE).all()


def test_ragged_pixels_are_centre_padded_with_the_mean_colour():
    rng = np.random.default_rng(0)
    pa_, pb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), rng.integers(0, 256, (28, 14, 3), dtype=np.uint8)
    la, lb = np.full((20, 30), 1, np.uint8), np.full((28, 14), 2, np.uint8)
    kind, x, y = to_tensors({"pixels": obj(pa_, pb), "label": obj(la, lb)}, CPU)
    assert kind == "pixels" and x.dtype == torch.uint8  # the backbone's source normalises
    x, y = x.numpy(), y.numpy()
    assert x.shape == (2, 28, 42, 3) and y.shape == (2, 28, 42)
    mean = np.array(MEAN_RGB, np.uint8)
    # image 0: 20 x 30 in a 28 x 42 canvas, 4 rows above, 6 columns left
    assert padded_geometry(20, 30) == (2, 3, 4, 6)
    assert np.array_equal(x[0, 4:24, 6:36], pa_) and (y[0, 4:24, 6:36] == 1).all()
    # image 1: already whole patches, then padded to the batch's width on the right
    assert np.array_equal(x[1, :, :14], pb) and (y[1, :, :14] == 2).all()
    for i, (top, left, h, w) in enumerate([(4, 6, 20, 30), (0, 0, 28, 14)]):
        outside = np.ones((28, 42), bool)
        outside[top : top + h, left : left + w] = False
        assert (x[i][outside] == mean).all() and (y[i][outside] == IGNORE).all()


def test_stacked_pixels_off_the_patch_grid_are_padded_too():
    px = np.random.default_rng(0).integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)
    lb = np.ones((2, 20, 30), np.uint8)
    _, x, y = to_tensors({"pixels": px, "label": lb}, CPU)
    assert tuple(x.shape) == (2, 28, 42, 3) and np.array_equal(x[:, 4:24, 6:36].numpy(), px)
    assert int((y != IGNORE).sum()) == 2 * 20 * 30
    whole = np.zeros((2, 28, 42, 3), np.uint8)
    _, x2, _ = to_tensors({"pixels": whole, "label": np.zeros((2, 28, 42), np.uint8)}, CPU)
    assert tuple(x2.shape) == (2, 28, 42, 3)  # crops of whole patches are left as they are


# ---- loss ------------------------------------------------------------------------------------


def test_loss_is_the_ce_of_the_only_labelled_pixel():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 5, 6)
    label = torch.full((1, 5, 6), IGNORE, dtype=torch.long)
    label[0, 2, 3] = 1
    expected = -torch.log_softmax(logits[0, :, 2, 3], dim=0)[1]
    assert loss_fn(logits, label).item() == pytest.approx(expected.item(), rel=1e-5)
    other = logits.clone()
    other[..., 0, :] += 100  # logits at ignored pixels do not matter
    assert loss_fn(other, label).item() == pytest.approx(expected.item(), rel=1e-5)
    weighted = loss_fn(logits, label, weight=torch.tensor([1.0, 3.0, 1.0, 1.0]))
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-5)  # a weighted mean of one pixel


def test_loss_upsamples_patch_logits_to_the_label():
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1] = 10.0  # class 1 everywhere, confidently
    label = torch.ones(1, 28, 28, dtype=torch.long)
    assert loss_fn(logits, label).item() < 1e-3
    assert loss_fn(logits, torch.zeros_like(label)).item() == pytest.approx(10.0, rel=1e-3)


# ---- train + validate on a toy ---------------------------------------------------------------

EMBED, CLASSES, GRID = 8, 3, 4


def toy_batch(rng: np.random.Generator, n: int = 4) -> dict:
    """Features whose channel k is high where the class is k; classes in 2 x 2-cell blocks."""
    blocks = rng.integers(0, CLASSES, (n, GRID // 2, GRID // 2))
    cells = blocks.repeat(2, axis=1).repeat(2, axis=2)
    feats = rng.normal(0, 0.3, (n, EMBED, GRID, GRID))
    for k in range(CLASSES):
        feats[:, k] += 3.0 * (cells == k)
    label = cells.repeat(PATCH, axis=1).repeat(PATCH, axis=2).astype(np.uint8)
    return {"features": feats.astype(np.float16), "label": label}


def test_train_epoch_and_validate_learn_a_separable_toy():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    train = [toy_batch(rng) for _ in range(8)]
    val = [toy_batch(rng) for _ in range(3)]
    source = FeatureSource((11,), EMBED)
    head = build_head(HeadConfig("linear", (11,), EMBED, CLASSES))
    before = scores(validate(head, source, val, CPU, CLASSES))["miou"]
    schedule = Schedule(lr=0.05, warmup=0.0)
    opt, sched = make_optimizer(head, schedule, total_steps=5 * len(train))
    losses = []
    empty = {"features": np.zeros((0, EMBED, GRID, GRID), np.float16), "label": np.zeros((0, 56, 56), np.uint8)}
    for _ in range(5):
        stats = train_epoch(head, source, train + [empty], opt, sched, CPU)
        assert stats["train_samples"] == 4 * len(train)  # the empty block was skipped
        losses.append(stats["train_loss"])
    assert losses[-1] < 0.3 * losses[0], losses
    conf = validate(head, source, val, CPU, CLASSES)
    assert conf.dtype == torch.int64 and int(conf.sum()) == 3 * 4 * 56 * 56
    cm = conf.numpy()
    assert (np.diag(cm) > cm.sum(1) - np.diag(cm)).all()  # diagonal-dominant rows
    after = scores(conf)["miou"]
    assert after > 0.9 and after > before, (before, after)
    assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # the schedule ran to its end


def test_validate_takes_only_its_batches_and_ignores_255():
    rng = np.random.default_rng(1)
    batches = [toy_batch(rng, n=1) for _ in range(4)]
    for i, b in enumerate(batches):
        b["label"][:, : 10 * (i + 1)] = IGNORE  # each batch has its own number of labelled pixels
    labelled = [int((b["label"] != IGNORE).sum()) for b in batches]
    head = build_head(HeadConfig("linear", (11,), EMBED, CLASSES))
    source = FeatureSource((11,), EMBED)
    conf = validate(head, source, batches, CPU, CLASSES, take=lambda i: i % 2 == 1)
    assert int(conf.sum()) == labelled[1] + labelled[3]
    assert int(validate(head, source, batches, CPU, CLASSES).sum()) == sum(labelled)


def test_feature_source_splits_layers():
    source = FeatureSource((9, 11), 4)
    x = torch.arange(2 * 8 * 3 * 3, dtype=torch.float32).reshape(2, 8, 3, 3)
    maps = source("features", x)
    assert len(maps) == 2 and torch.equal(maps[0], x[:, :4]) and torch.equal(maps[1], x[:, 4:])
    with pytest.raises(RuntimeError, match="no backbone"):
        source("pixels", torch.zeros(1, 14, 14, 3, dtype=torch.uint8))


# ---- training state --------------------------------------------------------------------------


def test_state_round_trips_through_weights_only_load():
    """The state as the train loop saves it (a head checkpoint dict, optimizer, LambdaLR
    scheduler, history) loads with weights_only=True and resumes the optimizer and schedule."""
    from model.checkpoint import HeadCheckpoint
    from model.classes import ClassMap

    config = HeadConfig("linear", (11,), EMBED, CLASSES)
    head = build_head(config)
    schedule = Schedule(lr=0.1, warmup=0.2)
    opt, sched = make_optimizer(head, schedule, 10)
    maps = [torch.randn(2, EMBED, 2, 2)]
    for _ in range(3):
        opt.zero_grad()
        head(maps).square().mean().backward()
        opt.step()
        sched.step()
    classes = ClassMap(("a", "b", "c"), ((0, 0, 0), (1, 2, 3), (4, 5, 6)))
    ckpt = HeadCheckpoint("dinov2_vits14", config, classes, head.state_dict(), resolution=56, meta={"epoch": 3})
    state = {
        "run_id": "r1",
        "epoch": 3,
        "head": ckpt.to_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "best": {"miou": None, "epoch": 0},
        "history": [{"epoch": 1, "val_miou": 0.5, "val_iou": [0.5, None, 1.0]}],
        "settings": {"crop": 518},
    }
    loaded = parse_state(torch.load(io.BytesIO(state_bytes(state)), weights_only=True), "last.pt")
    assert loaded["format"] == STATE_FORMAT and loaded["version"] == STATE_VERSION
    for k in ("run_id", "epoch", "best", "history", "settings"):
        assert loaded[k] == state[k]
    fresh = build_head(config)
    fresh.load_state_dict(loaded["head"]["state_dict"])
    opt2, sched2 = make_optimizer(fresh, schedule, 10)
    opt2.load_state_dict(loaded["optimizer"])
    sched2.load_state_dict(loaded["scheduler"])
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr()) and sched2.last_epoch == 3
    for o in (opt, opt2):  # one more identical step from identical states gives identical heads
        o.zero_grad()
    head(maps).square().mean().backward()
    fresh(maps).square().mean().backward()
    opt.step()
    opt2.step()
    for k, v in head.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_an_all_ignore_batch_does_not_make_the_epoch_loss_nan():
    rng = np.random.default_rng(0)
    good = toy_batch(rng)
    blank = toy_batch(rng, n=1)
    blank["label"][:] = IGNORE  # e.g. a pseudo-label with every pixel unsure, or a mask that went bad
    head = build_head(HeadConfig("linear", (11,), EMBED, CLASSES))
    opt, sched = make_optimizer(head, Schedule(warmup=0.0), 2)
    stats = train_epoch(head, FeatureSource((11,), EMBED), [good, blank], opt, sched, CPU)
    assert all(torch.isfinite(p).all() for p in head.parameters())
    assert math.isfinite(stats["train_loss"])
    # the blank batch is left out of the loss, but not out of the schedule or the sample count
    assert stats["train_samples"] == 5 and stats["loss_samples"] == 4
    assert stats["loss_sum"] == pytest.approx(4 * stats["train_loss"])
    assert sched.last_epoch == 2


def test_an_all_ignore_batch_does_not_move_the_head():
    """No loss, so no optimizer step: AdamW's momentum and weight decay would move it anyway."""
    import warnings

    rng = np.random.default_rng(0)
    blank = toy_batch(rng, n=2)
    blank["label"][:] = IGNORE
    head = build_head(HeadConfig("linear", (11,), EMBED, CLASSES))
    opt, sched = make_optimizer(head, Schedule(warmup=0.0), 3)
    source = FeatureSource((11,), EMBED)
    train_epoch(head, source, [toy_batch(rng)], opt, sched, CPU)  # momentum to carry
    weights = {k: v.clone() for k, v in head.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's 'lr_scheduler.step() before optimizer.step()'
        stats = train_epoch(head, source, [blank, blank], opt, sched, CPU)
    assert math.isnan(stats["train_loss"]) and stats["loss_samples"] == 0 and stats["train_samples"] == 4
    for k, v in head.named_parameters():
        assert torch.equal(v, weights[k]), k
    assert sched.last_epoch == 3 and sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    fresh = build_head(HeadConfig("linear", (11,), EMBED, CLASSES))
    opt, sched = make_optimizer(fresh, Schedule(warmup=0.0), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_epoch(fresh, source, [blank, toy_batch(rng)], opt, sched, CPU)  # a blank first batch, too
    assert sched.last_epoch == 2


def test_epoch_loss_all_reduces_sums_so_an_empty_worker_adds_nothing():
    from pipeline.train.loop import epoch_loss, mean_loss

    busy = {"train_loss": 0.5, "train_samples": 6, "loss_sum": 2.0, "loss_samples": 4}
    empty = {"train_loss": float("nan"), "train_samples": 0, "loss_sum": 0.0, "loss_samples": 0}
    reduced = epoch_loss(busy, CPU) + epoch_loss(empty, CPU)  # what all_reduce(SUM) does
    assert mean_loss(reduced) == pytest.approx(0.5) and int(reduced[2]) == 6
    assert math.isnan(mean_loss(epoch_loss(empty, CPU)))


def test_parse_state_refuses_other_files():
    with pytest.raises(WeightsError, match="not a dinoseg training state") as e:
        parse_state({"state_dict": {}}, "s3://b/run/head.pt")
    assert "s3://b/run/head.pt" in str(e.value)
    with pytest.raises(WeightsError, match="not a dinoseg training state"):
        parse_state([1, 2], "x.pt")
    newer = torch.load(io.BytesIO(state_bytes({"epoch": 1})), weights_only=True)
    newer["version"] = STATE_VERSION + 1
    with pytest.raises(WeightsError, match="newer"):
        parse_state(newer, "x.pt")
