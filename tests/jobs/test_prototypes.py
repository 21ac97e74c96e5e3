"""Labeling from a few examples and discovering classes, end to end on a real local Ray: the
README's commands as written (prototypes from masks and from points, segment with them,
self-train from a prototype head; discover, name the clusters, segment with the named head)."""

import json

import numpy as np
import pyarrow.csv as pacsv
import pytest
import yaml
from PIL import Image
from readme import command, run_in_process

from model.hub import load_head
from pipeline.io.masks import decode_mask_png

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, ray_local):
    """./syn (labeled, with validation), ./more (unlabeled) and ./few (8 labeled images and their
    clicks), made by the README's own commands."""
    root = tmp_path_factory.mktemp("few")
    for prefix in ("./dinoseg synthetic ./syn", "./dinoseg synthetic ./more"):
        assert run_in_process(command(prefix), root) == 0
    assert run_in_process(command("./dinoseg synthetic ./few"), root) == 0
    return root


def test_prototypes_from_masks_and_points_segment_and_self_train(workspace, capsys):
    root = workspace
    few = sorted(p.name for p in (root / "few" / "train" / "images").glob("*.png"))
    assert len(few) == 8

    # from masks: one prototype set per class, every class seen, the record beside the head
    assert run_in_process(command("./dinoseg prototypes ./few/train/images ./few/train/masks"), root) == 0
    table = capsys.readouterr().out
    assert "images: 8 labeled, 0 problems" in table
    record = json.loads((root / "proto" / "head.json").read_text())
    assert record["images"] == 8 and record["missing"] == [] and record["problems"] == []
    head = load_head(str(root / "proto" / "head.pt"))
    assert head.head.config.kind == "prototype" and head.head.prototypes.shape[:2] == (5, 4)
    assert head.resolution == 112 and list(head.classes.names) == [r["class"] for r in record["per_class"]]
    # the feature cache is train's: a folder named by backbone, weights, resolution and layers
    assert (root / "proto" / "cache" / "dinov2_vits14-random-r112-l11").is_dir()

    # from points: the clicks become sparse masks (255 but for small discs) of the images' sizes
    assert run_in_process(command("./dinoseg prototypes ./few/train/images ./few/train/points.csv"), root) == 0
    points = pacsv.read_csv(root / "few" / "train" / "points.csv").to_pylist()
    sparse = root / "proto-points" / "point-masks"
    for name in few:
        mask = decode_mask_png((sparse / name).read_bytes())
        assert mask.shape == np.asarray(Image.open(root / "few" / "train" / "images" / name)).shape[:2]
        assert 0 < (mask != 255).mean() < 0.5
        for p in (p for p in points if p["image"] == name):
            assert mask[int(p["y"]), int(p["x"])] != 255
    by_points = json.loads((root / "proto-points" / "head.json").read_text())
    assert by_points["missing"] == [] and by_points["images"] == 8
    # fewer labeled patches than the full masks give, for every class
    for full, clicked in zip(record["per_class"], by_points["per_class"], strict=True):
        assert 0 < clicked["patches"] < full["patches"]

    # segment with the prototype head: every input accounted for, masks of known classes only
    argv = command("./dinoseg segment ./syn/val/images ./seg-proto")
    assert run_in_process(argv, root) == 0
    run = json.loads((root / "seg-proto" / "run.json").read_text())
    assert run["counts"]["inputs"] == run["counts"]["predicted"] == 16 and run["counts"]["failed"] == 0
    masks = [decode_mask_png(p.read_bytes()) for p in sorted((root / "seg-proto" / "masks").glob("*.png"))]
    assert len(masks) == 16 and all(m.max() < 5 for m in masks)
    assert (
        run_in_process(
            ["./dinoseg", "evaluate", "./seg-proto/masks", "./syn/val/masks", "--classes", "./syn/classes.yaml"], root
        )
        == 0
    )
    proto_miou = json.loads((root / "seg-proto" / "masks" / "evaluation.json").read_text())["miou"]
    assert proto_miou > 0.4  # chance is about 0.2; 8 labeled images, no training (RESULTS.md: ~0.65)

    # self-train from the prototype head: round 0 is that head, scored as evaluate scores it;
    # round 1 pseudo-labels ./more with it and trains a linear head on those pairs alone
    argv = command("./dinoseg self-train --start-head ./proto/head.pt")
    assert run_in_process(argv, root) == 0
    out = root / "st-proto"
    result = json.loads((out / "self_train.json").read_text())
    r0, r1 = result["rounds"]
    assert r0["head"].endswith("proto/head.pt") and r0["labeled_pairs"] == 0 and r0["pseudo_pairs"] == 0
    assert r0["val_miou"] == pytest.approx(proto_miou, abs=1e-9)
    assert not (out / "round-0" / "train").exists()  # nothing trained in round 0
    pl_run = json.loads((out / "round-1" / "pseudo" / "run.json").read_text())
    assert pl_run["model"]["inputs"] == pl_run["model"]["predicted"] == 24
    pairs = pacsv.read_csv(out / "round-1" / "pairs.csv").to_pylist()
    assert len(pairs) == r1["pseudo_pairs"] == pl_run["counts"]["pairs"] > 0
    assert all("round-1/pseudo/masks" in p["mask"] for p in pairs)
    trained = json.loads((out / "round-1" / "train" / "train.json").read_text())
    assert trained["counts"]["train_pairs"] == len(pairs) and trained["counts"]["val_pairs"] == 16
    assert 0 <= r1["val_miou"] <= 1
    best = max(result["rounds"], key=lambda r: r["val_miou"])
    assert result["best_round"] == best["round"]
    best_head = r0["head"] if best["round"] == 0 else str(out / "round-1" / "train" / "head.pt")
    assert (out / "head.pt").read_bytes() == open(best_head, "rb").read()


def test_discover_name_the_clusters_and_segment(workspace, capsys):
    root = workspace
    argv = command("./dinoseg discover ./more/train/images ./clusters")
    k = int(argv[argv.index("--clusters") + 1])
    assert run_in_process(argv, root) == 0
    assert "dinoseg prototypes --from-clusters" in capsys.readouterr().out
    info = json.loads((root / "clusters" / "discover.json").read_text())
    assert info["images"] == 24 and info["problems"] == 0 and info["patches"] == 24 * 64
    assert len(info["clusters"]) == k and sum(c["patch_share"] for c in info["clusters"]) == pytest.approx(1, abs=1e-3)
    assert len({tuple(c["color"]) for c in info["clusters"]}) == k
    for sheet in info["sheets"]:
        with Image.open(sheet) as img:
            assert img.format == "JPEG" and img.width > 0
    assert len(info["sheets"]) == k
    # the same seed finds the same clusters
    head = load_head(str(root / "clusters" / "head.pt"))
    assert head.head.prototypes.shape == (k, 1, 384)
    assert run_in_process(argv[:3] + ["./clusters-again"] + argv[4:], root) == 0
    again = load_head(str(root / "clusters-again" / "head.pt"))
    assert np.allclose(again.head.prototypes.numpy(), head.head.prototypes.numpy(), atol=1e-5)

    # a person names the clusters: two of them are one class, the last is dropped
    path = root / "clusters" / "classes.yaml"
    data = yaml.safe_load(path.read_text())
    entries = data["classes"]
    entries[0]["name"] = "background"
    entries[1]["name"] = entries[2]["name"] = "shape"
    data["classes"] = entries[:-1]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert run_in_process(command("./dinoseg prototypes --from-clusters ./clusters"), root) == 0
    named = load_head(str(root / "named" / "head.pt"))
    names = list(named.classes.names)
    assert names[:2] == ["background", "shape"] and len(names) == k - 2
    assert named.head.prototypes.shape[:2] == (k - 2, 2)
    assert np.allclose(named.head.prototypes[1].numpy(), head.head.prototypes[1:3, 0].numpy())
    assert named.head.valid.sum().item() == k - 1

    assert run_in_process(command("./dinoseg segment ./more/train/images ./seg-named"), root) == 0
    run = json.loads((root / "seg-named" / "run.json").read_text())
    assert run["counts"]["predicted"] == 24 and run["counts"]["failed"] == 0
    masks = [decode_mask_png(p.read_bytes()) for p in (root / "seg-named" / "masks").glob("*.png")]
    assert max(int(m.max()) for m in masks) < len(names)
