"""Named constructors end to end: a hub in Meta's layout (random weights) -> Segmenter -> masks."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hubs import write_hub

from model.checkpoint import HeadCheckpoint, save_head_checkpoint
from model.classes import ClassMap, bundled
from model.errors import DinosegError, UnknownModelError
from model.heads import HeadConfig, LinearHead
from model.hub import RANDOM, build_segmenter, load_backbone
from model.segmenter import InferenceConfig

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub folder in Meta's layout with a random ViT-S/14 and its four VOC/ADE heads."""
    root = tmp_path_factory.mktemp("hub")
    names = [f"dinov2_vits14_{dataset}_{kind}" for dataset in ("voc2012", "ade20k") for kind in ("linear", "ms")]
    sd = write_hub(root, names)["dinov2_vits14"]
    return root, sd


@pytest.fixture
def env(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("DINOSEG_HUB", str(hub[0]))
    monkeypatch.setenv("DINOSEG_CACHE", str(tmp_path / "cache"))
    return hub


def photo(h=120, w=160):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1).astype(np.uint8)


def test_named_model_from_the_hub_predicts(env):
    _, sd = env
    seg = build_segmenter("dinov2_vits14_voc2012_linear", config=InferenceConfig(resolution=112))
    assert seg.classes == bundled("voc2012") and seg.layers == [11]
    for k, v in sd.items():
        assert torch.equal(seg.backbone.state_dict()[k], v)
    preds = seg.predict([photo(), photo(90, 70)])
    assert preds[0].mask.shape == (120, 160) and preds[1].mask.shape == (90, 70)
    assert preds[0].mask.max() < 21
    assert seg.model_id == "dinov2_vits14_voc2012_linear" and len(seg.head_checksum) == 16


def test_ms_model_reads_the_last_four_blocks(env):
    seg = build_segmenter("dinov2_vits14_ade20k_ms", config=InferenceConfig(resolution=56))
    assert seg.layers == [8, 9, 10, 11] and seg.num_classes == 150
    assert seg.predict([photo(60, 80)])[0].mask.shape == (60, 80)


def test_meta_head_file_with_explicit_backbone_weights(env, tmp_path, monkeypatch):
    root, _ = env
    monkeypatch.setenv("DINOSEG_HUB", str(tmp_path / "empty-hub"))  # nothing may come from the hub
    seg = build_segmenter(
        head=str(root / "dinov2_vits14" / "dinov2_vits14_voc2012_linear_head.pth"),
        backbone="dinov2_vits14",
        backbone_weights=str(root / "dinov2_vits14" / "dinov2_vits14_pretrain.pth"),
        config=InferenceConfig(resolution=56),
    )
    assert seg.num_classes == 21 and seg.predict([photo()])[0].mask.shape == (120, 160)


def test_dinoseg_head_checkpoint_names_its_backbone_and_resolution(env, tmp_path):
    classes = ClassMap(("bg", "thing", "stuff"), ((0, 0, 0), (255, 0, 0), (0, 255, 0)))
    head = LinearHead(HeadConfig("linear", (11,), 384, 3))
    path = str(tmp_path / "head.pt")
    save_head_checkpoint(HeadCheckpoint("dinov2_vits14", head.config, classes, head.state_dict(), resolution=224), path)
    seg = build_segmenter(head=path)
    assert seg.config.resolution == 224 and seg.classes == classes
    with pytest.raises(DinosegError, match="trained on dinov2_vits14, not dinov2_vitb14"):
        build_segmenter(head=path, backbone="dinov2_vitb14")


def test_random_backbone_needs_no_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOSEG_HUB", str(tmp_path / "nothing-here"))
    head = LinearHead(HeadConfig("linear", (11,), 384, 2))
    path = str(tmp_path / "h.pt")
    save_head_checkpoint(
        HeadCheckpoint("dinov2_vits14", head.config, ClassMap(("a", "b"), ((0, 0, 0), (1, 1, 1))), head.state_dict()),
        path,
    )
    seg = build_segmenter(head=path, backbone_weights=RANDOM, config=InferenceConfig(resolution=56))
    assert seg.predict([photo(30, 40)])[0].mask.shape == (30, 40)


def test_bad_model_choices_are_one_sentence(env):
    with pytest.raises(UnknownModelError, match="dinov2_vits14_voc2012_linear"):
        build_segmenter("dinov2_vits14_coco_linear")
    with pytest.raises(DinosegError, match="No model given"):
        build_segmenter()
    with pytest.raises(DinosegError, match="pass one"):
        build_segmenter("dinov2_vits14_voc2012_linear", head="x.pt")
    with pytest.raises(DinosegError, match="uses dinov2_vits14, not dinov2_vitl14"):
        build_segmenter("dinov2_vits14_voc2012_linear", backbone="dinov2_vitl14")


def test_readme_python_example_runs(env):
    """The README's Python API block runs as written (against the random-weights hub)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["mask"].shape == (480, 640) and namespace["confidence"].shape == (480, 640)
    assert namespace["meta_eval"].config.mode == "slide" and namespace["tta"].config.flip


def test_random_backbone_is_seeded_and_leaves_the_global_rng_alone():
    """The same random weights in every process (a head trained on them works at segment time),
    whatever the caller's RNG state, which the call does not disturb."""
    from model.hub import load_backbone

    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = load_backbone("dinov2_vits14", RANDOM).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(456)  # another global seed, as in another process
    expected_draw = torch.rand(3)
    torch.manual_seed(456)
    second = load_backbone("dinov2_vits14", RANDOM).state_dict()
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's random stream goes on as if untouched
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert first["blocks.0.attn.qkv.weight"].std() > 0  # random, not zeros


def test_loaded_weights_become_the_parameters_in_the_models_dtype(vits14_file, vits14_state_dict, tmp_path):
    """load_backbone builds the modules on the meta device and takes the loaded tensors as the
    parameters: every one is real (none left on meta), fp32 as the model declares them even from
    an fp16 file, equal to the file's values, and the model runs."""
    half = tmp_path / "half.pth"
    torch.save({k: v.half() for k, v in vits14_state_dict.items()}, half)
    for path, tolerance in ((vits14_file, 0.0), (half, 1e-3)):
        model = load_backbone("dinov2_vits14", str(path))
        params = dict(model.named_parameters())
        assert set(params) == set(vits14_state_dict)
        assert {p.device.type for p in params.values()} == {"cpu"}
        assert {p.dtype for p in params.values()} == {torch.float32}
        assert all(p.requires_grad for p in params.values())  # the model's own setting, as before
        worst = max(float((params[k].detach() - v).abs().max()) for k, v in vits14_state_dict.items())
        assert worst <= tolerance * max(1.0, max(float(v.abs().max()) for v in vits14_state_dict.values()))
        out = model.get_intermediate_layers(torch.zeros(1, 3, 28, 28), n=1)[0]
        assert out.shape == (1, 4, 384) and torch.isfinite(out).all()
