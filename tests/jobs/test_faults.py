"""Fault injection (tests/faults.py): segment, pseudo-label, export and the training pairs through a
seeded proxy in front of the loopback S3 that fails a share of listings, reads and writes with 503
SlowDown, 500, resets, bodies cut short, stalls past the read timeout and writes applied at the
store whose answer is lost (the client retries a request that already landed), and an endpoint
that refuses connections for a few seconds mid-run. Each run ends without a traceback, with every
input predicted or in errors/ (as retryable, unless it is truly bad); at most two re-runs reach
every input done; every key has one row and one whole mask; none is in both errors/ and
predictions/; the training pairs are the same with and without faults. Each test asserts that the
faults it relies on were applied, not merely drawn."""

# ruff: noqa: F811  (head_file: test_segment's module fixture, taken as an argument)
from __future__ import annotations

import io

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
from faults import FaultProxy
from PIL import Image
from test_segment import SMALL, head_file, jpeg  # noqa: F401  (head_file: the module's fixture)

from model.classes import bundled
from pipeline.segment import SegmentConfig, run_segment

N = 24
# every kind of fault (`lost`: a request applied at the store whose answer never comes); a stall
# costs about a second (timeouts of 1 s), so it is drawn less often
FAULTS = ("503", "500", "reset", "cut", "lost") * 3 + ("stall",)
RATES = {"list": 0.2, "read": 0.25, "write": 0.25}
KEYS = {f"{'sub/' if i % 3 else ''}img{i:02d}" for i in range(N)}  # the fixture's images


@pytest.fixture(scope="module")
def faulty(s3_server, s3_new_bucket):
    """(proxy, bucket, direct storage options, faulty storage options), inputs in bucket/in:
    N tiny images in two folders and one corrupt file."""
    bucket, direct = s3_new_bucket()
    proxy = FaultProxy(s3_server, seed=13, stall_s=1.5)
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **direct)
    files = {f"{bucket}/in/{'sub/' if i % 3 else ''}img{i:02d}.jpg": jpeg(20 + i, 16 + i % 5, i) for i in range(N)}
    files[f"{bucket}/in/corrupt.jpg"] = b"not an image"
    voc = bundled("voc2012")
    for i in range(N):  # index masks for the export and the training pairs, in the images' sizes
        buf = io.BytesIO()
        mask = Image.fromarray(np.full((16 + i % 5, 20 + i), i % 4, np.uint8), "P")
        mask.putpalette([c for rgb in voc.colors[:256] for c in rgb])
        mask.save(buf, "PNG")
        files[f"{bucket}/labels/masks/{'sub/' if i % 3 else ''}img{i:02d}.png"] = buf.getvalue()
    fs.pipe(files)
    yield proxy, bucket, direct, proxy.storage_options()
    proxy.close()


@pytest.fixture(autouse=True)
def _fresh_tally(request):
    """Each test counts only the faults applied during it (the proxy is the module's)."""
    if "faulty" in request.fixturenames:
        request.getfixturevalue("faulty")[0].clear()


def applied(proxy: FaultProxy, *operations: str) -> None:
    """Each of `operations` had at least one fault actually applied (not merely drawn)."""
    missing = [op for op in operations if not any(o == op for o, _ in proxy.injected)]
    assert not missing, f"no fault was applied to {missing}: the test proves less ({dict(proxy.injected)})"


def rows(fs, folder: str) -> list[dict]:
    fs.invalidate_cache()
    files = [f for f in fs.find(folder) if f.endswith(".parquet")] if fs.exists(folder) else []
    return [r for f in files for r in pq.read_table(fs.open(f)).to_pylist()]


@pytest.mark.slow  # a real Ray, and retries that take seconds
def test_segment_under_faults_loses_nothing_and_reruns_finish(ray_local, faulty, head_file):
    proxy, bucket, direct, so = faulty
    out = f"s3://{bucket}/seg"
    config = SegmentConfig(f"s3://{bucket}/in", out, model=None, head=head_file, storage_options=so, **SMALL)
    proxy.set(RATES, FAULTS)
    runs = []
    try:
        for _ in range(3):  # the first run and at most two re-runs
            s3fs.S3FileSystem.clear_instance_cache()
            runs.append(run_segment(config))  # never raises: a fault is retried or becomes a row
            fs = fsspec.filesystem("s3", skip_instance_cache=True, **direct)
            errors = rows(fs, f"{bucket}/seg/errors")
            assert all(e["retryable"] for e in errors if e["key"] != "corrupt"), errors
            if {e["key"] for e in errors} == {"corrupt"}:
                break
    finally:
        proxy.set({})
    applied(proxy, "list", "read", "write")
    assert proxy.injected["write", "lost"], "no write was applied with its answer lost"
    first = runs[0]
    assert first["inputs"] == N + 1 and first["inputs"] == first["predicted"] + first["skipped"] + first["failed"]
    assert {e["key"] for e in errors} == {"corrupt"}, f"not done after {len(runs)} runs: {errors}"
    assert len(errors) == 1 and errors[0]["retryable"] is False and errors[0]["stage"] == "decode"
    predictions = rows(fs, f"{bucket}/seg/predictions")
    keys = [r["key"] for r in predictions]
    assert len(keys) == len(set(keys)) == N, "every key has exactly one row"
    assert "corrupt" not in keys
    for r in predictions:  # one whole mask each, at its image's size
        with fs.open(r["mask"]) as f:
            assert Image.open(f).size == (r["width"], r["height"])
    assert len(fs.find(f"{bucket}/seg/masks")) == N


@pytest.mark.slow  # a real Ray, and retries that take seconds
def test_mask_puts_that_keep_failing_are_retryable_rows_without_orphan_overlays(ray_local, faulty, head_file):
    proxy, bucket, direct, so = faulty
    out = f"s3://{bucket}/seg-overlays"
    # the clients' own retries kept short: every mask PUT under sub/ fails however often it is tried
    quick = so | {"config_kwargs": so["config_kwargs"] | {"retries": {"max_attempts": 1}}}
    config = SegmentConfig(
        f"s3://{bucket}/in", out, model=None, head=head_file, storage_options=quick, overlays=True, **SMALL
    )
    proxy.set({"write": 1.0}, ("reset", "503"), only="/seg-overlays/masks/sub/img01.")  # every PUT of that mask
    try:
        s3fs.S3FileSystem.clear_instance_cache()
        first = run_segment(config)  # no traceback: the rows say what failed
    finally:
        proxy.set({})
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **direct)
    sub = {"sub/img01"}
    errors = {e["key"]: e for e in rows(fs, f"{bucket}/seg-overlays/errors")}
    assert set(errors) == sub | {"corrupt"} and first["failed"] == len(sub) + 1
    assert all(errors[k]["stage"] == "write" and errors[k]["retryable"] for k in sub)
    overlays = {p.rsplit("/overlays/", 1)[1][: -len(".jpg")] for p in fs.find(f"{bucket}/seg-overlays/overlays")}
    assert not overlays & sub, "an overlay stands without its mask"

    s3fs.S3FileSystem.clear_instance_cache()
    second = run_segment(config)  # the store answers again: the retryable rows are retried
    assert second["predicted"] == len(sub) and second["skipped"] == N - len(sub)
    errors = rows(fs, f"{bucket}/seg-overlays/errors")
    assert [e["key"] for e in errors] == ["corrupt"], "errors/ shows the latest state"
    keys = [r["key"] for r in rows(fs, f"{bucket}/seg-overlays/predictions")]
    assert len(keys) == len(set(keys)) == N
    assert len(fs.find(f"{bucket}/seg-overlays/overlays")) == len(fs.find(f"{bucket}/seg-overlays/masks")) == N


def test_export_under_faults_reads_every_mask(faulty, tmp_path):
    from pipeline.label.export import ExportConfig, run_export

    proxy, bucket, direct, so = faulty
    labels = f"s3://{bucket}/labels"
    plain = run_export(ExportConfig(labels, str(tmp_path / "plain"), classes="voc2012", storage_options=direct))
    proxy.set({"list": 1.0, "read": 0.4}, FAULTS, once=True)  # every listing request fails once
    try:
        s3fs.S3FileSystem.clear_instance_cache()
        faulted = run_export(ExportConfig(labels, str(tmp_path / "faulted"), classes="voc2012", storage_options=so))
    finally:
        proxy.set({})
    applied(proxy, "list", "read")
    assert plain["counts"] == faulted["counts"] == {"masks": N, "exported": N, "failed": 0}
    assert (tmp_path / "plain/annotations.json").read_bytes() == (tmp_path / "faulted/annotations.json").read_bytes()


@pytest.mark.slow  # a real Ray
def test_training_pairs_are_the_same_with_and_without_faults(ray_local, faulty):
    from pipeline import runtime
    from pipeline.data.pairs import list_pairs
    from pipeline.features.check import check_pairs
    from pipeline.features.pairs import PairConfig

    proxy, bucket, direct, so = faulty
    resources = runtime.Resources(decode_cpus=0.25).resolve(runtime.cluster_resources(joined=True))

    def check(options):
        s3fs.S3FileSystem.clear_instance_cache()
        pairs = list_pairs(f"s3://{bucket}/in", f"s3://{bucket}/labels/masks", options)
        good, problems = check_pairs(pairs, PairConfig(21, None, keep=False), options, resources)
        return pairs.keys, good, sorted(p["key"] for p in problems + pairs.problems)

    plain = check(direct)
    proxy.set({"list": 1.0, "read": 0.4}, FAULTS, once=True)  # every listing request fails once
    try:
        faulted = check(so)
    finally:
        proxy.set({})
    applied(proxy, "list", "read")
    assert len(plain[1]) == N and faulted[1] == plain[1] and faulted[0] == plain[0]
    assert faulted[2] == plain[2] == ["corrupt"]


def check_output(fs, out: str, done_errors: set[str] = frozenset({"corrupt"})) -> list[dict]:
    """The invariants of a finished OUTPUT (bucket/folder): errors/ holds only `done_errors`, every
    other key one row and one whole mask, none in both errors/ and predictions/; its rows."""
    errors = rows(fs, f"{out}/errors")
    predictions = rows(fs, f"{out}/predictions")
    keys = [r["key"] for r in predictions]
    assert {e["key"] for e in errors} == set(done_errors) and len(errors) == len(done_errors), errors
    assert len(keys) == len(set(keys)) == N and set(keys) == KEYS, "every key has exactly one row"
    assert not set(keys) & set(done_errors), "a key in both errors/ and predictions/"
    for r in predictions:  # one whole mask each, at its image's size
        with fs.open(r["mask"]) as f:
            assert Image.open(f).size == (r["width"], r["height"])
    assert len(fs.find(f"{out}/masks")) == N
    return predictions


@pytest.mark.slow  # a real Ray, and an outage that takes seconds
def test_lost_answers_and_an_outage_mid_run_lose_nothing(ray_local, faulty, head_file, monkeypatch):
    """The writes that decide a run (the lease's create and renewals, parts, run.json) and a few
    masks are applied at the store and their answers lost once: the client retries a request that
    already landed (a conditional create finds its own first copy). And once a few masks are
    written, the endpoint refuses every connection (EndpointConnectionError) for seconds, about as
    long as dinoseg's own retries of a mask write (botocore's kept to one attempt). The run ends
    without a traceback, every input is predicted or in errors/ as retryable after each run, and at
    most two re-runs finish."""
    proxy, bucket, direct, so = faulty
    monkeypatch.setenv("DINOSEG_LEASE_STALE_S", "8")  # a heartbeat every 2 s: renewals lose answers too
    out = f"s3://{bucket}/seg-lost"
    quick = so | {"config_kwargs": so["config_kwargs"] | {"retries": {"max_attempts": 1}}}
    config = SegmentConfig(f"s3://{bucket}/in", out, model=None, head=head_file, storage_options=quick, **SMALL)
    lose = ("lease.json", "masks/sub/img01.", "masks/img03.", "predictions/", "errors/", "run.json", "identity.json")
    proxy.set({"write": 1.0}, ("lost",), only=tuple(f"/{bucket}/seg-lost/{p}" for p in lose), once=True)
    proxy.outage_at("write", 6, seconds=3.0, only=f"/{bucket}/seg-lost/masks/")  # with_retries waits 3.5 s
    runs = []
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **direct)
    try:
        for _ in range(3):  # the first run and at most two re-runs
            s3fs.S3FileSystem.clear_instance_cache()
            runs.append(run_segment(config))  # never raises
            errors = {e["key"]: e for e in rows(fs, f"{bucket}/seg-lost/errors")}
            assert all(e["retryable"] for k, e in errors.items() if k != "corrupt"), errors
            predicted = {r["key"] for r in rows(fs, f"{bucket}/seg-lost/predictions")}
            assert predicted | set(errors) == KEYS | {"corrupt"}, "an input is unaccounted for"
            assert not predicted & set(errors), "a key in both errors/ and predictions/"
            if set(errors) == {"corrupt"}:
                break
    finally:
        proxy.set({})
    assert proxy.outages == 1 and proxy.injected["write", "outage"] >= 1, "no outage: the test proves less"
    lost = [path for op, fault, method, path in proxy.applied if fault == "lost"]
    for name in ("/lease.json", "/masks/", "/predictions/", "/errors/", "/run.json", "/identity.json"):
        assert any(name in p for p in lost), f"no {name} write lost its answer: the test proves less"
    assert lost.count(f"/{bucket}/seg-lost/lease.json") >= 2, "the lease's renewals lost none"
    check_output(fs, f"{bucket}/seg-lost")
    assert not fs.exists(f"{bucket}/seg-lost/lease.json"), "the lease was not released"

    s3fs.S3FileSystem.clear_instance_cache()
    again = run_segment(config)  # what the lost answers wrote resumes as finished work
    assert again["skipped"] == N and again["predicted"] == 0


@pytest.mark.slow  # a real Ray
def test_pseudo_label_under_faults_loses_nothing_and_reruns_finish(ray_local, faulty, head_file):
    from pipeline.label import PseudoLabelConfig, run_pseudo_label

    proxy, bucket, direct, so = faulty
    out = f"s3://{bucket}/pl"
    seg = SegmentConfig(f"s3://{bucket}/in", out, model=None, head=head_file, storage_options=so, **SMALL)
    proxy.set({"list": 0.15, "read": 0.15, "write": 0.15}, ("503", "500", "reset", "cut", "lost"))
    runs = []
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **direct)
    try:
        for _ in range(3):  # the first run and at most two re-runs
            s3fs.S3FileSystem.clear_instance_cache()
            runs.append(run_pseudo_label(PseudoLabelConfig(seg, threshold=0.5)))  # never raises
            errors = rows(fs, f"{bucket}/pl/raw/errors") + rows(fs, f"{bucket}/pl/errors")
            assert all(e["retryable"] for e in errors if e["key"] != "corrupt"), errors
            if {e["key"] for e in errors} == {"corrupt"}:
                break
    finally:
        proxy.set({})
    applied(proxy, "list", "read", "write")
    assert {e["key"] for e in errors} == {"corrupt"}, f"not done after {len(runs)} runs: {errors}"
    check_output(fs, f"{bucket}/pl/raw")
    labels = rows(fs, f"{bucket}/pl/labels")
    keys = [r["key"] for r in labels]
    assert len(keys) == len(set(keys)) == N, "every key has exactly one label row"
    selected = {r["key"] for r in labels if r["selected"]}
    assert {p.split("/pl/masks/", 1)[1][: -len(".png")] for p in fs.find(f"{bucket}/pl/masks")} == selected
    assert runs[-1]["counts"] == {"images": N, "pairs": len(selected), "below_coverage": N - len(selected), "failed": 0}
    assert not fs.exists(f"{bucket}/pl/lease.json") and not fs.exists(f"{bucket}/pl/raw/lease.json")
