"""save_class_map writes atomically: a kill mid-write leaves the old classes.yaml whole (train,
export and evaluate read it, and a segment run rewrites it at every start)."""

from __future__ import annotations

import os

import pytest

from model.classes import ClassMap, load_class_map, save_class_map
from pipeline.io.files import is_temp_name

OLD = ClassMap(("sky", "road"), ((0, 0, 255), (90, 90, 90)))
NEW = ClassMap(("sky", "road", "tree"), ((0, 0, 255), (90, 90, 90), (0, 128, 0)))


def test_a_kill_mid_write_leaves_the_old_map_whole(tmp_path, monkeypatch):
    url = str(tmp_path / "out" / "classes.yaml")
    save_class_map(OLD, url)
    renamed = []

    def killed(src, dst):
        renamed.append(os.path.basename(src))
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_class_map(NEW, url)
    monkeypatch.undo()
    assert load_class_map(url).names == OLD.names, "the old file, whole"
    [tmp] = renamed
    assert is_temp_name(tmp), "the pipeline's temporary name: readers skip it, a sweep removes it"
    assert sorted(os.listdir(tmp_path / "out")) == ["classes.yaml"]
    save_class_map(NEW, url)
    assert load_class_map(url).names == NEW.names


def test_a_map_on_an_object_store_is_one_put(s3_bucket):
    bucket, so = s3_bucket
    url = f"s3://{bucket}/out/classes.json"
    save_class_map(NEW, url, so)
    assert load_class_map(url, so).names == NEW.names
