"""`segment` on one OUTPUT: concurrent writers (one runs, the others are refused), resume identity
(a mask-changing option refused by name), and nothing written before INPUT, model and options are
checked (a typo'd INPUT with --overwrite loses nothing; an OUTPUT inside INPUT is refused).

One real run (the concurrent writers' winner) makes the OUTPUT every other test copies: those
runs are refused (or resume) before any Ray work."""
# ruff: noqa: F811  (head_file: test_segment's module fixture, taken as an argument)

import json
import shutil
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_segment import SMALL, head_file, jpeg  # noqa: F401  (head_file: the module's fixture)

from model.checkpoint import HeadCheckpoint, save_head_checkpoint
from model.classes import ClassMap
from model.errors import DinosegError
from model.heads import HeadConfig, LinearHead
from pipeline.io.lease import LEASE_NAME, Lease
from pipeline.segment import SegmentConfig, run_segment

SIZES = {"a": (40, 30), "b": (30, 44), "c": (56, 20), "d": (25, 25)}


def rows(folder: Path) -> list[dict]:
    files = sorted(folder.glob("*.parquet"))
    return pq.read_table(files).to_pylist() if files else []


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    src = tmp_path_factory.mktemp("photos")
    for i, (key, (w, h)) in enumerate(SIZES.items()):
        (src / f"{key}.jpg").write_bytes(jpeg(w, h, 10 + i))
    return src


@pytest.fixture(scope="module")
def other_head(tmp_path_factory):
    head = LinearHead(HeadConfig("linear", (11,), 384, 4))  # default initialisation: another model
    classes = ClassMap(("bg", "red", "green", "blue"), ((0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)))
    path = tmp_path_factory.mktemp("other") / "other.pt"
    save_head_checkpoint(
        HeadCheckpoint("dinov2_vits14", head.config, classes, head.state_dict(), resolution=56), str(path)
    )
    return str(path)


@pytest.fixture(scope="module")
def contested(ray_local, tmp_path_factory, images, head_file, other_head):
    """Three runs started together on one OUTPUT: the same model twice (one with --overwrite) and
    another model. They meet at the lease together (a barrier in front of it)."""
    out = tmp_path_factory.mktemp("contested") / "out"
    configs = {
        "same": SegmentConfig(str(images), str(out), model=None, head=head_file, **SMALL),
        "overwrite": SegmentConfig(str(images), str(out), model=None, head=head_file, overwrite=True, **SMALL),
        "another": SegmentConfig(str(images), str(out), model=None, head=other_head, **SMALL),
    }
    barrier = threading.Barrier(len(configs), timeout=120)
    acquire = Lease.acquire
    results: dict = {}

    def together(self):
        barrier.wait()
        return acquire(self)

    def run(name):
        try:
            results[name] = run_segment(configs[name])
        except Exception as e:
            results[name] = e

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Lease, "acquire", together)
        threads = [threading.Thread(target=run, args=(name,)) for name in configs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    return out, results


def copy_of(contested, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(contested[0], out)
    return out


@pytest.mark.slow  # a real Ray
def test_concurrent_writers_one_runs_the_others_are_refused(contested):
    out, results = contested
    ran = [n for n, r in results.items() if isinstance(r, dict)]
    refused = [r for r in results.values() if isinstance(r, Exception)]
    assert len(ran) == 1 and results[ran[0]]["predicted"] == len(SIZES), results
    assert len(refused) == 2
    for e in refused:
        assert isinstance(e, DinosegError) and "held by" in str(e) and "--take-over-lease" in str(e)
        assert "\n" not in str(e)
    keys = [r["key"] for r in rows(out / "predictions")]
    assert sorted(keys) == sorted(SIZES)  # every key exactly one row
    for key, size in SIZES.items():  # and one whole mask
        with Image.open(out / "masks" / f"{key}.png") as m:
            m.load()
            assert m.size == size
    assert not (out / LEASE_NAME).exists()  # released at the end
    identity = json.loads((out / "identity.json").read_text())
    assert {r["identity"] for r in rows(out / "predictions")} == {identity["digest"]}


@pytest.fixture(scope="module")
def backbone_weights(tmp_path_factory):
    from model.backbone import build_backbone

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("vit") / "vits14.pth"
    torch.save(build_backbone("dinov2_vits14").state_dict(), path)
    return str(path)


def _winner_head(contested, head_file, other_head):
    _, results = contested
    return other_head if isinstance(results.get("another"), dict) else head_file


@pytest.mark.slow  # a real Ray (the shared OUTPUT)
@pytest.mark.parametrize(
    "change, names",
    [
        ({"resolution": 112}, "--resolution 56, this run asks for 112"),
        ({"mode": "slide"}, "--mode whole, this run asks for slide"),
        ({"tta": True}, "--tta off, this run asks for on"),
        ({"precision": "fp32"}, "--precision auto, this run asks for fp32"),
        ({"backbone_weights": "FILE"}, "--backbone-weights random, this run asks for sha256:"),
    ],
)
def test_resume_refuses_a_mask_changing_option_by_name(
    contested,
    tmp_path,
    head_file,
    other_head,
    images,
    backbone_weights,
    change,
    names,
):
    out = copy_of(contested, tmp_path)
    before = snapshot(out)
    change = {k: backbone_weights if v == "FILE" else v for k, v in change.items()}
    config = SegmentConfig(
        str(images), str(out), model=None, head=_winner_head(contested, head_file, other_head), **{**SMALL, **change}
    )
    with pytest.raises(DinosegError) as e:
        run_segment(config)
    message = str(e.value)
    assert names in message and "--overwrite" in message and "\n" not in message
    assert snapshot(out) == before  # nothing written, nothing removed


@pytest.mark.slow  # a real Ray (the shared OUTPUT)
def test_options_that_do_not_change_a_mask_resume(contested, tmp_path, head_file, other_head, images):
    out = copy_of(contested, tmp_path)
    small = {**SMALL, "batch_size": 1, "cpus_per_actor": 0.25, "decode_cpus": 0.5}
    counts = run_segment(
        SegmentConfig(
            str(images),
            str(out),
            model=None,
            head=_winner_head(contested, head_file, other_head),
            device="cpu",
            max_megapixels=50,
            **small,
        )
    )
    assert counts == {"inputs": 4, "predicted": 0, "skipped": 4, "failed": 0}


@pytest.mark.slow  # a real Ray (the shared OUTPUT)
def test_rows_of_an_earlier_version_are_checked_by_their_run_json(
    contested,
    tmp_path,
    head_file,
    other_head,
    images,
):
    """An OUTPUT written before the identity existed: no `identity` column, no identity.json. Its
    rows resume when model, head and run.json's recorded options match, and are refused by name
    when those differ."""
    out = copy_of(contested, tmp_path)
    for part in (out / "predictions").glob("*.parquet"):
        table = pq.read_table(part)
        pq.write_table(table.drop_columns(["identity"]), part)
    (out / "identity.json").unlink()
    head = _winner_head(contested, head_file, other_head)
    info = json.loads((out / "run.json").read_text())
    info["arguments"]["resolution"] = 112  # the earlier run asked for 112
    (out / "run.json").write_text(json.dumps(info))
    with pytest.raises(DinosegError, match="--resolution 112, this run asks for 56"):
        run_segment(SegmentConfig(str(images), str(out), model=None, head=head, **SMALL))
    info["arguments"]["resolution"] = 56
    (out / "run.json").write_text(json.dumps(info))
    counts = run_segment(SegmentConfig(str(images), str(out), model=None, head=head, **SMALL))
    assert counts["skipped"] == 4 and counts["predicted"] == 0
    # that run vouched for them: identity.json now speaks for the rows without a digest
    assert json.loads((out / "identity.json").read_text())["settings"]["resolution"] == 56
    with pytest.raises(DinosegError, match="--resolution 56, this run asks for 112"):
        run_segment(SegmentConfig(str(images), str(out), model=None, head=head, **{**SMALL, "resolution": 112}))


@pytest.mark.slow  # a real Ray (the shared OUTPUT)
def test_a_typo_input_with_overwrite_loses_nothing(contested, tmp_path, head_file):
    out = copy_of(contested, tmp_path)
    before = snapshot(out)
    with pytest.raises(DinosegError, match="does not exist|not found|no such"):
        run_segment(
            SegmentConfig(str(tmp_path / "phtos"), str(out), model=None, head=head_file, overwrite=True, **SMALL)
        )
    assert snapshot(out) == before  # every row, mask and classes.yaml as it was


@pytest.mark.slow  # a real Ray (the shared OUTPUT)
def test_a_typo_input_on_s3_with_overwrite_loses_nothing(contested, s3_bucket, head_file):
    import fsspec

    bucket, so = s3_bucket
    fs = fsspec.filesystem("s3", **so)
    fs.put(str(contested[0]), f"{bucket}/seg", recursive=True)
    before = {p: fs.cat_file(p) for p in fs.find(f"{bucket}/seg")}
    assert any("/predictions/" in p for p in before)
    with pytest.raises(DinosegError):
        run_segment(
            SegmentConfig(
                f"s3://{bucket}/phtos",
                f"s3://{bucket}/seg",
                model=None,
                head=head_file,
                overwrite=True,
                storage_options=so,
                **SMALL,
            )
        )
    fs.invalidate_cache()
    assert {p: fs.cat_file(p) for p in fs.find(f"{bucket}/seg")} == before


def test_output_inside_input_is_refused_and_nothing_is_written(tmp_path, head_file):
    src = tmp_path / "photos"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg(20, 20, 1))
    before = snapshot(src)
    for out in (src / "seg", src):
        with pytest.raises(DinosegError, match="inside INPUT") as e:
            run_segment(SegmentConfig(str(src), str(out), model=None, head=head_file, **SMALL))
        assert "\n" not in str(e.value)
    with pytest.raises(DinosegError, match="masks/ folder"):
        run_segment(
            SegmentConfig(str(tmp_path / "o" / "masks"), str(tmp_path / "o"), model=None, head=head_file, **SMALL)
        )
    assert snapshot(src) == before and not (tmp_path / "o").exists()


def test_a_held_lease_refuses_a_run_before_it_writes(tmp_path, head_file):
    src = tmp_path / "photos"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg(20, 20, 1))
    out = tmp_path / "out"
    with Lease(str(out), "segment"):
        before = snapshot(out)
        with pytest.raises(DinosegError, match="held by run"):
            run_segment(SegmentConfig(str(src), str(out), model=None, head=head_file, overwrite=True, **SMALL))
        assert snapshot(out) == before


def test_the_backbone_digest_is_the_weights_caches_and_costs_no_second_hash(tmp_path, http_server, monkeypatch):
    """A hub file just downloaded (and hashed for its sidecar) is not hashed again for the run's
    identity; a --backbone-weights file is hashed once, then remembered by its stamp."""
    import hashlib

    import model.weights as weights
    from pipeline.segment.identity import weights_digest

    hub = tmp_path / "hub"
    relpath = weights.backbone_file("dinov2_vits14")
    (hub / relpath).parent.mkdir(parents=True)
    (hub / relpath).write_bytes(b"weights")
    monkeypatch.setenv("DINOSEG_HUB", http_server(hub).url)
    monkeypatch.setenv("DINOSEG_CACHE", str(tmp_path / "cache"))
    weights.fetch_hub_file(relpath)  # the build's download
    hashed, real = [], weights.file_sha256
    monkeypatch.setattr(weights, "file_sha256", lambda path: hashed.append(path) or real(path))
    assert weights_digest("dinov2_vits14", None) == "sha256:" + hashlib.sha256(b"weights").hexdigest()
    assert hashed == [] and not (tmp_path / "cache" / weights.DIGESTS).exists()  # the sidecar's digest

    mine = tmp_path / "mine.pth"
    mine.write_bytes(b"mine")
    for _ in range(2):
        assert weights_digest("dinov2_vits14", str(mine)) == "sha256:" + hashlib.sha256(b"mine").hexdigest()
    assert len(hashed) == 1
