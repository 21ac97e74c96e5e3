"""Class maps: bundled ADE20K/VOC2012, files in YAML/JSON, palettes, clear errors."""

import json

import numpy as np
import pytest

from model.classes import ClassMap, bundled, default_color, load_class_map, save_class_map
from model.errors import DinosegError


def test_bundled_class_maps():
    ade, voc = bundled("ade20k"), bundled("voc2012")
    assert len(ade) == 150 and ade.names[:3] == ("wall", "building", "sky") and ade.names[-1] == "flag"
    assert ade.colors[0] == (120, 120, 120)
    assert len(voc) == 21 and voc.names[0] == "background" and voc.names[15] == "person"
    assert ade.ignore_index == voc.ignore_index == 255
    # mmseg's ADE20K palette gives road and skyscraper the same grey; kept as released
    assert len(set(ade.names)) == 150 and len(set(ade.colors)) == 149
    assert ade.colors[6] == ade.colors[48] == (140, 140, 140)


def test_voc_palette_is_the_bit_interleaved_colour_map():
    voc = bundled("voc2012")
    assert voc.colors == tuple(default_color(i) for i in range(21))
    assert default_color(1) == (128, 0, 0) and default_color(20) == (0, 64, 128)


def test_palette_for_pil():
    voc = bundled("voc2012")
    pal = voc.palette()
    assert len(pal) == 768
    assert pal[3:6] == [128, 0, 0]
    assert pal[255 * 3 : 256 * 3] == [255, 255, 255]  # ignore pixels show white


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_file_round_trip(tmp_path, suffix):
    cm = ClassMap(("sky", "road", "car"), ((0, 0, 255), (128, 64, 128), (255, 0, 0)))
    path = str(tmp_path / f"classes{suffix}")
    save_class_map(cm, path)
    assert load_class_map(path) == cm
    assert load_class_map(f"file://{path}") == cm


def test_colours_are_optional(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"classes": [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}]}))
    cm = load_class_map(str(path))
    assert cm.colors == (default_color(0), default_color(1)) and cm.ignore_index == 255


@pytest.mark.parametrize(
    "content, phrase",
    [
        ("classes: [{id: 0, name: a}, {id: 2, name: b}]", "0..N-1"),
        ("classes: [{id: 0, name: a, color: [1, 2]}]", "three integers"),
        ("classes: [{name: a}]", "not a class map"),
        ("- just\n- a list", "not a class map"),
        ("classes: [", "not valid YAML"),
        ("classes: []", "no classes"),
    ],
)
def test_bad_class_map_files(tmp_path, content, phrase):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(DinosegError, match=phrase):
        load_class_map(str(path))


def test_missing_file_and_unknown_bundled_name(tmp_path):
    with pytest.raises(DinosegError, match="check the path"):
        load_class_map(str(tmp_path / "nope.yaml"))
    with pytest.raises(DinosegError, match="bundled"):
        bundled("cityscapes")


# ---- the ignore index: validated when a map is read -------------------------------------------


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and ". " not in message.rstrip(".")


def three_classes(ignore) -> str:
    return json.dumps({"ignore_index": ignore, "classes": [{"id": i, "name": f"c{i}"} for i in range(3)]})


@pytest.mark.parametrize("ignore", [0, 2])
def test_an_ignore_index_that_is_a_class_id_is_refused_in_one_sentence(tmp_path, ignore):
    path = tmp_path / "c.json"
    path.write_text(three_classes(ignore))
    with pytest.raises(DinosegError, match=f"ignore_index {ignore} is also the id of class {ignore}") as e:
        load_class_map(str(path))
    assert str(path) in str(e.value) and one_sentence(str(e.value))
    with pytest.raises(DinosegError, match="also the id"):  # built in code as well as read
        ClassMap(("a", "b", "c"), ((0, 0, 0),) * 3, ignore_index=ignore)


@pytest.mark.parametrize("ignore", ['"255"', "2.5", "255.0", "true", "[255]", "null", "-1", "65536"])
def test_an_ignore_index_that_is_not_a_mask_value_is_refused(tmp_path, ignore):
    path = tmp_path / "c.json"
    path.write_text(three_classes(None).replace("null", ignore, 1))
    if ignore == "null":  # YAML/JSON null: as if not given
        assert load_class_map(str(path)).ignore_index == 255
        return
    with pytest.raises(DinosegError, match="ignore_index") as e:
        load_class_map(str(path))
    assert one_sentence(str(e.value)) and ("not an integer" in str(e.value) or "0..65535" in str(e.value))


def test_another_ignore_index_is_kept_and_round_trips(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ignore_index: 100\nclasses: [{id: 0, name: a}, {id: 1, name: b}]\n")
    cm = load_class_map(str(path))
    assert cm.ignore_index == 100 and cm.first_id == 0
    save_class_map(cm, str(tmp_path / "again.yaml"))
    assert load_class_map(str(tmp_path / "again.yaml")) == cm


def test_a_map_whose_zero_is_unlabeled_numbers_its_classes_from_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ignore_index: 0\nclasses: [{id: 1, name: wall}, {id: 2, name: floor}]\n")
    cm = load_class_map(str(path))
    assert (cm.names, cm.first_id, cm.ignore_index) == (("wall", "floor"), 1, 0)
    save_class_map(cm, str(tmp_path / "again.yaml"))
    assert load_class_map(str(tmp_path / "again.yaml")) == cm  # ids 1..N written back
    assert cm.to_indices(np.array([[0, 1, 2]])).tolist() == [[255, 0, 1]]
    with pytest.raises(DinosegError, match="class 3"):
        cm.to_indices(np.array([[3]]))
    path.write_text("ignore_index: 255\nclasses: [{id: 1, name: wall}, {id: 2, name: floor}]\n")
    with pytest.raises(DinosegError, match="0..N-1"):  # from 1 only when 0 is the ignore index
        load_class_map(str(path))


def test_wide_maps_default_to_65535_and_refuse_a_stated_255(tmp_path):
    entries = [{"id": i, "name": f"c{i}"} for i in range(300)]
    path = tmp_path / "wide.json"
    path.write_text(json.dumps({"classes": entries}))
    wide = load_class_map(str(path))
    assert wide.ignore_index == 65535  # 255 is class 255 here; 65535 is no class of a 16-bit mask
    assert ClassMap(tuple(e["name"] for e in entries), ((0, 0, 0),) * 300).ignore_index == 65535
    assert ClassMap(("a",) * 255, ((0, 0, 0),) * 255).ignore_index == 255  # up to 255 classes: as before
    path.write_text(json.dumps({"ignore_index": 255, "classes": entries}))
    with pytest.raises(DinosegError, match="such as 65535") as e:
        load_class_map(str(path))
    assert one_sentence(str(e.value))
    # what dinoseg wrote itself before the check (255 for every map) still loads, as 65535
    old = ClassMap.from_dict({"ignore_index": 255, "classes": entries}, written_by_dinoseg=True)
    assert old.ignore_index == 65535
