"""OUTPUT inside INPUT (and INPUT inside what a run writes) refused, canonically compared."""

import os

import pytest

from model.errors import DinosegError
from pipeline.io.places import canonical, refuse_nesting


@pytest.mark.parametrize(
    "inp, out",
    [
        ("s3://b/photos", "s3://b/photos/seg"),
        ("s3://b/photos/", "s3a://b/photos/./seg"),
        ("s3://b/photos", "s3://b/photos"),
        ("s3://b/photos/*.jpg", "s3://b/photos/out"),
        ("sftp://h/x/../photos", "sftp://h/photos/out"),  # a remote filesystem resolves '..' itself
        ("s3://b/photos", "s3://b/photos/./seg"),  # a key under photos/ as S3 stores it
        ("s3://b/out/masks", "s3://b/out"),
        ("s3://b/out/masks/sub", "s3://b/out/"),
    ],
)
def test_nesting_refused(inp, out):
    with pytest.raises(DinosegError, match="inside"):
        refuse_nesting(inp, out)


@pytest.mark.parametrize(
    "inp, out",
    [
        ("s3://b/photos", "s3://b/photos-seg"),
        ("s3://b/photos", "gs://b/photos/seg"),
        ("s3://b/photos/list.txt", "s3://b/photos/seg"),  # a manifest: fixed paths, not a folder
        ("s3://b/out/images", "s3://b/out"),  # beside what OUTPUT writes
    ],
)
def test_siblings_allowed(inp, out):
    refuse_nesting(inp, out)


@pytest.mark.parametrize(
    "inp, out",
    [
        ("s3://bkt/in", "s3://bkt/in/../out"),  # S3 would store out/masks/ under in/ (key in/../out/...)
        ("s3://bkt/x/../in", "s3://bkt/in/out"),
        ("gs://bkt/in/", "gs://bkt/out/.."),
    ],
)
def test_dot_dot_on_an_object_store_is_refused_not_resolved(inp, out):
    with pytest.raises(DinosegError, match=r"has a '\.\.' in its path, which an object store keeps") as e:
        refuse_nesting(inp, out)
    assert "\n" not in str(e.value)


def test_object_store_keys_are_compared_as_written():
    assert canonical("s3://b/in/./out") == ("s3", "b/in/./out")  # not b/in/out: S3 keeps the key literally
    refuse_nesting("s3://b/./photos", "s3://b/photos/seg")  # the keys ./photos/... and photos/... never meet


def test_local_paths_are_compared_as_real_paths(tmp_path):
    (tmp_path / "photos").mkdir()
    os.symlink(tmp_path / "photos", tmp_path / "link")
    with pytest.raises(DinosegError, match="OUTPUT .* is inside INPUT"):
        refuse_nesting(str(tmp_path / "link"), str(tmp_path / "photos" / "new" / "out"))
    with pytest.raises(DinosegError, match="inside INPUT"):
        refuse_nesting(f"file://{tmp_path}/photos", str(tmp_path / "photos" / "seg"))
    refuse_nesting(str(tmp_path / "photos"), str(tmp_path / "seg"))
    assert canonical(f"file://{tmp_path}") == canonical(str(tmp_path))
