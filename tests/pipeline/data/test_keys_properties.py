"""Property tests of keys (hypothesis): over backslashes, '//', './', case, Unicode normalisation
and siblings appearing between runs, in folders (real files in a temporary folder) and manifests.

For every listing: every input gets exactly one row; no two rows that are not errors share a key,
or a key folded as a case-insensitive, normalising, backslash-splitting disk folds it; no key
escapes (no '..', nothing absolute); and a path that had a key in run 1 has it in run 2, after
new siblings and aliases appeared. Run 2 learns run 1's keys as a re-run does: from the rows run
1 wrote through real parts (redacted), read back with `recorded_keys`; between the runs the
folder may be renamed, and a manifest's URLs may carry credentials and new presigned signatures.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.data.keys import fold_key, is_safe_key, recorded_keys
from pipeline.data.schema import ERROR_FIELDS
from pipeline.data.sources import is_image_name, list_inputs
from pipeline.io.parts import RollingParquetWriter

# characters that alias: case pairs, a composed and a decomposed e-acute, backslash, dot
CHARS = "aAbB\u00e9e\u0301\\."
component = st.text(alphabet=CHARS, min_size=1, max_size=3).filter(lambda c: c not in (".", ".."))
extension = st.sampled_from(["jpg", "JPG", "png", "Png"])
relpath = st.builds(
    lambda dirs, stem, ext: "/".join([*dirs, f"{stem}.{ext}"]),
    st.lists(component, max_size=2),
    component,
    extension,
)
# database=None: no example database (a failure prints its example to rerun)
SETTINGS = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def check(rows: list[dict], inputs: list[str]) -> dict[str, str]:
    """The invariants of one listing of `inputs` (in listing terms: one row per line or file)."""
    assert sorted(r["path"] for r in rows) == sorted(inputs)  # exactly one row per input
    good = [r for r in rows if not r["error_stage"]]
    assert all(r["error_stage"] == "list" and r["error_type"] and r["error_message"] for r in rows if r not in good)
    folds = [fold_key(r["key"]) for r in good]
    assert len(set(folds)) == len(folds), "two inputs share a key on some disk"
    for r in good:
        assert is_safe_key(r["key"]), r["key"]  # no '..', '.', '' or '\\' part, not absolute
    return {r["path"]: r["key"] for r in good}


def through_parts(rows: list[dict], out: Path) -> dict[str, str]:
    """What a re-run learns of `rows`: written as run 1 writes them (predictions and errors parts,
    credentials redacted), read back with `recorded_keys`."""
    import pyarrow as pa

    schema = pa.schema([(f, pa.string()) for f in ("path", "key", *ERROR_FIELDS)])
    for folder, part in (("predictions", [r for r in rows if not r["error_stage"]]), ("errors", rows)):
        w = RollingParquetWriter(str(out / folder), schema)
        w.write(pa.Table.from_pylist([{f: r[f] for f in schema.names} for r in part], schema=schema))
        w.close()
    return recorded_keys(str(out))


def make_files(root: Path, rels: list[str]) -> list[str]:
    """Create the files that can coexist (a name cannot be a file and a folder); their paths."""
    made = []
    for rel in rels:
        p = root / rel
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            if not p.exists():
                p.write_bytes(b"x")
        except (FileExistsError, NotADirectoryError):
            continue
        if p.is_file():
            made.append(str(p))
    return sorted(set(made))


@SETTINGS
@given(st.lists(relpath, min_size=1, max_size=8), st.lists(relpath, max_size=8), st.booleans())
def test_folder_keys_unique_safe_and_stable(first, later, moved):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "in"
        inputs = make_files(root, first)
        if not inputs:
            return
        rows = list(list_inputs(str(root)))
        run1 = check(rows, [p for p in inputs if is_image_name(p)])
        recorded = through_parts(rows, Path(tmp) / "out")
        if moved:  # INPUT renamed (or remounted) between the runs: keys are relative to it
            root = root.rename(Path(tmp) / "in-2026")
            run1 = {str(root / Path(p).relative_to(Path(tmp) / "in")): k for p, k in run1.items()}
        inputs = make_files(root, first + later)  # siblings and aliases appear
        rows = list(list_inputs(str(root), recorded=recorded))
        run2 = check(rows, [p for p in inputs if is_image_name(p)])
        assert {p: run2.get(p) for p in run1} == run1  # every key of run 1 kept


url_component = st.one_of(component, st.just(""), st.just("."))  # '//' and './' in object-store names


@SETTINGS
@given(
    st.lists(st.lists(url_component, min_size=1, max_size=3), min_size=1, max_size=6),
    st.lists(st.lists(url_component, min_size=1, max_size=3), max_size=6),
    st.lists(st.tuples(component, extension), min_size=12, max_size=12),
    st.sampled_from(["s3://bkt/", "http://user:CANARY@127.0.0.1:8/"]),
)
def test_manifest_keys_unique_safe_and_stable(first, later, names, base):
    def urls(entries, offset, run):
        out = []
        for i, dirs in enumerate(entries):
            stem, ext = names[(i + offset) % len(names)]
            query = f"?X-Amz-Signature=SIG{run}&X-Amz-Expires=60" if base.startswith("http") else ""
            out.append(base + "/".join([*dirs, f"{stem}.{ext}"]) + query)  # presigned anew each run
        return out

    with tempfile.TemporaryDirectory() as tmp:
        manifest = os.path.join(tmp, "m.txt")
        run1_entries = urls(first, 0, 1)
        Path(manifest).write_text("\n".join(run1_entries) + "\n")
        rows = list(list_inputs(manifest))
        run1 = check(rows, run1_entries)
        recorded = through_parts(rows, Path(tmp) / "out")
        again = urls(first, 0, 2)
        entries = again + urls(later, 5, 2) + again[:1]  # new entries, and one twice
        Path(manifest).write_text("\n".join(entries) + "\n")
        run2 = check(list(list_inputs(manifest, recorded=recorded)), entries)
        assert {p.replace("SIG1", "SIG2"): k for p, k in run1.items()} == {
            p.replace("SIG1", "SIG2"): run2.get(p.replace("SIG1", "SIG2")) for p in run1
        }
