"""The README's commands, run as written (see tests/readme.py): the quick start through the
`./dinoseg` script, the single-machine and object-storage segment commands, and the train ->
segment -> evaluate -> pseudo-label -> export -> import -> train sequence (the labeling loop). The `ray job submit`, demo and
self-train commands are run by tests/jobs/test_ray_job_submit.py, test_demo.py, test_self_train.py."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hubs import write_hub
from PIL import Image
from readme import CI_RUN, NOT_RUN, ROOT, command, commands, run_in_process, run_script

PHOTOS = {"a.jpg": (64, 48, 0), "sub/b.jpg": (40, 64, 1), "c.png": (80, 60, 2)}


def write_photos(root: Path) -> None:
    for rel, (w, h, seed) in PHOTOS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / rel)


# --- every command is run somewhere ---------------------------------------------------------


def claimed_prefixes() -> set[str]:
    """The prefixes tests pass to `command(...)`, read from their source."""
    found = set()
    for path in (ROOT / "tests").rglob("*.py"):
        # a prefix may hold the other kind of quote (a README argument with spaces is quoted)
        found |= {m[1] for m in re.findall(r"""\bcommand\(\s*(["'])(.+?)\1""", path.read_text())}
    return found


def test_every_readme_command_is_run_by_a_test_or_ci():
    assert len(commands()) >= 20  # the parser finds the README's blocks
    run = {shlex.join(command(prefix)) for prefix in claimed_prefixes()}  # each claim names one README command
    unclaimed = [line for line in map(shlex.join, commands()) if line not in run | set(NOT_RUN) | set(CI_RUN)]
    assert not unclaimed, f"README commands no test runs: {unclaimed}"
    assert set(NOT_RUN) <= {shlex.join(c) for c in commands()}, "NOT_RUN lists a command the README no longer shows"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    for line in CI_RUN:
        assert line in {shlex.join(c) for c in commands()}
        assert re.search(rf"^\s*{re.escape(line)}\b", ci, re.M), f".ci/run does not call {line}"


def test_the_parser_joins_continuations_and_drops_comments():
    text = "intro\n```bash\n./dinoseg a \\\n    --b 1   # why\n\n# only a comment\nray job x\n```\n```python\nnot = 'this'\n```\n"
    assert commands(text) == [["./dinoseg", "a", "--b", "1"], ["ray", "job", "x"]]


# --- the commands -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    write_hub(root, ["dinov2_vits14_voc2012_linear", "dinov2_vits14_ade20k_ms"])
    return root


@pytest.fixture
def weights(hub, monkeypatch):
    monkeypatch.setenv("DINOSEG_HUB", str(hub))


@pytest.mark.slow
def test_quick_start_through_the_script(tmp_path, hub):
    write_photos(tmp_path / "photos")
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not an image")
    argv = command("./dinoseg segment ./photos ./out")
    assert argv == ["./dinoseg", "segment", "./photos", "./out"]
    env = os.environ | {"DINOSEG_HUB": str(hub), "DINOSEG_CACHE": str(tmp_path / "cache")}
    done = run_script(argv, tmp_path, env)
    assert done.returncode == 0, done.stderr[-3000:]
    for rel, (w, h, _) in PHOTOS.items():
        assert Image.open(tmp_path / "out" / "masks" / Path(rel).with_suffix(".png")).size == (w, h)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["model"] == "dinov2_vits14_voc2012_linear"
    assert run["counts"] == {"inputs": 4, "predicted": 3, "skipped": 0, "failed": 1}

    # without the weights: one sentence that says where to point DINOSEG_HUB, and nothing written
    offline = run_script(
        argv, tmp_path, env | {"DINOSEG_HUB": "http://127.0.0.1:9", "DINOSEG_CACHE": str(tmp_path / "c2")}
    )
    assert offline.returncode == 2
    message = offline.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in offline.stderr
    assert "DINOSEG_HUB" in message and "--backbone-weights" in message


@pytest.mark.slow
def test_segment_on_one_machine(ray_local, tmp_path, weights):
    write_photos(tmp_path / "photos")
    (tmp_path / "manifest.csv").write_text("path\n" + "".join(f"photos/{rel}\n" for rel in PHOTOS))
    assert run_in_process(command("./dinoseg segment ./photos ./out-overlays --overlays"), tmp_path) == 0
    assert sorted(p.name for p in (tmp_path / "out-overlays" / "overlays").rglob("*.jpg")) == [
        "a.jpg",
        "b.jpg",
        "c.jpg",
    ]
    assert run_in_process(command("./dinoseg segment manifest.csv"), tmp_path) == 0
    rows = pq.read_table(tmp_path / "out-manifest" / "predictions").to_pylist()
    assert len(rows) == 3 and all(r["mask_png"]["bytes"] and r["rle"] for r in rows)
    assert run_in_process(command("python -m jobs.segment ./photos"), tmp_path) == 0
    same = [np.array(Image.open(tmp_path / out / "masks" / "a.png")) for out in ("out-overlays", "out-module")]
    assert np.array_equal(*same)  # the module and the CLI are one job
    assert run_in_process(command("./dinoseg models"), tmp_path) == 0


@pytest.mark.slow
def test_segment_from_and_to_object_storage(tmp_path, hub, s3_server, s3_client):
    """In a process of its own, as a user runs it: the endpoint and credentials come from the
    environment, which the embedded Ray's workers inherit."""
    bucket = re.match(r"s3://([^/]+)/", command("./dinoseg segment s3://")[2])[1]
    client = s3_client
    client.create_bucket(Bucket=bucket)  # the README's bucket: other tests of the session use it too
    for item in client.list_objects_v2(Bucket=bucket).get("Contents", []):
        client.delete_object(Bucket=bucket, Key=item["Key"])
    write_photos(tmp_path / "photos")
    for rel in PHOTOS:
        client.put_object(Bucket=bucket, Key=f"photos/{rel}", Body=(tmp_path / "photos" / rel).read_bytes())
    env = os.environ | {
        "DINOSEG_HUB": str(hub),
        "DINOSEG_CACHE": str(tmp_path / "cache"),
        "AWS_ENDPOINT_URL": s3_server,
    }
    argv = command("./dinoseg segment s3://")
    done = run_script(argv, tmp_path, env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = argv[3].removeprefix(f"s3://{bucket}/").rstrip("/")
    mask = client.get_object(Bucket=bucket, Key=f"{out}/masks/sub/b.png")["Body"].read()
    assert Image.open(io.BytesIO(mask)).size == (40, 64)
    run_info = json.loads(client.get_object(Bucket=bucket, Key=f"{out}/run.json")["Body"].read())
    assert run_info["model"] == argv[-1] and run_info["counts"]["predicted"] == len(PHOTOS)


@pytest.mark.slow
def test_train_segment_evaluate_pseudo_label_export_and_the_labeling_loop(ray_local, labelstudio, tmp_path, capsys):
    """The Train, Evaluate, Pseudo-labels, Export and Labeling loop sections, in order, in one
    folder; the people correcting are Label Studio's API (a real Label Studio on loopback)."""

    def run(argv: list[str]) -> str:
        assert run_in_process(argv, tmp_path) == 0, argv
        return capsys.readouterr().out

    run(command("./dinoseg synthetic ./syn"))
    train = command("./dinoseg train ./syn/train/images")
    run(train)
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best = max(r["val_miou"] for r in history)
    assert len(history) == int(train[train.index("--epochs") + 1]) and best >= 0.65  # "about 0.75" in the README
    run(command("./dinoseg segment ./syn/val/images ./seg --head ./run/head.pt"))
    printed = run(command("./dinoseg evaluate ./seg/masks"))
    evaluation = json.loads((tmp_path / "seg" / "masks" / "evaluation.json").read_text())
    assert evaluation["miou"] == pytest.approx(best, abs=0.03) and "mIoU" in printed  # "scores the same"

    run(command("./dinoseg synthetic ./more"))
    run(
        command(
            "./dinoseg pseudo-label ./more/train/images ./pl --head ./run/head.pt --backbone-weights random --threshold"
        )
    )
    assert len((tmp_path / "pl" / "pairs.csv").read_text().splitlines()) > 1
    run(
        command(
            "./dinoseg pseudo-label ./more/train/images ./pl --head ./run/head.pt --backbone-weights random --class-balanced"
        )
    )
    thresholds = json.loads((tmp_path / "pl" / "thresholds.json").read_text())
    assert thresholds["rule"] == "class-balanced" and len(thresholds["classes"]) == 5
    assert all(c["kept_fraction"] >= 0.5 for c in thresholds["classes"] if c["predicted_pixels"])
    pairs = (tmp_path / "pl" / "pairs.csv").read_text().splitlines()
    run(command("./dinoseg train ./pl/pairs.csv"))
    trained = json.loads((tmp_path / "run2" / "train.json").read_text())
    assert trained["counts"]["train_pairs"] + trained["counts"]["val_pairs"] == len(pairs) - 1

    run(command("./dinoseg export ./pl ./pl-coco"))
    coco = json.loads((tmp_path / "pl-coco" / "annotations.json").read_text())
    assert len(coco["images"]) == len(pairs) - 1 and coco["annotations"]
    run(command("./dinoseg export ./pl ./pl-cvat"))
    with zipfile.ZipFile(tmp_path / "pl-cvat.zip") as z:
        assert "labelmap.txt" in z.namelist()
    run(command("./dinoseg export ./seg ./seg-ls"))
    assert len(json.loads((tmp_path / "seg-ls" / "tasks.json").read_text())) == 16
    _labeling_loop(run, labelstudio, tmp_path, len(pairs) - 1)


def _masks(folder: Path) -> dict:
    """{key: mask} of the masks under folder/masks."""
    from pipeline.io.masks import decode_mask_png

    root = folder / "masks"
    return {
        p.relative_to(root).with_suffix("").as_posix(): decode_mask_png(p.read_bytes()) for p in root.rglob("*.png")
    }


def _labeling_loop(run, labelstudio, tmp_path: Path, n_pairs: int) -> None:
    pl = _masks(tmp_path / "pl")
    assert len(pl) == n_pairs
    run(command("./dinoseg export ./pl ./pl-ls"))
    project = labelstudio.create_project((tmp_path / "pl-ls" / "labeling_config.xml").read_text())
    labelstudio.import_tasks(project, json.loads((tmp_path / "pl-ls" / "tasks.json").read_text()))
    tasks = labelstudio.tasks(project)
    for task in tasks[1:]:  # the annotators accept the predictions, and skip the first task
        labelstudio.create_annotation(task["id"], labelstudio.task(task["id"])["predictions"][0]["result"])
    (tmp_path / "corrected.json").write_text(json.dumps(labelstudio.export(project)))
    printed = run(command("./dinoseg import ./corrected.json"))
    assert "skipped: not annotated" in printed
    fixed = _masks(tmp_path / "fixed")
    assert len(fixed) == n_pairs - 1 and all((fixed[k] == pl[k]).all() for k in fixed)  # 255 stays 255
    run(command("./dinoseg train ./fixed/pairs.csv"))
    trained = json.loads((tmp_path / "run3" / "train.json").read_text())
    assert trained["counts"]["train_pairs"] + trained["counts"]["val_pairs"] == n_pairs - 1
    run(command("./dinoseg pseudo-label ./more/train/images ./pl2"))
    assert (tmp_path / "pl2" / "pairs.csv").is_file()

    # CVAT and COCO: our own exports stand for what the tools give back after the corrections
    (tmp_path / "cvat-export.zip").write_bytes((tmp_path / "pl-cvat.zip").read_bytes())
    (tmp_path / "instances.json").write_bytes((tmp_path / "pl-coco" / "annotations.json").read_bytes())
    for argv, out in (
        (command("./dinoseg import ./cvat-export.zip"), "fixed-cvat"),
        (command("./dinoseg import ./instances.json"), "fixed-coco"),
    ):
        run(argv)
        back = _masks(tmp_path / out)
        assert sorted(back) == sorted(pl) and all((back[k] == pl[k]).all() for k in pl), out
