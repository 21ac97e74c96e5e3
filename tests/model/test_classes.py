"""Class maps: bundled ADE20K/VOC2012, files in YAML/JSON, palettes, clear errors."""

import json

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
