"""Text heads (model.text_head): the rules that turn classes into prompts and a background class,
the request's digest, and build_text_head end to end on a small dino.txt hub (random weights in
Meta's layout): a head checkpoint of kind 'text' whose class embeddings are those of the text
tower, computed here directly."""

from __future__ import annotations

import json

import fsspec
import pytest
import torch
import torch.nn.functional as F
import yaml
from dinotxt_files import TEXT, VISION, VOCAB, text_encoder_state, write_dinotxt_hub

from model.checkpoint import parse_head_checkpoint, save_head_checkpoint
from model.dinotxt import (
    DEFAULT_TEMPERATURE,
    KIND,
    NAME,
    NO_SCORE,
    TextHead,
    text_encoder_from_state,
)
from model.errors import DinosegError, WeightsError
from model.heads import output_classes
from model.hub import load_head
from model.text_head import (
    TEMPLATE_SETS,
    TextHeadRequest,
    build_text_head,
    class_prompts,
    is_class_file,
    templates,
)
from model.tokenizer import ClipTokenizer

SMALL = "dinov2_vits14_reg"  # 384 wide: the width of write_dinotxt_hub's vision head


def one_sentence(message: str) -> bool:
    body = message.rstrip(".")
    return "\n" not in message and message.endswith(".") and ". " not in body.replace("e.g. ", "")


def refused(request: TextHeadRequest, *words: str) -> str:
    with pytest.raises(DinosegError) as e:
        class_prompts(request)
    message = str(e.value)
    assert one_sentence(message), message
    for word in words:
        assert word in message, message
    return message


def write_yaml(path, entries: list[dict]) -> str:
    path.write_text(yaml.safe_dump({"ignore_index": 255, "classes": entries}, sort_keys=False))
    return str(path)


# ---- templates -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "count"), [("imagenet", 80), ("clip7", 7), ("none", 1)])
def test_template_sets_give_their_number_of_prompts_per_class(name, count):
    assert name in TEMPLATE_SETS
    assert len(templates(name)) == count and all("{}" in t for t in templates(name))
    spec = class_prompts(TextHeadRequest("sky, traffic light", templates=name))
    assert [len(p) for p in spec.prompts] == [count, count]
    assert spec.prompts[1] == [t.replace("{}", "traffic light") for t in templates(name)]
    assert len(set(spec.prompts[0])) == count


def test_the_none_template_is_the_name_alone():
    spec = class_prompts(TextHeadRequest("sky, traffic light", templates="none"))
    assert spec.prompts == [["sky"], ["traffic light"]]


def test_clip_s_templates_start_as_clip_s_do():
    assert templates("imagenet")[0] == "a bad photo of a {}."
    assert templates("clip7")[0] == "itap of a {}."


def test_an_unknown_template_set_is_refused_in_one_sentence():
    with pytest.raises(DinosegError) as e:
        templates("openai")
    assert one_sentence(str(e.value)) and "imagenet" in str(e.value)


# ---- classes and the background ----------------------------------------------------------------


def test_a_comma_list_gives_classes_in_order_without_blanks():
    spec = class_prompts(TextHeadRequest(" sky, road ,car,, ", templates="none"))
    assert spec.classes.names == ("sky", "road", "car")
    assert len(spec.classes.colors) == 3 and len(set(spec.classes.colors)) == 3
    assert spec.background is None
    assert spec.prompts == [["sky"], ["road"], ["car"]]


def test_no_names_are_refused():
    refused(TextHeadRequest(" , ,"), "No class names")


def test_a_name_given_twice_is_refused():
    refused(TextHeadRequest("sky, road, sky"), "twice")


def test_a_class_map_file_gives_its_prompts_and_its_background(tmp_path):
    entries = [  # listed out of id order: prompts must follow their class, not the file's order
        {"id": 2, "name": "road", "color": [128, 64, 128]},
        {"id": 0, "name": "void", "color": [0, 0, 0], "background": True, "prompts": ["nothing.", "an empty scene."]},
        {"id": 1, "name": "sky", "color": [70, 130, 180], "prompts": ["the sky."]},
    ]
    spec = class_prompts(TextHeadRequest(write_yaml(tmp_path / "classes.yaml", entries), templates="clip7"))
    assert spec.classes.names == ("void", "sky", "road")
    assert spec.classes.colors == ((0, 0, 0), (70, 130, 180), (128, 64, 128))
    assert spec.background == 0
    assert spec.prompts[0] == ["nothing.", "an empty scene."]
    assert spec.prompts[1] == ["the sky."]
    assert spec.prompts[2] == [t.replace("{}", "road") for t in templates("clip7")]


def test_a_json_class_map_is_read_too(tmp_path):
    path = tmp_path / "classes.json"
    path.write_text(
        json.dumps({"classes": [{"id": 0, "name": "cat", "prompts": ["a cat."]}, {"id": 1, "name": "dog"}]})
    )
    spec = class_prompts(TextHeadRequest(str(path), templates="none"))
    assert spec.classes.names == ("cat", "dog") and spec.prompts == [["a cat."], ["dog"]]


def test_a_bundled_class_map_is_a_class_file():
    assert is_class_file("ade20k") and is_class_file("x.yaml") and is_class_file("s3://b/c.json")
    assert not is_class_file("sky, road") and not is_class_file("sky")
    ade = class_prompts(TextHeadRequest("ade20k", templates="none"))
    assert len(ade.classes) == 150 and ade.background is None and ade.prompts[0] == ["wall"]
    voc = class_prompts(TextHeadRequest("voc2012", templates="none"))
    assert len(voc.classes) == 21 and voc.background == 0  # VOC's class 0 is called background


def test_background_name_is_prepended_to_a_list_that_lacks_it():
    spec = class_prompts(TextHeadRequest("sky, road", templates="none", background="nothing"))
    assert spec.classes.names == ("nothing", "sky", "road")
    assert spec.background == 0 and spec.prompts[0] == ["nothing"]


def test_background_name_already_in_the_list_stays_where_it_is():
    spec = class_prompts(TextHeadRequest("sky, unlabeled, road", templates="none", background="unlabeled"))
    assert spec.classes.names == ("sky", "unlabeled", "road") and spec.background == 1


def test_background_name_must_be_in_a_class_map(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", [{"id": 0, "name": "sky"}, {"id": 1, "name": "road"}])
    refused(TextHeadRequest(path, background="void"), "void", "not one of the classes")


@pytest.mark.parametrize("name", ["background", "Background", "BACKGROUND"])
def test_a_class_named_background_is_the_background(name):
    spec = class_prompts(TextHeadRequest(f"sky, {name}, road", templates="none"))
    assert spec.background == 1


def test_a_flagged_class_wins_over_one_named_background(tmp_path):
    entries = [{"id": 0, "name": "background"}, {"id": 1, "name": "void", "background": True}]
    spec = class_prompts(TextHeadRequest(write_yaml(tmp_path / "c.yaml", entries)))
    assert spec.background == 1


def test_two_background_flags_are_refused(tmp_path):
    entries = [
        {"id": 0, "name": "void", "background": True},
        {"id": 1, "name": "sky"},
        {"id": 2, "name": "unlabeled", "background": True},
    ]
    refused(TextHeadRequest(write_yaml(tmp_path / "c.yaml", entries)), "2 classes as background")


def test_a_floor_without_a_background_class_is_refused():
    refused(TextHeadRequest("sky, road", floor=0.2), "--floor", "--background")


@pytest.mark.parametrize("floor", [1.5, -1.01, float("nan"), float("inf")])
def test_a_floor_outside_minus_one_to_one_is_refused(floor):
    refused(TextHeadRequest("background, sky", floor=floor), "[-1, 1]")


@pytest.mark.parametrize("floor", [-1.0, 0.0, 0.25, 1.0])
def test_a_floor_inside_minus_one_to_one_is_taken(floor):
    assert class_prompts(TextHeadRequest("background, sky", floor=floor)).background == 0


def test_empty_prompts_need_a_floor_and_a_background(tmp_path):
    entries = [{"id": 0, "name": "void", "background": True, "prompts": []}, {"id": 1, "name": "sky"}]
    path = write_yaml(tmp_path / "c.yaml", entries)
    refused(TextHeadRequest(path), "'void' has no prompts", "--floor")
    spec = class_prompts(TextHeadRequest(path, floor=0.1, templates="none"))
    assert spec.prompts == [[], ["sky"]] and spec.background == 0
    # a class that is not the background is never scored by the floor alone
    entries = [{"id": 0, "name": "void", "background": True}, {"id": 1, "name": "sky", "prompts": []}]
    refused(TextHeadRequest(write_yaml(tmp_path / "d.yaml", entries), floor=0.1), "'sky' has no prompts")


@pytest.mark.parametrize("prompts", ["a photo of the sky.", [""], ["ok", 3], {"a": 1}])
def test_prompts_that_are_not_a_list_of_texts_are_refused(prompts, tmp_path):
    entries = [{"id": 0, "name": "sky", "prompts": prompts}, {"id": 1, "name": "road"}]
    refused(TextHeadRequest(write_yaml(tmp_path / "c.yaml", entries)), "'sky'", "prompts")


def test_a_file_that_is_not_a_class_map_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(DinosegError) as e:
        class_prompts(TextHeadRequest(str(path)))
    assert "\n" not in str(e.value)


# ---- the digest ------------------------------------------------------------------------------


def test_the_digest_names_the_request():
    base = TextHeadRequest("sky, road")
    assert base.digest() == TextHeadRequest("sky, road").digest()
    assert len(base.digest()) == 16 and int(base.digest(), 16) >= 0
    others = [
        TextHeadRequest("sky, car"),
        TextHeadRequest("road, sky"),
        TextHeadRequest("sky, road", templates="clip7"),
        TextHeadRequest("sky, road", templates="none"),
        TextHeadRequest("sky, road", background="background"),
        TextHeadRequest("sky, road", background="background", floor=0.2),
        TextHeadRequest("sky, road", background="background", floor=0.3),
        TextHeadRequest("sky, road", temperature=0.05),
        TextHeadRequest("sky, road", backbone=SMALL),
        TextHeadRequest("sky, road", resolution=224),
    ]
    digests = [r.digest() for r in others]
    assert base.digest() not in digests
    assert len(set(digests)) == len(digests)


def test_the_digest_follows_a_class_map_edited_in_place(tmp_path):
    """segment --classes-text FILE reuses OUTPUT/text_head.pt when the digest matches: editing
    the file's prompts must change it, or the stale head would be reused."""
    path = tmp_path / "classes.yaml"
    path.write_text("classes:\n- {id: 0, name: sky, prompts: [the sky]}\n- {id: 1, name: road}\n")
    before = TextHeadRequest(str(path)).digest()
    path.write_text("classes:\n- {id: 0, name: sky, prompts: [a blue sky]}\n- {id: 1, name: road}\n")
    assert TextHeadRequest(str(path)).digest() != before


# ---- build_text_head end to end ----------------------------------------------------------------


@pytest.fixture
def small_hub(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    written = write_dinotxt_hub(hub)
    monkeypatch.setenv("DINOSEG_HUB", str(hub))
    return hub, written


def direct_class_embeddings(text_sd: dict, hub, prompts: list[list[str]], dim: int) -> torch.Tensor:
    """Each class: its prompts at the full context through the tower, the patch-aligned half
    (the last `dim`), normalised, averaged, normalised; a zero row for a class without prompts."""
    encoder = text_encoder_from_state(text_sd, "text.pth")
    tokenizer = ClipTokenizer(hub / VOCAB)
    rows = []
    for class_prompts_ in prompts:
        if not class_prompts_:
            rows.append(torch.zeros(dim))
            continue
        with torch.no_grad():
            emb = encoder(tokenizer(class_prompts_))
        rows.append(F.normalize(F.normalize(emb[:, dim:], dim=-1).mean(0), dim=0))
    return torch.stack(rows)


def test_build_text_head_end_to_end(small_hub):
    hub, written = small_hub
    request = TextHeadRequest("background, sky, traffic light", templates="clip7", floor=0.15, backbone=SMALL)
    ckpt = build_text_head(request, device="cpu", batch_size=5)
    assert ckpt.backbone == SMALL
    assert ckpt.config.kind == KIND == "text"
    assert ckpt.config.layers == (11,) and ckpt.config.embed_dim == 384 and ckpt.config.num_classes == 3
    assert ckpt.config.extra == {"blocks": 2, "hidden": 1024}
    assert ckpt.classes.names == ("background", "sky", "traffic light")
    sd = ckpt.state_dict
    assert output_classes(sd) == 3
    emb = sd["embeddings"]
    assert emb.shape == (3, 384) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    spec = class_prompts(request)
    expected = direct_class_embeddings(written[TEXT], hub, spec.prompts, 384)
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-5)
    assert sd["scored"].tolist() == [True, True, True]
    assert sd["floor"].tolist() == pytest.approx([0.15, NO_SCORE, NO_SCORE])
    assert float(sd["temperature"]) == pytest.approx(DEFAULT_TEMPERATURE)
    for k, v in written[VISION].items():  # the vision head's weights, unchanged
        assert torch.equal(sd[k], v), k
    assert ckpt.meta["request"] == request.digest()
    assert ckpt.meta["dinotxt"] == NAME and ckpt.meta["prompts"] == 21 and ckpt.meta["templates"] == "clip7"
    assert ckpt.meta["background"] == "background" and ckpt.meta["floor"] == 0.15
    assert ckpt.resolution == request.resolution
    # written and read back as any head: a TextHead
    head = parse_head_checkpoint(ckpt.to_dict(), "head.pt", SMALL).build()
    assert isinstance(head, TextHead)
    torch.testing.assert_close(head.embeddings, emb)


def test_a_head_of_class_map_prompts_with_a_floor_only_background(small_hub, tmp_path):
    hub, written = small_hub
    entries = [
        {"id": 0, "name": "void", "background": True, "prompts": []},
        {"id": 1, "name": "sky", "prompts": ["the sky.", "a photo of the sky."]},
        {"id": 2, "name": "road"},
    ]
    request = TextHeadRequest(
        write_yaml(tmp_path / "c.yaml", entries), templates="none", floor=-0.05, temperature=0.07, backbone=SMALL
    )
    ckpt = build_text_head(request, device="cpu")
    sd = ckpt.state_dict
    assert ckpt.classes.names == ("void", "sky", "road")
    assert sd["scored"].tolist() == [False, True, True]
    assert torch.equal(sd["embeddings"][0], torch.zeros(384))
    torch.testing.assert_close(sd["embeddings"][1:].norm(dim=-1), torch.ones(2))
    expected = direct_class_embeddings(written[TEXT], hub, [[], ["the sky.", "a photo of the sky."], ["road"]], 384)
    torch.testing.assert_close(sd["embeddings"], expected, atol=1e-5, rtol=1e-5)
    assert sd["floor"].tolist() == pytest.approx([-0.05, NO_SCORE, NO_SCORE])
    assert float(sd["temperature"]) == pytest.approx(0.07)
    assert ckpt.meta["prompts"] == 3 and ckpt.meta["request"] == request.digest()


def test_without_a_floor_every_class_has_no_floor(small_hub):
    ckpt = build_text_head(TextHeadRequest("background, sky", templates="none", backbone=SMALL), device="cpu")
    assert ckpt.state_dict["floor"].tolist() == [NO_SCORE, NO_SCORE]
    assert ckpt.meta["background"] == "background" and ckpt.meta["floor"] is None


def test_a_saved_text_head_loads_as_a_head(small_hub, tmp_path):
    ckpt = build_text_head(TextHeadRequest("sky, road", templates="none", backbone=SMALL), device="cpu")
    path = tmp_path / "head.pt"
    save_head_checkpoint(ckpt, str(path))
    loaded = load_head(str(path))
    assert isinstance(loaded.head, TextHead) and loaded.backbone == SMALL
    assert loaded.classes.names == ("sky", "road") and loaded.meta["request"] == ckpt.meta["request"]


def test_a_vision_head_narrower_than_the_backbone_is_refused_in_one_sentence(small_hub):
    with pytest.raises(WeightsError) as e:
        build_text_head(TextHeadRequest("sky, road", templates="none"), device="cpu")  # dinov2_vitl14_reg
    message = str(e.value)
    assert one_sentence(message), message
    assert "384" in message and "1024" in message and "dinov2_vitl14_reg" in message


def test_a_text_encoder_of_another_width_is_refused_in_one_sentence(small_hub, tmp_path):
    other = tmp_path / "other_text_encoder.pth"
    torch.save(text_encoder_state(width=128, layers=1, embed=512), other)
    request = TextHeadRequest("sky, road", templates="none", backbone=SMALL, text_encoder=str(other))
    with pytest.raises(WeightsError) as e:
        build_text_head(request, device="cpu")
    message = str(e.value)
    assert one_sentence(message), message
    assert str(other) in message and "512" in message


def test_the_files_may_be_given_as_urls(small_hub):
    """../shared/DESIGN.md, Conventions: every path argument accepts a local path or any fsspec URL
    (memory:// here), the vocabulary included (ClipTokenizer opens it through fsspec)."""
    hub, _ = small_hub
    for rel in (VISION, TEXT, VOCAB):
        with fsspec.open(f"memory://dinotxt-urls/{rel}", "wb") as f:
            f.write((hub / rel).read_bytes())
    request = TextHeadRequest(
        "sky, road",
        templates="none",
        backbone=SMALL,
        vision_head=f"memory://dinotxt-urls/{VISION}",
        text_encoder=f"memory://dinotxt-urls/{TEXT}",
        vocabulary=f"memory://dinotxt-urls/{VOCAB}",
    )
    try:
        ckpt = build_text_head(request, device="cpu")
    finally:
        fsspec.filesystem("memory").rm("/dinotxt-urls", recursive=True)
    assert ckpt.classes.names == ("sky", "road")
    torch.testing.assert_close(ckpt.state_dict["embeddings"].norm(dim=-1), torch.ones(2))
