"""Labeling from words, end to end on a real local Ray: the README's commands as written (a text
head from names with a background floor, segment with it, segment --classes-text, a text head
from the synthetic class map, pseudo-label with it, self-train from it into a ViT-S/14 head).

The hub holds dino.txt's files with random weights (a small text tower, a vision head of ViT-L's
width), a random dinov2_vitl14_reg (in bfloat16, half the disk) and a random dinov2_vits14:
nothing means anything, every path is the real one."""

import json
import shlex
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import yaml
from dinotxt_files import TEXT, VISION, reference_tokenizer, write_dinotxt_hub
from hubs import write_backbone, write_hub
from PIL import Image
from readme import command, run_in_process
from test_readme import PHOTOS, write_photos

from model.classes import IGNORE_INDEX, load_class_map
from model.dinotxt import BACKBONE, DEFAULT_TEMPERATURE, NAME, NO_SCORE, text_encoder_from_state
from model.hub import load_backbone, load_head
from model.text_head import templates
from pipeline.io.masks import decode_mask_png

pytestmark = pytest.mark.slow

IMAGENET_TEMPLATES, CLIP7_TEMPLATES = 80, 7


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("text-hub")
    write_dinotxt_hub(root, dim=1024, width=64, layers=2)  # ViT-L's width, a small text tower (embed 2048)
    write_backbone(root, BACKBONE, seed=0, dtype=torch.bfloat16)
    write_hub(root, ["dinov2_vits14"])  # self-train's distillation target
    return root


@pytest.fixture
def weights(hub, monkeypatch):
    monkeypatch.setenv("DINOSEG_HUB", str(hub))
    return hub


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, ray_local):
    """./photos (3 small images), ./syn (labeled, with validation) and ./more (unlabeled), the
    last two made by the README's own commands."""
    root = tmp_path_factory.mktemp("words")
    write_photos(root / "photos")
    for prefix in ("./dinoseg synthetic ./syn", "./dinoseg synthetic ./more"):
        assert run_in_process(command(prefix), root) == 0
    return root


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def masks_of(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): decode_mask_png(p.read_bytes()) for p in sorted(folder.rglob("*.png"))}


def assert_photo_masks(out: Path, num_classes: int) -> dict[str, np.ndarray]:
    """A mask per photo, at the photo's size, of known classes; run.json's counts add up."""
    masks = masks_of(out / "masks")
    assert sorted(masks) == sorted(str(Path(rel).with_suffix(".png")) for rel in PHOTOS)
    for rel, (w, h, _) in PHOTOS.items():
        mask = masks[str(Path(rel).with_suffix(".png"))]
        assert mask.shape == (h, w) and int(mask.max()) < num_classes
    counts = json.loads((out / "run.json").read_text())["counts"]
    assert counts["inputs"] == counts["predicted"] + counts["skipped"] + counts["failed"] == len(PHOTOS)
    return masks


def test_models_lists_dino_txt(capsys):
    assert run_in_process(["./dinoseg", "models"], Path.cwd()) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(NAME)]
    assert len(rows) == 1 and "dinotxt" in rows[0] and "dinov2_vitl14_reg4_pretrain.pth" in rows[0]


def test_text_head_from_names_then_segment(workspace, weights, capsys):
    root = workspace

    # a head from four names; --background adds its class first, --floor scores only that class
    argv = command("./dinoseg text-head 'sky, road, car, person' ./words/street.pt")
    head_path = root / "words" / "street.pt"
    assert run_in_process(argv, root) == 0
    assert "text head for 5 classes" in capsys.readouterr().out
    head = load_head(str(head_path))
    names = ["background", "sky", "road", "car", "person"]
    assert head.head.config.kind == "text" and list(head.classes.names) == names
    assert head.backbone == BACKBONE == "dinov2_vitl14_reg"
    floor = float(argv[argv.index("--floor") + 1])
    assert head.head.floor.tolist() == pytest.approx([floor] + [NO_SCORE] * 4)
    assert head.head.scored.all() and head.head.embeddings.shape == (5, 1024)
    assert torch.allclose(head.head.embeddings.norm(dim=1), torch.ones(5), atol=1e-5)
    record = json.loads((root / "words" / "street.json").read_text())
    assert record["prompts"] == 5 * IMAGENET_TEMPLATES and record["classes"] == names
    assert record["background"] == "background" and record["backbone"] == BACKBONE
    assert head.meta["prompts"] == 5 * IMAGENET_TEMPLATES and head.meta["floor"] == floor

    # the same command again does not replace the head
    before = head_path.read_bytes(), head_path.stat().st_mtime_ns
    assert run_in_process(argv, root) == 2
    assert "--overwrite" in one_line_error(capsys)
    assert (head_path.read_bytes(), head_path.stat().st_mtime_ns) == before

    # the random ViT-L was saved in bf16: the model is fp32 all the same
    vit = load_backbone(BACKBONE)
    assert {p.dtype for p in vit.parameters()} == {torch.float32}
    del vit

    # segment with it as with any head: a mask per photo, at its size, one of the 5 classes
    argv = command("./dinoseg segment ./photos ./seg-street --head ./words/street.pt")
    assert run_in_process(argv, root) == 0
    assert_photo_masks(root / "seg-street", len(names))
    run = json.loads((root / "seg-street" / "run.json").read_text())
    assert run["counts"]["predicted"] == 3 and run["model"].startswith(BACKBONE + "+")
    assert [c["name"] for c in yaml.safe_load((root / "seg-street" / "classes.yaml").read_text())["classes"]] == names

    # --classes-text builds the head on the driver into OUTPUT/text_head.pt
    argv = command("./dinoseg segment ./photos ./seg-quick")
    out = root / "seg-quick"
    text = argv[argv.index("--classes-text") + 1]
    assert run_in_process(argv, root) == 0
    built = out / "text_head.pt"
    quick = load_head(str(built))
    assert list(quick.classes.names) == ["sky", "road", "car"] == [n.strip() for n in text.split(",")]
    assert quick.head.config.kind == "text" and quick.backbone == BACKBONE
    assert quick.meta["prompts"] == 3 * IMAGENET_TEMPLATES
    assert (quick.head.floor == NO_SCORE).all()  # no background named: every pixel gets its best class
    assert list(load_class_map(str(out / "classes.yaml")).names) == ["sky", "road", "car"]
    masks = assert_photo_masks(out, 3)

    # the same command resumes: every photo skipped, the head reused, not rebuilt
    mtime = built.stat().st_mtime_ns
    assert run_in_process(argv, root) == 0
    counts = json.loads((out / "run.json").read_text())["counts"]
    assert counts == {"inputs": 3, "predicted": 0, "skipped": 3, "failed": 0}
    assert built.stat().st_mtime_ns == mtime
    run_record = (out / "run.json").read_text()

    # other classes into the same OUTPUT: refused in one sentence, nothing of the run touched
    capsys.readouterr()
    other = argv[: argv.index("--classes-text") + 1] + ["sky, road"] + argv[argv.index("--classes-text") + 2 :]
    assert other != argv
    assert run_in_process(other, root) == 2, shlex.join(other)
    assert "--overwrite" in one_line_error(capsys)
    assert built.stat().st_mtime_ns == mtime and (out / "run.json").read_text() == run_record
    assert list(load_class_map(str(out / "classes.yaml")).names) == ["sky", "road", "car"]
    again = masks_of(out / "masks")
    assert again.keys() == masks.keys() and all(np.array_equal(again[k], masks[k]) for k in masks)


def test_text_head_from_the_class_map_pseudo_label_and_distil(workspace, weights, capsys):
    root = workspace
    syn = load_class_map(str(root / "syn" / "classes.yaml"))

    # a head for the synthetic set's classes, CLIP's 7 templates, at 112 px
    argv = command("./dinoseg text-head ./syn/classes.yaml ./words/head.pt")
    assert run_in_process(argv, root) == 0
    text_head = root / "words" / "head.pt"
    head = load_head(str(text_head))
    assert head.head.config.kind == "text" and head.backbone == BACKBONE
    assert list(head.classes.names) == list(syn.names)
    assert head.resolution == int(argv[argv.index("--resolution") + 1]) == 112
    record = json.loads((root / "words" / "head.json").read_text())
    assert record["prompts"] == CLIP7_TEMPLATES * len(syn) == head.meta["prompts"]
    assert record["background"] == "background"  # the class called so: scored by its prompts, no floor
    assert (head.head.floor == NO_SCORE).all()
    assert head.head.temperature.item() == pytest.approx(DEFAULT_TEMPERATURE)
    # the class embeddings, from the hub's files by the reference tokenizer and whole (uncut) prompts:
    # per class the mean of its prompts' normalised patch-aligned halves (the last 1024 of 2048)
    prompts = [t.replace("{}", name) for name in syn.names for t in templates("clip7")]
    encoder = text_encoder_from_state(torch.load(weights / TEXT, weights_only=True), TEXT)
    with torch.inference_mode():
        halves = F.normalize(encoder(reference_tokenizer()(prompts, context_length=77))[:, 1024:], dim=-1)
    expected = F.normalize(halves.reshape(len(syn), CLIP7_TEMPLATES, 1024).mean(dim=1), dim=-1)
    assert torch.allclose(head.head.embeddings, expected, atol=1e-5)
    vision = torch.load(weights / VISION, weights_only=True)
    assert all(torch.equal(head.head.state_dict()[k], v) for k, v in vision.items())

    # pseudo-label with it: masks of its classes or 255, the selection's counts add up
    argv = command("./dinoseg pseudo-label ./more/train/images ./pl-words")
    out = root / "pl-words"
    assert run_in_process(argv, root) == 0
    run = json.loads((out / "run.json").read_text())
    more = sorted((root / "more" / "train" / "images").glob("*.png"))
    assert run["model"]["inputs"] == run["model"]["predicted"] == len(more) == 24
    assert run["rule"] == {"rule": "class-balanced", "fraction": 0.5}
    c = run["counts"]
    assert c["images"] == 24 and c["failed"] == 0 and c["pairs"] + c["below_coverage"] == 24
    labels = pq.read_table(out / "labels").to_pylist()
    assert len(labels) == 24 and sum(r["selected"] for r in labels) == c["pairs"]
    pairs = pacsv.read_csv(out / "pairs.csv").to_pylist()
    assert len(pairs) == c["pairs"] > 0
    assert {p["image"] for p in pairs} <= {str(p) for p in more}
    masks = masks_of(out / "masks")
    assert len(masks) == 24 and {p["mask"] for p in pairs} <= {f"masks/{k}" for k in masks}
    values = set(np.unique(np.concatenate([m.ravel() for m in masks.values()])).tolist())
    assert values <= set(range(len(syn))) | {IGNORE_INDEX}
    assert IGNORE_INDEX in values and values - {IGNORE_INDEX}  # half kept per class: some sure, some not
    assert list(load_class_map(str(out / "classes.yaml")).names) == list(syn.names)
    selection = json.loads((out / "selection.json").read_text())
    assert selection["rule"] == "class-balanced" and len(selection["cutoffs"]) == len(syn)
    for image, mask in ((r["path"], decode_mask_png((out / "masks" / f"{r['key']}.png").read_bytes())) for r in labels):
        assert mask.shape == np.asarray(Image.open(image)).shape[:2]

    # self-train from it: round 0 is the text head, scored on the validation set; round 1
    # pseudo-labels ./more with it and trains a linear head on ViT-S/14 on those labels alone
    argv = command("./dinoseg self-train --start-head ./words/head.pt")
    out = root / argv[argv.index("--output") + 1]
    assert run_in_process(argv, root) == 0
    result = json.loads((out / "self_train.json").read_text())
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert rounds == result["rounds"] and [r["round"] for r in rounds] == [0, 1]
    r0, r1 = rounds
    assert r0["head"] == str(text_head) and r0["labeled_pairs"] == r0["pseudo_pairs"] == 0
    assert isinstance(r0["val_miou"], float) and 0 <= r0["val_miou"] <= 1
    assert not (out / "round-0" / "train").exists()  # the text head is round 0: nothing trained
    val = masks_of(out / "round-0" / "val" / "masks")
    assert len(val) == 16 and max(int(m.max()) for m in val.values()) < len(syn)
    pl_run = json.loads((out / "round-1" / "pseudo" / "run.json").read_text())
    assert pl_run["model"]["inputs"] == pl_run["model"]["predicted"] == 24
    assert r1["pseudo_head"] == head.checksum
    pairs = pacsv.read_csv(out / "round-1" / "pairs.csv").to_pylist()
    assert len(pairs) == r1["pseudo_pairs"] == pl_run["counts"]["pairs"] > 0
    assert all("round-1/pseudo/masks" in p["mask"] for p in pairs)
    student = load_head(r1["head"])
    assert r1["head"] == str(out / "round-1" / "train" / "head.pt")
    assert student.backbone == "dinov2_vits14" == argv[argv.index("--backbone") + 1]
    assert student.head.config.kind == "linear" and list(student.classes.names) == list(syn.names)
    assert isinstance(r1["val_miou"], float) and 0 <= r1["val_miou"] <= 1
    best = r1 if r1["val_miou"] > r0["val_miou"] else r0
    assert result["best_round"] == best["round"] and result["best_val_miou"] == best["val_miou"]
    assert (out / "head.pt").read_bytes() == Path(best["head"]).read_bytes()
    assert f"best: round {best['round']}" in capsys.readouterr().out


def test_classes_text_from_a_class_map_file_follows_its_content(workspace, weights, capsys):
    """`segment --classes-text` takes a class-map file as `text-head` does (not a README command:
    its argv is this test's). A re-run after the file changed names other classes, so the head
    built from its old content must not be reused (the README: "one built for other classes is
    replaced only with --overwrite")."""
    root = workspace
    path = root / "words" / "two.yaml"
    path.parent.mkdir(exist_ok=True)
    entries = [{"id": 0, "name": "sky", "color": [0, 0, 255]}, {"id": 1, "name": "road", "color": [128, 128, 128]}]
    path.write_text(yaml.safe_dump({"classes": entries}))
    out = root / "seg-file"
    argv = ["./dinoseg", "segment", "./photos/sub", "./seg-file", "--classes-text", "./words/two.yaml"]
    argv += ["--resolution", "112"]
    assert run_in_process(argv, root) == 0
    assert list(load_head(str(out / "text_head.pt")).classes.names) == ["sky", "road"]
    assert masks_of(out / "masks").keys() == {"b.png"}  # keys are relative to INPUT

    path.write_text(yaml.safe_dump({"classes": [*entries, {"id": 2, "name": "car", "color": [255, 0, 0]}]}))
    capsys.readouterr()
    code = run_in_process(argv, root)
    names = list(load_head(str(out / "text_head.pt")).classes.names)
    assert (code, names) != (0, ["sky", "road"]), "the re-run reused the head built from the file's old classes"
    assert code == 2 and "--overwrite" in one_line_error(capsys)
