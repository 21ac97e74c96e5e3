"""Head checkpoints: dinoseg's own format (round trips, safe loading, validation) and Meta's
mmseg head files (linear / ms detection, class maps, wrong widths)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.checkpoint import FORMAT, VERSION, HeadCheckpoint, parse_head_checkpoint, save_head_checkpoint
from model.classes import ClassMap, bundled, default_color
from model.errors import DinosegError, WeightsError
from model.heads import ConvHead, HeadConfig, LinearHead, build_head, default_layers
from model.hub import load_head


def class_map(n: int) -> ClassMap:
    return ClassMap(tuple(f"class-{i}" for i in range(n)), tuple(default_color(i) for i in range(n)), ignore_index=255)


def random_head_state(config: HeadConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A head's state dict with every tensor random (BatchNorm statistics included)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in build_head(config).state_dict().items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(1000 + seed)
        elif k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            out[k] = torch.randn(v.shape, generator=g)
    return out


def make_checkpoint(kind: str = "linear", num_classes: int = 3, seed: int = 0, **overrides) -> HeadCheckpoint:
    config = HeadConfig(kind, default_layers(kind, 12), 384, num_classes, hidden=32)
    fields = {
        "backbone": "dinov2_vits14",
        "config": config,
        "classes": class_map(num_classes),
        "state_dict": random_head_state(config, seed),
        "resolution": 448,
        "mean": (0.5, 0.4, 0.3),
        "std": (0.2, 0.25, 0.3),
        "meta": {"epochs": 4, "miou": 0.61, "data": "s3://labels/v2"},
    }
    fields.update(overrides)
    return HeadCheckpoint(**fields)


def assert_same_state(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    different = [k for k, v in expected.items() if not torch.equal(got[k], v)]
    assert not different, f"tensors differ: {different}"


def assert_same_checkpoint(got: HeadCheckpoint, expected: HeadCheckpoint) -> None:
    assert got.backbone == expected.backbone
    assert got.config == expected.config
    assert got.classes == expected.classes
    assert got.resolution == expected.resolution
    assert got.mean == pytest.approx(expected.mean) and got.std == pytest.approx(expected.std)
    assert got.meta == expected.meta
    assert_same_state(got.state_dict, expected.state_dict)


# --- dinoseg's own head checkpoint --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "ms", "conv"])
def test_local_round_trip(tmp_path, kind):
    ckpt = make_checkpoint(kind)
    path = tmp_path / "run" / "head.pt"  # the folder does not exist yet
    save_head_checkpoint(ckpt, str(path))
    assert sorted(p.name for p in path.parent.iterdir()) == ["head.pt"]  # no temporary file left

    obj = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    assert obj["format"] == FORMAT and obj["version"] == VERSION and obj["backbone"] == "dinov2_vits14"
    assert_same_checkpoint(parse_head_checkpoint(obj, str(path)), ckpt)

    loaded = load_head(str(path))
    assert isinstance(loaded.head, ConvHead if kind == "conv" else LinearHead)
    assert loaded.head.config == ckpt.config
    assert_same_state(loaded.head.state_dict(), ckpt.state_dict)
    assert loaded.classes == ckpt.classes
    assert loaded.backbone == "dinov2_vits14"
    assert loaded.resolution == 448
    assert loaded.mean == pytest.approx((0.5, 0.4, 0.3)) and loaded.std == pytest.approx((0.2, 0.25, 0.3))
    assert loaded.meta == ckpt.meta
    assert len(loaded.checksum) == 16


def test_file_url_round_trip(tmp_path):
    ckpt = make_checkpoint()
    url = f"file://{tmp_path}/head.pt"
    save_head_checkpoint(ckpt, url)
    assert (tmp_path / "head.pt").is_file()
    assert_same_state(load_head(url).head.state_dict(), ckpt.state_dict)


def test_s3_round_trip(tmp_path, s3_bucket):
    bucket, so = s3_bucket
    ckpt = make_checkpoint(num_classes=5)
    url = f"s3://{bucket}/runs/7/head.pt"
    save_head_checkpoint(ckpt, url, storage_options=so)

    loaded = load_head(url, storage_options=so)
    assert_same_state(loaded.head.state_dict(), ckpt.state_dict)
    assert loaded.classes == ckpt.classes and loaded.backbone == "dinov2_vits14" and loaded.resolution == 448

    local = tmp_path / "head.pt"
    save_head_checkpoint(ckpt, str(local))
    assert load_head(str(local)).checksum == loaded.checksum  # same weights, same checksum
    assert load_head(str(local), backbone="dinov2_vits14").checksum == loaded.checksum


def test_checksum_follows_the_weights(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    save_head_checkpoint(make_checkpoint(seed=1), str(a))
    save_head_checkpoint(make_checkpoint(seed=2), str(b))
    assert load_head(str(a)).checksum != load_head(str(b)).checksum


def test_head_for_another_backbone_names_both(tmp_path):
    path = tmp_path / "head.pt"
    save_head_checkpoint(make_checkpoint(), str(path))
    obj = torch.load(path, weights_only=True)
    with pytest.raises(WeightsError) as e:
        parse_head_checkpoint(obj, str(path), backbone="dinov2_vitb14")
    message = str(e.value)
    assert "trained on dinov2_vits14, not dinov2_vitb14" in message
    assert "--backbone dinov2_vits14" in message
    with pytest.raises(WeightsError, match="not dinov2_vitb14"):
        load_head(str(path), backbone="dinov2_vitb14")


def test_future_version_asks_to_upgrade(tmp_path):
    obj = make_checkpoint().to_dict()
    obj["version"] = 99
    path = tmp_path / "future.pt"
    torch.save(obj, path)
    with pytest.raises(WeightsError) as e:
        load_head(str(path))
    message = str(e.value)
    assert "version 99" in message and "upgrade dinoseg" in message


@pytest.mark.parametrize("declared", [3, 5])
def test_class_count_mismatch(declared):
    """Weights for 5 classes, a class map of 3 (declared as 3 or as 5 in the head config)."""
    config5 = HeadConfig("linear", (11,), 384, 5)
    ckpt = make_checkpoint(
        config=HeadConfig("linear", (11,), 384, declared),
        classes=class_map(3),
        state_dict=random_head_state(config5),
    )
    with pytest.raises(WeightsError) as e:
        parse_head_checkpoint(ckpt.to_dict(), "head.pt")
    message = str(e.value)
    assert f"head for 5 classes but names 3 and declares {declared}" in message


@pytest.mark.parametrize(
    "overrides",
    [
        {"meta": {"miou": np.float64(0.61), "epochs": np.int64(4)}},
        {"mean": np.array([0.5, 0.4, 0.3], dtype=np.float32)},
    ],
    ids=["numpy-meta", "numpy-mean"],
)
def test_a_head_file_dinoseg_writes_is_one_it_can_read(tmp_path, overrides):
    path = tmp_path / "head.pt"
    try:
        save_head_checkpoint(make_checkpoint(**overrides), str(path))
    except DinosegError:
        return  # refusing at save time, with a clear sentence, is fine too
    loaded = load_head(str(path))
    assert loaded.meta.get("miou", 0.61) == pytest.approx(0.61)
    assert loaded.mean == pytest.approx((0.5, 0.4, 0.3))


@pytest.mark.parametrize("damage", ["other-kind", "missing-key"])
def test_head_weights_that_do_not_fit_the_config_are_one_sentence(tmp_path, damage):
    if damage == "other-kind":  # 'ms' weights (1536 channels) under a 'linear' config
        ckpt = make_checkpoint(state_dict=random_head_state(HeadConfig("ms", (8, 9, 10, 11), 384, 3)))
    else:
        sd = dict(make_checkpoint().state_dict)
        del sd["bn.running_var"]
        ckpt = make_checkpoint(state_dict=sd)
    path = tmp_path / "head.pt"
    save_head_checkpoint(ckpt, str(path))
    with pytest.raises(WeightsError, match="head.pt"):
        load_head(str(path))


def test_damaged_checkpoint(tmp_path):
    obj = make_checkpoint().to_dict()
    del obj["state_dict"]
    with pytest.raises(WeightsError, match="damaged head checkpoint"):
        parse_head_checkpoint(obj, "head.pt")
    with pytest.raises(WeightsError, match="not a dinoseg head checkpoint"):
        parse_head_checkpoint({"state_dict": {}}, "head.pt")


# --- Meta's mmseg head files ----------------------------------------------------------------------


def mmseg_head(channels: int, num_classes: int = 21, seed: int = 0) -> dict:
    """The layout of Meta's *_head.pth: an mmseg checkpoint with a BNHead's decode_head."""
    g = torch.Generator().manual_seed(seed)
    return {
        "meta": {
            "mmseg_version": "0.27.0",
            "CLASSES": tuple(f"c{i}" for i in range(num_classes)),
            "PALETTE": [[i, i, i] for i in range(num_classes)],
            "iter": 40000,
        },
        "state_dict": {
            "decode_head.conv_seg.weight": torch.randn(num_classes, channels, 1, 1, generator=g),
            "decode_head.conv_seg.bias": torch.randn(num_classes, generator=g),
            "decode_head.bn.weight": torch.randn(channels, generator=g),
            "decode_head.bn.bias": torch.randn(channels, generator=g),
            "decode_head.bn.running_mean": torch.randn(channels, generator=g),
            "decode_head.bn.running_var": torch.rand(channels, generator=g) + 0.5,
            "decode_head.bn.num_batches_tracked": torch.tensor(40000),
        },
    }


def without_prefix(obj: dict) -> dict:
    return {k.removeprefix("decode_head."): v for k, v in obj["state_dict"].items()}


@pytest.mark.parametrize(("num_classes", "dataset"), [(21, "voc2012"), (150, "ade20k")])
def test_meta_linear_head(tmp_path, num_classes, dataset):
    obj = mmseg_head(384, num_classes)
    path = tmp_path / f"dinov2_vits14_{dataset}_linear_head.pth"
    torch.save(obj, path)
    loaded = load_head(str(path), backbone="dinov2_vits14")
    assert isinstance(loaded.head, LinearHead)
    assert loaded.head.config.kind == "linear" and loaded.head.config.layers == (11,)
    assert loaded.head.config.num_classes == num_classes
    assert loaded.classes == bundled(dataset)
    assert loaded.backbone == "dinov2_vits14"
    assert_same_state(loaded.head.state_dict(), without_prefix(obj))


def test_meta_ms_head_is_detected_from_its_width(tmp_path):
    obj = mmseg_head(4 * 384)  # ViT-S VOC ms: conv weight [21, 1536, 1, 1]
    path = tmp_path / "dinov2_vits14_voc2012_ms_head.pth"
    torch.save(obj, path)
    loaded = load_head(str(path), backbone="dinov2_vits14")
    assert loaded.head.config.kind == "ms"
    assert loaded.head.config.layers == (8, 9, 10, 11)
    assert loaded.head.config.in_channels == 1536
    assert loaded.classes == bundled("voc2012")
    assert_same_state(loaded.head.state_dict(), without_prefix(obj))


def test_meta_ms_head_of_a_deeper_backbone_reads_its_last_four_blocks(tmp_path):
    path = tmp_path / "dinov2_vitl14_ade20k_ms_head.pth"
    torch.save(mmseg_head(4 * 1024, 150), path)
    loaded = load_head(str(path), backbone="dinov2_vitl14")
    assert loaded.head.config.kind == "ms" and loaded.head.config.layers == (20, 21, 22, 23)


def test_meta_head_for_another_backbone_width(tmp_path):
    path = tmp_path / "dinov2_vitb14_voc2012_linear_head.pth"
    torch.save(mmseg_head(768), path)
    with pytest.raises(WeightsError) as e:
        load_head(str(path), backbone="dinov2_vits14")
    message = str(e.value)
    assert "expects 768-channel features" in message
    assert "gets 384 (1 x 384)" in message
    assert str(path) in message


def test_meta_head_of_the_wrong_kind(tmp_path):
    path = tmp_path / "dinov2_vits14_voc2012_linear_head.pth"
    torch.save(mmseg_head(384), path)
    with pytest.raises(WeightsError, match=r"expects 384-channel features but a 'ms' head on this backbone gets 1536"):
        load_head(str(path), backbone="dinov2_vits14", kind="ms")


def test_meta_head_without_backbone_asks_for_it(tmp_path):
    path = tmp_path / "dinov2_vits14_voc2012_linear_head.pth"
    torch.save(mmseg_head(384), path)
    with pytest.raises(WeightsError) as e:
        load_head(str(path))
    assert "pass --backbone" in str(e.value) and str(path) in str(e.value)


def test_file_that_is_no_head(tmp_path):
    path = tmp_path / "backbone.pth"
    torch.save({"blocks.0.norm1.weight": torch.ones(384)}, path)
    with pytest.raises(WeightsError, match="not a DINOv2 segmentation head"):
        load_head(str(path), backbone="dinov2_vits14")


def test_incomplete_meta_head(tmp_path):
    obj = mmseg_head(384)
    del obj["state_dict"]["decode_head.bn.running_var"]
    path = tmp_path / "partial_head.pth"
    torch.save(obj, path)
    with pytest.raises(WeightsError, match="lacks bn.running_var"):
        load_head(str(path), backbone="dinov2_vits14")
