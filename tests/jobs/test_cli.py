"""The `dinoseg` command line: `models` lists every named model with its hub files; exit codes."""

from __future__ import annotations

import typer

from jobs.cli import main
from jobs.options import all_but, command
from model.backbone import BACKBONES
from model.dinotxt import NAME as DINOTXT
from model.weights import SEGMENTATION_MODELS, describe_models
from pipeline.segment import SegmentConfig


def rows(out: str) -> dict[str, str]:
    """`dinoseg models` output as {name: whole line}, header left out."""
    lines = out.splitlines()
    assert lines[0].startswith("name")
    return {line.split()[0]: line for line in lines[1:] if line.strip()}


def test_models_lists_every_backbone_and_segmentation_model(capsys):
    assert main(["models"]) == 0
    listed = rows(capsys.readouterr().out)
    assert len(BACKBONES) == 8 and len(SEGMENTATION_MODELS) == 16
    assert set(listed) == set(BACKBONES) | set(SEGMENTATION_MODELS) | {DINOTXT}
    for rel in (
        "dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth",  # dino.txt's backbone, then its own three files
        "dinov2_vitl14/dinov2_vitl14_reg4_dinotxt_tet1280d20h24l_vision_head.pth",
        "dinov2_vitl14/dinov2_vitl14_reg4_dinotxt_tet1280d20h24l_text_encoder.pth",
        "thirdparty/bpe_simple_vocab_16e6.txt.gz",
    ):
        assert rel in listed[DINOTXT]
    assert "dinov2_vits14/dinov2_vits14_pretrain.pth" in listed["dinov2_vits14"]
    assert "dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth" in listed["dinov2_vitg14_reg"]
    assert not any(name.endswith("_reg") for name in SEGMENTATION_MODELS)  # Meta released none


def test_each_segmentation_model_names_its_backbone_and_head_files(capsys):
    assert main(["models"]) == 0
    listed = rows(capsys.readouterr().out)
    line = listed["dinov2_vits14_voc2012_linear"]
    assert "dinov2_vits14/dinov2_vits14_pretrain.pth" in line
    assert "dinov2_vits14/dinov2_vits14_voc2012_linear_head.pth" in line
    assert "voc2012 (21)" in line
    for name, spec in SEGMENTATION_MODELS.items():
        m = spec.backbone
        assert f"{m}/{m}_pretrain.pth" in listed[name]
        assert f"{m}/{m}_{spec.dataset}_{spec.head}_head.pth" in listed[name]
        assert f"{spec.dataset} ({150 if spec.dataset == 'ade20k' else 21})" in listed[name]


def test_models_header_names_the_hub(capsys, monkeypatch):
    monkeypatch.setenv("DINOSEG_HUB", "s3://team-bucket/dinov2/")
    assert main(["models"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "(under s3://team-bucket/dinov2)" in header

    monkeypatch.delenv("DINOSEG_HUB")
    assert main(["models"]) == 0
    assert "(under https://dl.fbaipublicfiles.com/dinov2)" in capsys.readouterr().out.splitlines()[0]


def test_models_without_files(capsys):
    assert main(["models", "--no-files"]) == 0
    out = capsys.readouterr().out
    assert "dinov2_vits14_ade20k_ms" in out
    assert "_head.pth" not in out and "_pretrain.pth" not in out


def test_models_columns_line_up(capsys):
    assert main(["models"]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    by_name = {r["name"]: r for r in describe_models()}
    for line in lines:
        r = by_name[line.split()[0]]
        assert line.index(r["classes"], len(r["name"])) == header.index("classes"), line
        assert line.index(r["files"][0], len(r["name"])) == header.index("files"), line


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["no-such-command"]) == 2
    assert "no-such-command" in capsys.readouterr().err


def test_segment_options_become_one_config_that_pseudo_label_and_self_train_share():
    import inspect

    from jobs import pseudo_label, segment, self_train, train
    from jobs.options import run_command

    seen = {}
    typer_app = typer.Typer()
    typer_app.command()(
        command(
            "",
            [(SegmentConfig, all_but())],
            lambda values: seen.setdefault("config", SegmentConfig(**values)),
            lambda config: None,
        )
    )
    argv = ["in", "out", "--head", "h.pt", "--mode", "slide", "--confidence", "--storage-options", '{"anon": true}']
    assert run_command(typer_app, argv) == 0
    config = seen["config"]
    assert (config.model, config.mode, config.confidence, config.storage_options) == (None, "slide", 8, {"anon": True})
    assert run_command(typer_app, ["in", "out", "--mode", "sideways"]) == 2  # choices are checked by the command line
    shared = set(inspect.signature(segment.command).parameters) - {"masks", "rle", "overlays", "mean_confidence"}
    assert shared <= set(inspect.signature(pseudo_label.command).parameters)
    options = set(inspect.signature(self_train.command).parameters)
    assert set(inspect.signature(train.command).parameters) - {"resume", "overwrite"} <= options
    assert {"unlabeled", "rounds", "threshold", "class_balanced", "actors"} <= options
