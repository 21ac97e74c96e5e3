"""describe_segmenter: what build_segmenter reports, and every refusal it makes, without a backbone.

Each case builds the Segmenter too and compares: the description must equal the build's report
(classes, model id, head checksum, inference config, normalisation, backbone, head config), and
a bad name or file must be refused by both with the same exception and sentence.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hubs import write_hub

from model import backbone as backbone_module
from model import hub as hub_module
from model.backbone import BACKBONES, build_backbone
from model.checkpoint import HeadCheckpoint, save_head_checkpoint
from model.classes import ClassMap
from model.describe import backbone_shapes, check_backbone_weights, describe_segmenter
from model.dinotxt import TextHead, aligned_swiglu_hidden, text_config
from model.errors import DinosegError
from model.heads import HeadConfig, LinearHead, PrototypeHead, prototype_config, prototype_state
from model.hub import RANDOM, build_segmenter
from model.segmenter import META_MS_SCALES, InferenceConfig

CLASSES = ClassMap(("bg", "thing", "stuff"), ((0, 0, 0), (255, 0, 0), (0, 255, 0)))
VITS = "dinov2_vits14/dinov2_vits14_pretrain.pth"


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """A hub in Meta's layout: a random ViT-S/14 with its VOC linear and ADE ms heads."""
    root = tmp_path_factory.mktemp("hub")
    write_hub(root, ["dinov2_vits14_voc2012_linear", "dinov2_vits14_ade20k_ms"])
    return root


@pytest.fixture
def env(hub, monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("DINOSEG_HUB", str(hub))
    monkeypatch.setenv("DINOSEG_CACHE", str(tmp_path / "cache"))
    return hub


def save_head(path: Path, backbone: str, config: HeadConfig, state: dict, **fields) -> str:
    classes = ClassMap(tuple(f"c{i}" for i in range(config.num_classes)), ((0, 0, 0),) * config.num_classes)
    save_head_checkpoint(HeadCheckpoint(backbone, config, fields.pop("classes", classes), state, **fields), str(path))
    return str(path)


def linear_head(path: Path, backbone: str = "dinov2_vits14", **fields) -> str:
    dim, depth = BACKBONES[backbone].embed_dim, BACKBONES[backbone].depth
    head = LinearHead(HeadConfig("linear", (depth - 1,), dim, 3))
    return save_head(path, backbone, head.config, head.state_dict(), classes=CLASSES, **fields)


def reported(seg) -> dict:
    """What a built Segmenter reports, in the description's terms."""
    return {
        "model_id": seg.model_id,
        "classes": seg.classes,
        "head_checksum": seg.head_checksum,
        "config": seg.config,
        "mean": tuple((seg.mean / 255).flatten().tolist()),
        "std": tuple((seg.std / 255).flatten().tolist()),
        "backbone": seg.backbone.config.name,
        "head": seg.head.config,
    }


def described(d) -> dict:
    return {k: getattr(d, k) for k in ("model_id", "classes", "head_checksum", "config", "mean", "std", "backbone")} | {
        "head": d.head
    }


def refusal(call) -> tuple[type, str]:
    with pytest.raises(DinosegError) as e:
        call()
    return type(e.value), str(e.value)


def assert_same(**kwargs) -> None:
    """build_segmenter and describe_segmenter agree on these arguments: the same report."""
    seg = build_segmenter(device="cpu", **kwargs)
    d = describe_segmenter(**kwargs)
    assert described(d) == reported(seg)
    assert d.num_classes == seg.num_classes


def assert_same_refusal(**kwargs) -> str:
    build = refusal(lambda: build_segmenter(device="cpu", **kwargs))
    assert refusal(lambda: describe_segmenter(**kwargs)) == build
    return build[1]


# --- the architecture's shapes, from its config --------------------------------------------------


@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_shapes_are_the_modules_state_dict(name):
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_backbone(name).state_dict().items()}
    assert list(backbone_shapes(BACKBONES[name]).items()) == list(expected.items())


# --- the same report ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dinov2_vits14_voc2012_linear", "dinov2_vits14_ade20k_ms"])
def test_a_named_model_from_the_hub(env, name):
    assert_same(model=name, config=InferenceConfig(resolution=56))
    assert_same(model=name)  # the default resolution: the head's (512 for Meta's)


def test_a_meta_head_file_with_its_backbone_and_weights(env):
    head = str(env / "dinov2_vits14" / "dinov2_vits14_ade20k_ms_head.pth")
    assert_same(head=head, backbone="dinov2_vits14", backbone_weights=str(env / VITS))


def test_a_dinoseg_head_with_its_own_resolution_and_normalisation(env, tmp_path):
    head = linear_head(tmp_path / "head.pt", resolution=224, mean=(0.5, 0.45, 0.4), std=(0.2, 0.25, 0.3))
    assert_same(head=head, config=InferenceConfig(resolution=None, mode="slide", crop=224, stride=112))
    assert_same(head=head, config=InferenceConfig(flip=True, scales=META_MS_SCALES, precision="bf16"))
    assert describe_segmenter(head=head).config.resolution == 224


def test_a_prototype_head(env, tmp_path):
    config = prototype_config((10, 11), 384, 3, 2)
    state = prototype_state(torch.randn(3, 2, 768), torch.tensor([[True, False], [True, True], [False, False]]))
    assert set(state) == set(PrototypeHead(config).state_dict())
    assert_same(head=save_head(tmp_path / "protos.pt", "dinov2_vits14", config, state))


def test_a_text_head_on_a_random_register_backbone(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOSEG_HUB", str(tmp_path / "no-hub"))  # random weights need no file
    head = TextHead(text_config((11,), 384, 3, 2, aligned_swiglu_hidden(384)))
    path = save_head(tmp_path / "text.pt", "dinov2_vits14_reg", head.config, head.state_dict())
    assert_same(head=path, backbone_weights=RANDOM, config=InferenceConfig(resolution=28))


def test_nothing_of_the_backbone_is_built(env, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a backbone was built")

    monkeypatch.setattr(backbone_module.DinoVisionTransformer, "__init__", refuse)
    monkeypatch.setattr(hub_module, "load_backbone", refuse)
    d = describe_segmenter(model="dinov2_vits14_voc2012_linear")
    assert d.backbone == "dinov2_vits14" and d.num_classes == 21 and d.head.layers == (11,)
    check_backbone_weights("dinov2_vits14", str(env / VITS))


# --- the same refusals -------------------------------------------------------------------------


def test_names_and_options(env, tmp_path):
    head = linear_head(tmp_path / "head.pt")
    assert "dinov2_vits14_voc2012_linear" in assert_same_refusal(model="dinov2_vits14_coco_linear")
    assert "No model given" in assert_same_refusal()
    assert "pass one" in assert_same_refusal(model="dinov2_vits14_voc2012_linear", head=head)
    assert "not dinov2_vitl14" in assert_same_refusal(model="dinov2_vits14_voc2012_linear", backbone="dinov2_vitl14")
    assert "not dinov2_vitb14" in assert_same_refusal(head=head, backbone="dinov2_vitb14")
    assert "out of range" in assert_same_refusal(head=head, config=InferenceConfig(resolution=7))
    assert "Unknown precision" in assert_same_refusal(head=head, config=InferenceConfig(precision="fp8"))


def test_head_files(env, tmp_path):
    meta_head = str(env / "dinov2_vits14" / "dinov2_vits14_voc2012_linear_head.pth")
    assert "--backbone" in assert_same_refusal(head=meta_head)
    assert "made for this backbone" in assert_same_refusal(head=meta_head, backbone="dinov2_vitb14")
    bent = LinearHead(HeadConfig("linear", (11,), 384, 3)).state_dict()
    bent["conv_seg.bias"] = torch.zeros(3, 2)
    damaged = save_head(tmp_path / "bent.pt", "dinov2_vits14", HeadConfig("linear", (11,), 384, 3), bent)
    assert "do not fit the 'linear' head" in assert_same_refusal(head=damaged)
    assert "does not exist" in assert_same_refusal(head=str(tmp_path / "nope.pt"))
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    assert "PyTorch checkpoint" in assert_same_refusal(head=str(tmp_path / "text.pt"))


def test_a_head_that_does_not_fit_its_backbone(env, tmp_path):
    """A head file whose width or blocks its backbone does not have: refused at the start, not
    on every image of the run."""
    wide = LinearHead(HeadConfig("linear", (11,), 768, 3))
    path = save_head(tmp_path / "wide.pt", "dinov2_vits14", wide.config, wide.state_dict())
    assert "768-wide features" in assert_same_refusal(head=path, backbone_weights=RANDOM)
    deep = LinearHead(HeadConfig("linear", (12,), 384, 3))
    path = save_head(tmp_path / "deep.pt", "dinov2_vits14", deep.config, deep.state_dict())
    assert "blocks 0-11" in assert_same_refusal(head=path, backbone_weights=RANDOM)


def test_a_named_models_hub_file_for_other_classes(env, tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    (hub / "dinov2_vits14").mkdir(parents=True)
    (hub / VITS).symlink_to(env / VITS)
    voc = env / "dinov2_vits14" / "dinov2_vits14_voc2012_linear_head.pth"
    (hub / "dinov2_vits14" / "dinov2_vits14_ade20k_linear_head.pth").symlink_to(voc)  # 21 classes, not 150
    monkeypatch.setenv("DINOSEG_HUB", str(hub))
    assert "not the 150 of ade20k" in assert_same_refusal(model="dinov2_vits14_ade20k_linear")


def _truncated(path: Path, original: Path) -> None:
    data = original.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_weights(kind: str, path: Path, sd: dict, plain: Path) -> None:
    if kind == "truncated":
        _truncated(path, plain)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello world\n")
    elif kind == "tensor":
        torch.save(torch.ones(3), path)
    elif kind == "wrong shape":
        torch.save({**sd, "blocks.3.mlp.fc1.weight": torch.zeros(1000, 384)}, path)
    elif kind == "missing keys":
        torch.save({k: v for k, v in sd.items() if not k.startswith("blocks.11.")}, path)
    elif kind == "register model's":
        reg = build_backbone("dinov2_vits14_reg").state_dict()
        torch.save({k: torch.zeros(v.shape) for k, v in reg.items()}, path)
    else:
        raise ValueError(kind)


BAD = ["truncated", "empty", "text", "tensor", "wrong shape", "missing keys", "register model's"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_backbone_weights(env, tmp_path, vits14_state_dict, vits14_file, kind):
    path = tmp_path / "weights.pth"
    _bad_weights(kind, path, vits14_state_dict, vits14_file)
    message = assert_same_refusal(model="dinov2_vits14_voc2012_linear", backbone_weights=str(path))
    assert str(path) in message or "dinov2_vits14" in message


def test_a_missing_weights_file_and_plain_weights_for_a_register_model(env, tmp_path, vits14_file):
    assert "does not exist" in assert_same_refusal(
        model="dinov2_vits14_voc2012_linear", backbone_weights=str(tmp_path / "nope.pth")
    )
    head = linear_head(tmp_path / "reg.pt", "dinov2_vits14_reg")
    message = assert_same_refusal(head=head, backbone_weights=str(vits14_file))
    assert "look like dinov2_vits14 weights" in message


def _chunked(key: str, per: int = 3) -> str:
    """FSDP's layout of a block key: blocks.{chunk}.{global index}.…"""
    if not key.startswith("blocks."):
        return key
    _, i, rest = key.split(".", 2)
    return f"blocks.{int(i) // per}.{i}.{rest}"


@pytest.mark.parametrize("layout", ["teacher", "ddp-chunked"])
def test_training_layouts_are_accepted_by_both(env, tmp_path, vits14_state_dict, layout):
    if layout == "teacher":  # the backbone beside DINO's head
        obj = {"teacher": {**{f"backbone.{k}": v for k, v in vits14_state_dict.items()}, "dino_head.w": torch.ones(2)}}
    else:
        obj = {"state_dict": {f"module.backbone.{_chunked(k)}": v for k, v in vits14_state_dict.items()}, "epoch": 3}
    path = tmp_path / f"{layout}.pth"
    torch.save(obj, path)
    assert_same(model="dinov2_vits14_voc2012_linear", backbone_weights=str(path))


def test_remote_weights_are_fetched_as_the_build_fetches_them(env, tmp_path, vits14_file, http_server):
    """A URL is read through a temporary file, as the build reads it: the right file passes, a
    truncated download is refused in the build's sentence, and nothing stays in the cache."""
    served = tmp_path / "served"
    served.mkdir()
    (served / "good.pth").symlink_to(vits14_file)
    _truncated(served / "half.pth", vits14_file)
    server = http_server(served)
    assert_same(model="dinov2_vits14_voc2012_linear", backbone_weights=f"{server.url}/good.pth")
    message = assert_same_refusal(model="dinov2_vits14_voc2012_linear", backbone_weights=f"{server.url}/half.pth")
    assert "PyTorch checkpoint" in message
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name.startswith(".remote-")]
