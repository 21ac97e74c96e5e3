"""A class map's ignore index, honoured wherever training reads labels: masks whose 0 means
unlabeled (classes 1..K, `ignore_index: 0`) or whose ignore index is another value become the
same 0-based labels with 255 = ignore, once, as they are read, and the ignored pixels are never
learned as a class."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from pair_samples import batch, photo
from PIL import Image

from model.classes import IGNORE_INDEX, ClassMap
from model.errors import DinosegError
from model.geometry import PATCH_SIZE
from model.heads import HeadConfig, build_head
from pipeline.features.cache import CachedSamples, SampleConfig
from pipeline.features.pairs import DecodePair, PairConfig, ReadPair, decode_label
from pipeline.train.training import FeatureSource, Schedule, make_optimizer, to_tensors, train_epoch, validate

# raw-ADE20K style: 0 is unlabeled, the classes are 1 and 2
ZERO_UNLABELED = ClassMap.from_dict(
    {"ignore_index": 0, "classes": [{"id": 1, "name": "road"}, {"id": 2, "name": "car"}]}
)


def png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, "PNG")  # uint8: mode L, uint16: I;16
    return buf.getvalue()


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and ". " not in message.rstrip(".")


# ---- decoding: the map's values become training labels once ----------------------------------


def test_zero_unlabeled_masks_decode_to_zero_based_labels_with_255_ignore():
    mask = np.array([[0, 1], [2, 0]], np.uint8)
    c = ZERO_UNLABELED
    label = decode_label(png(mask), len(c), ignore_index=c.ignore_index, first_id=c.first_id)
    assert label.dtype == np.uint8 and label.tolist() == [[IGNORE_INDEX, 0], [1, IGNORE_INDEX]]
    # 255 is not this map's ignore index, and 3 is no class: refused in one sentence, never guessed
    for stray in (255, 3):
        with pytest.raises(DinosegError, match=f"class {stray}") as e:
            decode_label(png(np.array([[1, stray]], np.uint8)), 2, ignore_index=0, first_id=1)
        assert "0 = ignore" in str(e.value) and one_sentence(str(e.value))


def test_another_ignore_index_is_mapped_and_255_is_then_a_stray_value():
    label = decode_label(png(np.array([[0, 100], [2, 1]], np.uint8)), 3, ignore_index=100)
    assert label.tolist() == [[0, IGNORE_INDEX], [2, 1]]
    with pytest.raises(DinosegError, match="class 255"):
        decode_label(png(np.array([[0, 255]], np.uint8)), 3, ignore_index=100)
    # a 16-bit mask whose ignore index is 65535 (the default past 255 classes)
    label = decode_label(png(np.array([[65535, 1]], np.uint16)), 3, ignore_index=65535)
    assert label.tolist() == [[IGNORE_INDEX, 1]]


def test_decode_pair_reads_masks_in_the_class_maps_values(tmp_path):
    image, mask = tmp_path / "a.png", tmp_path / "a-mask.png"
    Image.fromarray(photo(4, 6)).save(image)
    values = np.zeros((4, 6), np.uint8)
    values[:, 2:4], values[:, 4:] = 1, 2
    mask.write_bytes(png(values))
    rows = [(str(image), str(mask))]
    out = DecodePair(PairConfig.of(ZERO_UNLABELED))(ReadPair()(batch(rows)))
    assert list(out["error_stage"]) == [""]
    expected = np.where(values == 0, IGNORE_INDEX, values.astype(int) - 1)
    assert np.array_equal(out["label"][0], expected)
    # read as a map in dinoseg's own values, the same mask is refused rather than trained wrongly
    wrong = DecodePair(PairConfig(2))(ReadPair()(batch(rows)))
    assert wrong["error_stage"][0] == "mask" and "class 2" in wrong["error_message"][0]


# ---- training: the ignored region is not learned -------------------------------------------


def cached_pair(tmp_path: Path, name: str, left, right, values: tuple[int, int]) -> tuple[dict, str]:
    """A cache row of one row of two patches (features `left`, `right`) and its mask: the left
    patch holds mask value values[0], the right one values[1]."""
    feats = np.stack([left, right], axis=-1)[:, None, :].astype(np.float16)  # (C, 1, 2)
    mask = np.kron(np.array([values], np.uint8), np.ones((PATCH_SIZE, PATCH_SIZE), np.uint8))
    path = tmp_path / f"{name}.png"
    path.write_bytes(png(mask))
    h, w = PATCH_SIZE, 2 * PATCH_SIZE
    row = {"image": f"memory://img/{name}.jpg", "width": w, "height": h, "resized_h": h, "resized_w": w}
    row |= {"pad_top": 0, "pad_left": 0, "grid_h": 1, "grid_w": 2, "channels": feats.shape[0]}
    return row | {"features": feats.tobytes()}, str(path)


def rows_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.array([r[k] for r in rows], dtype=object if k in ("image", "features") else None) for k in rows[0]}


def test_a_head_trained_on_zero_unlabeled_masks_does_not_learn_the_ignored_region(tmp_path):
    """Features u and v each appear labelled (u: class 1, v: class 2) and, in the other image,
    unlabeled (0). Honoured, the unlabeled patches teach nothing and the head maps u and v to
    their classes; 0 read as a class would pull both towards it."""
    u, v = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    a, mask_a = cached_pair(tmp_path, "a", u, v, (1, 0))
    b, mask_b = cached_pair(tmp_path, "b", v, u, (2, 0))
    c = ZERO_UNLABELED
    masks = {a["image"]: mask_a, b["image"]: mask_b}
    cfg = SampleConfig(masks, len(c), ignore_index=c.ignore_index, first_id=c.first_id)
    samples = CachedSamples(cfg)(rows_batch([a, b]))
    _, _, target = to_tensors(samples, torch.device("cpu"))
    right = target[:, :, PATCH_SIZE:]
    assert (right == IGNORE_INDEX).all()  # the unlabeled half is ignored in the loss's target
    assert (target[0, :, :PATCH_SIZE] == 0).all() and (target[1, :, :PATCH_SIZE] == 1).all()

    torch.manual_seed(0)
    config = HeadConfig("linear", (0,), embed_dim=2, num_classes=len(c))
    head = build_head(config)
    optimizer, scheduler = make_optimizer(head, Schedule(lr=0.05, weight_decay=0.0, warmup=0.0), 60)
    source = FeatureSource(config.layers, config.embed_dim)
    for _ in range(60):
        stats = train_epoch(head, source, [samples], optimizer, scheduler, torch.device("cpu"))
    assert np.isfinite(stats["train_loss"])
    conf = validate(head, source, [samples], torch.device("cpu"), len(c))
    # every labelled pixel right (2 patches of 14x14), the unlabeled ones counted nowhere
    assert conf.tolist() == [[PATCH_SIZE**2, 0], [0, PATCH_SIZE**2]]


def test_a_cached_mask_outside_the_map_is_ignored_not_trained(tmp_path, caplog):
    u = np.array([1.0, 0.0])
    a, mask_a = cached_pair(tmp_path, "a", u, u, (1, 255))  # 255 is no value of this map
    c = ZERO_UNLABELED
    cfg = SampleConfig({a["image"]: mask_a}, len(c), ignore_index=c.ignore_index, first_id=c.first_id)
    out = CachedSamples(cfg)(rows_batch([a]))
    assert (out["label"][0] == IGNORE_INDEX).all() and "class 255" in caplog.text


# ---- the driver: the head's class map, and resume ------------------------------------------


def test_resume_refuses_another_ignore_index(tmp_path):
    from pipeline.train.config import TrainConfig
    from pipeline.train.run import _run_id, settings

    config = TrainConfig("i", "m", classes="c.yaml", output=str(tmp_path), resume=True)
    before = settings(config, (11,), ClassMap(("road", "car"), ((0, 0, 0), (1, 1, 1))))
    state = {"run_id": "r1", "epoch": 1, "settings": before}
    now = settings(config, (11,), ZERO_UNLABELED)
    assert before["ignore_index"] == 255 and now["ignore_index"] == 0
    with pytest.raises(DinosegError, match="--ignore-index 255") as e:
        _run_id(config, str(tmp_path), None, now, lambda out, so: state)
    assert one_sentence(str(e.value))
    assert _run_id(config, str(tmp_path), None, before, lambda out, so: state)[0] == "r1"


def test_the_heads_class_map_is_zero_based_whatever_the_masks_values():
    internal = ZERO_UNLABELED.internal()
    assert internal.names == ZERO_UNLABELED.names and internal.colors == ZERO_UNLABELED.colors
    assert (internal.first_id, internal.ignore_index) == (0, IGNORE_INDEX)
    assert [e["id"] for e in internal.to_dict()["classes"]] == [0, 1]
    own = ClassMap(("a", "b"), ((0, 0, 0), (1, 1, 1)))
    assert own.internal() is own  # maps in dinoseg's values are kept as they are


@pytest.mark.slow  # a real Ray
def test_train_on_masks_whose_zero_is_unlabeled(ray_local, tmp_path):
    """The synthetic set renumbered as raw ADE20K is (classes from 1, 0 = unlabeled) trains with
    no problem, and the head's class map is dinoseg's own (0-based, 255 = ignore)."""
    import yaml

    from model.classes import load_class_map
    from model.weights import load_checkpoint
    from pipeline.data.synthetic import SYNTHETIC_CLASSES, write_synthetic
    from pipeline.io.masks import decode_mask_png
    from pipeline.train import TrainConfig, run_train

    root = tmp_path / "syn"
    write_synthetic(str(root), train=8, val=2, size=56, seed=1)
    ignored = 0
    for path in sorted(root.glob("*/masks/*.png")):
        m = decode_mask_png(path.read_bytes())
        ignored += int((m == IGNORE_INDEX).sum())
        path.write_bytes(png(np.where(m == IGNORE_INDEX, 0, m.astype(np.int64) + 1).astype(np.uint8)))
    assert ignored  # the set's outlines are unlabeled: they must stay so
    d = SYNTHETIC_CLASSES.to_dict()
    d = {"ignore_index": 0, "classes": [e | {"id": e["id"] + 1} for e in d["classes"]]}
    (root / "raw.yaml").write_text(yaml.safe_dump(d))
    out = tmp_path / "run"
    info = run_train(
        TrainConfig(
            f"{root}/train/images",
            f"{root}/train/masks",
            f"{root}/raw.yaml",
            str(out),
            val_images=f"{root}/val/images",
            val_masks=f"{root}/val/masks",
            backbone_weights="random",
            resolution=56,
            crop=56,
            epochs=1,
            batch_size=4,
            workers=1,
            cpus_per_worker=0.5,
        )
    )
    assert info["counts"] == {"train_pairs": 8, "val_pairs": 2, "problems": 0}
    assert np.isfinite(info["history"][0]["train_loss"]) and info["history"][0]["val_miou"] is not None
    assert info["arguments"]["ignore_index"] == 0
    written = load_class_map(str(out / "classes.yaml"))
    assert written == SYNTHETIC_CLASSES  # 0-based, 255 = ignore: what the head's masks hold
    ckpt = load_checkpoint(str(out / "head.pt"))
    assert ckpt["classes"]["ignore_index"] == IGNORE_INDEX and ckpt["classes"]["classes"][0]["id"] == 0


def test_point_masks_are_drawn_in_the_class_maps_values(tmp_path):
    """Clicks given as MASKS become masks read like a folder's: in the map's own values."""
    from pipeline.data.points import points_to_pairs

    (tmp_path / "images").mkdir()
    Image.fromarray(photo(20, 20)).save(tmp_path / "images" / "a.png")
    (tmp_path / "points.csv").write_text("image,x,y,class\na.png,5,5,car\na.png,15,15,road\n")
    c = ZERO_UNLABELED
    pairs = points_to_pairs(str(tmp_path / "images"), str(tmp_path / "points.csv"), c, str(tmp_path / "pm"), radius=1)
    data = Path(pairs.masks[0]).read_bytes()
    drawn = np.asarray(Image.open(io.BytesIO(data)))
    assert (drawn[5, 5], drawn[15, 15], drawn[0, 19]) == (2, 1, 0)  # car = 2, road = 1, 0 = unlabeled
    label = decode_label(data, len(c), ignore_index=c.ignore_index, first_id=c.first_id)
    assert (label[5, 5], label[15, 15], label[0, 19]) == (1, 0, IGNORE_INDEX)


def test_evaluate_reads_ground_truth_in_the_maps_values(tmp_path):
    """Predictions are dinoseg's (0-based, 255 = unsure); the ground truth numbers its classes
    from 1 with 0 = unlabeled: compared class for class, unlabeled pixels left out."""
    from pipeline.evaluate import compare_masks

    def put(name, values):
        (tmp_path / name).write_bytes(png(np.array(values, np.uint8)))
        return str(tmp_path / name)

    pred = put("pred.png", [[0, 1], [1, 255]])
    gt = put("gt.png", [[1, 2], [0, 2]])
    stray = put("stray.png", [[1, 255], [0, 2]])  # 255 is no value of this map
    skipped = []
    conf, compared = compare_masks(
        [("a", pred, gt), ("b", pred, stray)], ZERO_UNLABELED, None, lambda *r: skipped.append(r), threads=1
    )
    assert compared == 1 and conf.tolist() == [[1, 0, 0], [0, 1, 1]]  # last column: predicted unsure
    assert skipped[0][0] == "out_of_range" and "[255]" in skipped[0][1] and "classes 1..2" in skipped[0][1]


# ---- commands that read or write dinoseg's own masks ----------------------------------------


def raw_map_file(tmp_path: Path) -> str:
    path = tmp_path / "raw.yaml"
    path.write_text("ignore_index: 0\nclasses: [{id: 1, name: road}, {id: 2, name: car}]\n")
    return str(path)


def test_export_and_import_refuse_a_map_numbered_from_one(tmp_path):
    """They read or write masks numbered from 0: such a map would shift every class by one."""
    from pipeline.label.export import _classes

    raw = raw_map_file(tmp_path)
    with pytest.raises(DinosegError, match="export reads dinoseg's masks") as e:
        _classes(raw, str(tmp_path), None)
    assert raw in str(e.value) and one_sentence(str(e.value))
    other = tmp_path / "other.yaml"
    other.write_text("ignore_index: 100\nclasses: [{id: 0, name: road}]\n")
    assert _classes(str(other), str(tmp_path), None).ignore_index == 100  # counted from 0: as before
    with pytest.raises(DinosegError, match="import writes dinoseg's masks"):
        ZERO_UNLABELED.require_own_values(raw, "import writes", ignore_too=False)


def test_self_train_refuses_a_map_its_pseudo_labels_cannot_share(tmp_path):
    from pipeline.selftrain import SelfTrainConfig, run_self_train
    from pipeline.train import TrainConfig

    base = TrainConfig("i", "m", classes=raw_map_file(tmp_path), output=str(tmp_path / "out"))
    with pytest.raises(DinosegError, match="self-train mixes its masks with dinoseg's masks") as e:
        run_self_train(SelfTrainConfig(base, unlabeled=str(tmp_path)))
    assert one_sentence(str(e.value))
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_text_heads_classes_count_from_zero(tmp_path):
    from model.text_head import TextHeadRequest, class_prompts

    prompts = class_prompts(TextHeadRequest(raw_map_file(tmp_path)))
    assert prompts.classes.names == ("road", "car") and prompts.classes == ZERO_UNLABELED.internal()


def test_an_old_segment_outputs_wide_class_map_is_read_and_other_ambiguous_ones_refused(tmp_path):
    import json

    import yaml

    from model.classes import WIDE_IGNORE_INDEX, load_class_map

    # what dinoseg wrote for a 300-class model before the ignore index was checked: 255 = class 255
    old = {"ignore_index": 255, "classes": [{"id": i, "name": f"c{i}", "color": [0, 0, 0]} for i in range(300)]}
    seg, imported, own = tmp_path / "seg", tmp_path / "imported", tmp_path / "own"
    for folder in (seg, imported, own):
        folder.mkdir()
        (folder / "classes.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    (seg / "run.json").write_text(json.dumps({"model": "head.pt", "head_checksum": "abc", "counts": {}}))
    (imported / "import.json").write_text(json.dumps({"counts": {}}))

    classes = load_class_map(str(seg / "classes.yaml"))  # segment's masks are argmax: 255 is class 255
    assert len(classes) == 300 and classes.ignore_index == WIDE_IGNORE_INDEX and classes.names[255] == "c255"
    with pytest.raises(DinosegError, match=r"import again .* with --overwrite"):  # its 255 meant both
        load_class_map(str(imported / "classes.yaml"))
    with pytest.raises(DinosegError, match=r"ignore_index 255 is also the id of class 255.*such as 65535"):
        load_class_map(str(own / "classes.yaml"))  # a user's map (or nothing says dinoseg wrote it)
    (own / "run.json").write_text(json.dumps({"counts": {}}))  # not segment's
    with pytest.raises(DinosegError, match="ignore_index 255 is also"):
        load_class_map(str(own / "classes.yaml"))
