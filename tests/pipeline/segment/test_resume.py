"""A re-run's one read of OUTPUT (`pipeline.segment.resume`): the listing drops the done keys read
from several parts (an exact anti-join: a key done only in another case is not done), the
identity check still refuses masks made otherwise by name, parts another run published after the
read are done too, and parts removed meanwhile stop the run."""

from __future__ import annotations

from types import SimpleNamespace

import pyarrow as pa
import pytest

from model.errors import DinosegError
from pipeline.data.recorded import read_recorded
from pipeline.data.schema import IDENTITY_FIELD, PREDICTION_SCHEMA
from pipeline.io.parts import RollingParquetWriter
from pipeline.segment.identity import digest, write_identity
from pipeline.segment.resume import Resume, list_todo

IDENTITY = {"model": "m", "head": "h" * 64, "resolution": 56, "mode": "whole", "tta": False, "precision": "auto"}
GIVEN = SimpleNamespace(mode="whole")  # the options as given: only rows without identity use them


def predicted(out, keys: list[str], identity: dict = IDENTITY, parts_of: int = 2) -> None:
    """Prediction rows of `keys` (paths /in/<key>.jpg) as a run writes them, `parts_of` a part."""
    schema = PREDICTION_SCHEMA.append(IDENTITY_FIELD)
    writer = RollingParquetWriter(str(out / "predictions"), schema, max_rows=parts_of)
    n = len(keys)
    writer.write(
        pa.table(
            {
                "path": [f"/in/{k}.jpg" for k in keys],
                "key": keys,
                "width": pa.array([4] * n, pa.int32()),
                "height": pa.array([4] * n, pa.int32()),
                "mask": [f"{out}/masks/{k}.png" for k in keys],
                "class_counts": pa.array([[16]] * n, pa.list_(pa.int64())),
                "mean_confidence": pa.array([None] * n, pa.float32()),
                "model": ["m"] * n,
                "head_checksum": [identity["head"]] * n,
                "identity": [digest(identity)] * n,
            },
            schema=schema,
        )
    )
    writer.close()
    write_identity(str(out), identity, None)


def manifest(tmp_path, keys: list[str]) -> str:
    (tmp_path / "m.txt").write_text("".join(f"/in/{k}.jpg\n" for k in keys))
    return str(tmp_path / "m.txt")


def test_the_listing_drops_done_keys_read_from_several_parts(tmp_path):
    out = tmp_path / "out"
    predicted(out, [f"d/{i}" for i in range(7)] + ["Case"])  # four parts
    assert len(list((out / "predictions").glob("*.parquet"))) == 4
    resume = Resume(str(out), None)
    listed = list_todo(manifest(tmp_path, [f"d/{i}" for i in range(10)] + ["case2", "x/new"]), None, resume, {})
    assert (listed.inputs, listed.done) == (12, 7)
    assert listed.todo["key"].to_pylist() == ["d/7", "d/8", "d/9", "case2", "x/new"]
    assert len(listed.errors) == 0
    assert len(resume.check(IDENTITY, GIVEN)) == 0


def test_a_key_done_in_another_case_is_not_done_and_collides(tmp_path):
    out = tmp_path / "out"
    predicted(out, ["a/x", "a/y"])
    book = read_recorded(str(out))
    assert list(book.done_mask(pa.array(["a/x", "A/X", "a/y", "a/z"]))) == [True, False, True, False]
    resume = Resume(str(out), None)
    listed = list_todo(manifest(tmp_path, ["a/x", "A/Y"]), None, resume, {})  # A/Y: a/y's key on macOS
    assert (listed.done, len(listed.todo), listed.errors["error_type"].to_pylist()) == (1, 0, ["KeyCollision"])
    assert "'/in/a/y.jpg'" in listed.errors["message"][0].as_py()  # the owner, read back from its part


def test_the_identity_check_still_refuses_by_name(tmp_path):
    out = tmp_path / "out"
    predicted(out, ["a", "b", "c"])
    resume = Resume(str(out), None)
    list_todo(manifest(tmp_path, ["a", "b", "c", "d"]), None, resume, {})
    with pytest.raises(DinosegError, match="made with --resolution 56, this run asks for 112: pass --overwrite"):
        resume.check({**IDENTITY, "resolution": 112}, GIVEN)


def test_parts_published_after_the_read_are_done_and_parts_removed_stop(tmp_path):
    out = tmp_path / "out"
    predicted(out, ["a", "b"])
    resume = Resume(str(out), None)
    listed = list_todo(manifest(tmp_path, ["a", "b", "c", "d"]), None, resume, {})
    assert listed.todo["key"].to_pylist() == ["c", "d"]
    predicted(out, ["c"])  # the run that held the lease finished c meanwhile
    assert resume.check(IDENTITY, GIVEN).to_pylist() == ["c"]
    other = {**IDENTITY, "head": "g" * 64}
    predicted(out, ["d"], identity=other)  # ... and the late part is checked like the others
    with pytest.raises(DinosegError, match="another model"):
        resume.check(IDENTITY, GIVEN)
    for part in (out / "predictions").glob("*.parquet"):
        part.unlink()
    with pytest.raises(DinosegError, match="were removed while this run started"):
        resume.check(IDENTITY, GIVEN)
