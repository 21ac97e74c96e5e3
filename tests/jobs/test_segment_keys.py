"""`segment` end to end (a real local Ray) on what the listing must get right across runs: a
sibling appearing beside a finished image keeps the first image's key, a symbolic link out of
INPUT is neither read nor copied into overlays, and an unlisted folder makes the run say its
listing was incomplete (and the next run lists it)."""

import json
import os

import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from test_segment import SMALL, head_file, jpeg  # noqa: F401  (head_file: the module's fixture)

from pipeline.io import retry
from pipeline.segment import SegmentConfig, run_segment, summary_table


def rows(folder):
    return pq.read_table(folder).to_pylist() if folder.exists() else []


@pytest.mark.slow  # a real Ray
def test_keys_stay_across_runs_and_links_out_of_input_are_refused(ray_local, tmp_path, head_file, monkeypatch):  # noqa: F811
    inp, secret, out = tmp_path / "in", tmp_path / "secret", tmp_path / "out"
    for name, seed in (("a.jpg", 1), ("b.jpg", 2), ("flaky/c.jpg", 3)):
        (inp / name).parent.mkdir(parents=True, exist_ok=True)
        (inp / name).write_bytes(jpeg(40, 30, seed))
    secret.mkdir()
    (secret / "s.jpg").write_bytes(jpeg(40, 30, 9))
    (inp / "leak.jpg").symlink_to(secret / "s.jpg")
    monkeypatch.setattr(retry, "BACKOFF_S", 0.0)
    real_ls = LocalFileSystem.ls

    def ls(self, path, *a, **k):  # the store keeps failing on one folder during run 1
        if os.path.basename(path) == "flaky":
            raise ConnectionResetError(104, "Connection reset by peer")
        return real_ls(self, path, *a, **k)

    monkeypatch.setattr(LocalFileSystem, "ls", ls)
    config = SegmentConfig(str(inp), str(out), model=None, head=head_file, overlays=True, **SMALL)
    first = run_segment(config)
    assert first == {"inputs": 4, "predicted": 2, "skipped": 0, "failed": 2, "unlisted_folders": 1}
    assert "INCOMPLETE: 1 folder could not be listed" in summary_table(first)
    info = json.loads((out / "run.json").read_text())
    assert info["listing"] == {"complete": False, "unlisted_folders": 1, "symlinks_refused": 1}
    errors = {r["path"]: r for r in rows(out / "errors")}
    assert errors[str(inp / "leak.jpg")]["error_type"] == "SymlinkOutsideInput"
    assert "its images are missing" in errors[str(inp / "flaky")]["message"]
    assert not (out / "overlays" / "leak.jpg").exists() and not (out / "masks" / "leak.png").exists()

    monkeypatch.setattr(LocalFileSystem, "ls", real_ls)  # the store is back
    (inp / "a.png").write_bytes(jpeg(40, 30, 4))  # a sibling of the finished a.jpg
    again = run_segment(config)
    assert again == {"inputs": 5, "predicted": 2, "skipped": 2, "failed": 1}  # flaky/c and a.png done now
    assert json.loads((out / "run.json").read_text())["listing"] == {"complete": True, "symlinks_refused": 1}
    predicted = [(r["path"], r["key"]) for r in rows(out / "predictions")]
    assert sorted(predicted) == sorted(
        [
            (str(inp / "a.jpg"), "a"),  # kept: its mask masks/a.png stays a.jpg's
            (str(inp / "b.jpg"), "b"),
            (str(inp / "a.png"), "a.png"),
            (str(inp / "flaky/c.jpg"), "flaky/c"),
        ]
    )  # one row per image, one image per key
    assert sorted(p.name for p in (out / "masks").rglob("*.png")) == ["a.png", "a.png.png", "b.png", "c.png"]


def test_the_summary_says_when_the_listing_is_incomplete():
    complete = summary_table({"inputs": 3, "predicted": 2, "skipped": 0, "failed": 1})
    assert "listing" not in complete
    table = summary_table({"inputs": 3, "predicted": 2, "skipped": 0, "failed": 1, "unlisted_folders": 2})
    last = table.splitlines()[-1]
    assert last.startswith("listing") and "INCOMPLETE: 2 folders could not be listed" in last
    assert "may be missing" in last and "run again" in last
