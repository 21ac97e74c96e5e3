"""`list_input_batches`, the listing a segment run makes, against `list_inputs`, the listing row by
row: over the same folders and manifests as the key properties (`test_keys_properties`: aliases,
'//', './', case, Unicode normalisation, siblings appearing, a renamed folder, credentials and new
presigned signatures), the two give the same rows in the same order and the same stats, whether
the earlier run's keys come as a mapping or as `RecordedKeys` read back from its parts. Batches and
spools are made tiny, so that the rows span many batches and the spool spills to its file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from test_keys_properties import SETTINGS, component, extension, make_files, relpath, through_parts

from pipeline.data import claims, manifest, recorded, spool, walk
from pipeline.data.recorded import read_recorded
from pipeline.data.sources import list_input_batches, list_inputs


@contextlib.contextmanager
def tiny_batches():
    saved = walk.PROPOSAL_BATCH, manifest._LINES_BYTES, spool.SPILL_ROWS, recorded.Blocks.BLOCK_BYTES
    walk.PROPOSAL_BATCH, manifest._LINES_BYTES, spool.SPILL_ROWS, recorded.Blocks.BLOCK_BYTES = 2, 1, 3, 40
    try:
        yield
    finally:
        walk.PROPOSAL_BATCH, manifest._LINES_BYTES, spool.SPILL_ROWS, recorded.Blocks.BLOCK_BYTES = saved


def same_listing(input: str, earlier=None, output: Path | None = None) -> list[dict]:
    """The rows of `input`, checked to be the same row by row and in batches (with the `earlier`
    run's keys as given, and as read back from `output`'s parts)."""
    row_stats = {}
    by_rows = list(list_inputs(input, recorded=earlier, stats=row_stats))
    for book in [earlier] if output is None else [earlier, output]:
        stats = {}
        with tiny_batches():
            if isinstance(book, Path):  # read back from the parts, in several blocks
                book = read_recorded(str(book))
            batched = [r for b in list_input_batches(input, recorded=book, stats=stats) for r in b.to_pylist()]
        assert batched == by_rows
        assert stats == row_stats
    return by_rows


@SETTINGS
@given(st.lists(relpath, min_size=1, max_size=8), st.lists(relpath, max_size=8), st.booleans())
def test_folder_listing_in_batches_is_the_listing_row_by_row(first, later, moved):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "in"
        if not make_files(root, first):
            return
        rows = same_listing(str(root))
        out = Path(tmp) / "out"
        recorded = through_parts(rows, out)
        if moved:
            root = root.rename(Path(tmp) / "in-2026")
        make_files(root, first + later)
        same_listing(str(root), recorded, out)


url_component = st.one_of(component, st.just(""), st.just("."), st.just(".."))


@SETTINGS
@given(
    st.lists(st.lists(url_component, min_size=1, max_size=3), min_size=1, max_size=6),
    st.lists(st.lists(url_component, min_size=1, max_size=3), max_size=6),
    st.lists(st.tuples(component, extension), min_size=12, max_size=12),
    st.sampled_from(["s3://bkt/", "http://user:CANARY@127.0.0.1:8/", "", "/abs/", "file:///f/", "memory://m/"]),
)
def test_manifest_listing_in_batches_is_the_listing_row_by_row(first, later, names, base):
    def urls(entries, offset, run):
        out = []
        for i, dirs in enumerate(entries):
            stem, ext = names[(i + offset) % len(names)]
            query = f"?X-Amz-Signature=SIG{run}&X-Amz-Expires=60" if base.startswith("http") else ""
            out.append(base + "/".join([*dirs, f"{stem}.{ext}"]) + query)
        return out

    with tempfile.TemporaryDirectory() as tmp:
        listing = os.path.join(tmp, "m.txt")
        Path(listing).write_text("\n".join(urls(first, 0, 1)) + "\n")
        rows = same_listing(listing)
        out = Path(tmp) / "out"
        recorded = through_parts(rows, out)
        again = urls(first, 0, 2)
        Path(listing).write_text("\n".join(again + urls(later, 5, 2) + again[:1]) + "\n")
        same_listing(listing, recorded, out)


def test_a_plain_key_that_is_another_files_key_with_extension(tmp_path):
    # a.jpg and a.png keep their extensions; a.jpg.bmp's plain key is a.jpg's key with extension
    make_files(tmp_path / "in", ["a.jpg", "a.png", "a.jpg.bmp", "b/x.jpg"])
    rows = same_listing(str(tmp_path / "in"))
    assert [(r["key"], r["error_type"]) for r in rows] == [
        ("", "KeyCollision"),  # a.jpg: its key 'a.jpg' went to a.jpg.bmp, whose plain key is claimed first
        ("a.jpg", ""),
        ("a.png", ""),
        ("b/x", ""),
    ]


def test_collisions_across_batches_first_listed_wins(tmp_path):
    entries = [f"s3://bkt/set/{i:03d}.jpg" for i in range(40)]
    entries[25] = "s3://bkt/set/003.png"  # the stem of 003.jpg: both keep their extension
    entries[31] = "s3://bkt/set/007.jpg"  # listed twice
    entries[38] = "s3://bkt/SET/011.jpg"  # 'SET/011' is 'set/011' on a case-insensitive disk
    entries.append("s3://other/x.jpg")  # another bucket: keys are the paths without scheme
    (tmp_path / "m.txt").write_text("\n".join(entries) + "\n")
    rows = same_listing(str(tmp_path / "m.txt"))
    assert rows[3]["key"] == "bkt/set/003.jpg" and rows[25]["key"] == "bkt/set/003.png"
    assert rows[31]["error_type"] == "DuplicateInput" and rows[7]["key"] == "bkt/set/007"
    assert rows[38]["error_type"] == "KeyCollision" and "'s3://bkt/set/011.jpg'" in rows[38]["error_message"]
    assert len({r["key"] for r in rows if not r["error_type"]}) == len(rows) - 2


def test_a_gone_recorded_key_is_named_from_its_part(tmp_path):
    make_files(tmp_path / "in", ["gone.jpg", "kept.jpg"])
    first = same_listing(str(tmp_path / "in"))
    recorded = through_parts(first, tmp_path / "out")
    (tmp_path / "in" / "gone.jpg").unlink()
    make_files(tmp_path / "in", ["new/x.jpg", "GONE.png"])
    stats = {}
    with tiny_batches():
        book = read_recorded(str(tmp_path / "out"))
        rows = [r for b in list_input_batches(str(tmp_path / "in"), recorded=book, stats=stats) for r in b.to_pylist()]
    clash = next(r for r in rows if r["path"].endswith("GONE.png"))
    assert clash["error_type"] == "KeyCollision" and f"'{tmp_path / 'in' / 'gone.jpg'}'" in clash["error_message"]
    assert stats == {"recorded_not_listed": 1}
    assert rows == list(list_inputs(str(tmp_path / "in"), recorded=recorded))


def test_short_hashes_that_collide_only_send_rows_to_the_registry(tmp_path, monkeypatch):
    # every row's short hash is 0 or 1: nearly all rows look repeated and are claimed one by one
    monkeypatch.setattr(claims, "_short", lambda h: (h & 1).astype("uint32"))
    make_files(tmp_path / "in", ["a.jpg", "A.png", "b/c.jpg", "b/C.jpg", "d.jpg", "e.jpg"])
    (tmp_path / "m.txt").write_text("s3://b/x/1.jpg\ns3://b/x/1.png\ns3://b/x/2.jpg\ns3://b/X/2.jpg\n")
    folder = same_listing(str(tmp_path / "in"))
    assert [r["key"] or r["error_type"] for r in folder] == ["A.png", "a.jpg", "d", "e", "b/C.jpg", "KeyCollision"]
    listed = same_listing(str(tmp_path / "m.txt"))
    assert [r["key"] or r["error_type"] for r in listed] == ["x/1.jpg", "x/1.png", "x/2.jpg", "KeyCollision"]
