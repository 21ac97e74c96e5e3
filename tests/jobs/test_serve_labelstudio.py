"""`dinoseg serve-labelstudio` end to end: the README's command (its own process, Ray embedded,
Ray Serve) connected to the session's real Label Studio, which asks it for predictions of a
project's tasks; the brush RLE that Label Studio stores is decoded by Label Studio's own decoder
and compared with the model run here directly. Bad requests answer errors, never stop the server."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from labelstudio import decode_brush
from PIL import Image
from readme import ROOT, command

from model.checkpoint import HeadCheckpoint, save_head_checkpoint
from model.classes import ClassMap
from model.heads import HeadConfig, LinearHead
from model.hub import build_segmenter
from pipeline.label.backend import model_version
from pipeline.label.exporters import labelstudio_config

CLASSES = ClassMap(("background", "red", "green", "blue"), ((0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)))
SIZES = {"a.png": (64, 48), "b.jpg": (40, 56)}
START_TIMEOUT_S = 240


def image_bytes(name: str, seed: int) -> bytes:
    w, h = SIZES[name]
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    pixels[: h // 2, : w // 2] = (250, 10, 10)  # a region of one colour, so classes differ
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG" if name.endswith(".png") else "JPEG", quality=95)
    return buf.getvalue()


def write_head(path: Path) -> None:
    torch.manual_seed(3)
    head = LinearHead(HeadConfig("linear", (11,), 384, len(CLASSES)))
    for p in head.parameters():
        p.data.normal_(0, 0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_head_checkpoint(
        HeadCheckpoint("dinov2_vits14", head.config, CLASSES, head.state_dict(), resolution=56), str(path)
    )


def port_of(argv: list[str]) -> int:
    return int(argv[argv.index("--port") + 1])


def wait_for_backend(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"serve-labelstudio exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    pytest.fail(f"serve-labelstudio did not answer {url}/health in {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> int:
    """SIGINT (Ctrl-C) first, as a person stops it; the process group is killed if that fails."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        return -9


@pytest.mark.slow
def test_label_studio_gets_brush_predictions_from_serve_labelstudio(labelstudio, tmp_path):
    ls = labelstudio
    argv = command("./dinoseg serve-labelstudio")
    port = port_of(argv)
    with socket.socket() as s:  # the README's port; a busy one would make the test talk to something else
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} is taken: free it to run this test"
    write_head(tmp_path / "run" / "head.pt")
    backend_url = f"http://127.0.0.1:{port}"
    # the token and Label Studio's URL come from the environment, never the command line
    env = os.environ | {
        "LABEL_STUDIO_URL": ls.url,
        "DINOSEG_LABELSTUDIO_TOKEN": ls.token,
        "DINOSEG_CACHE": str(tmp_path / "cache"),
    }
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(ROOT / "dinoseg"), *argv[1:]],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_backend(backend_url, proc, log)
        _check_predictions(ls, backend_url, tmp_path)
        _check_bad_requests(ls, backend_url)
        assert requests.get(f"{backend_url}/health", timeout=10).json()["status"] == "UP"  # still up
    finally:
        code = stop(proc)
    output = log.read_text()
    assert code == 0, output[-4000:]
    assert ls.token not in output  # the token is never logged
    assert f"{backend_url}" in output and "Settings > Model" in output  # says where to point Label Studio


def _check_predictions(ls, backend_url: str, tmp_path: Path) -> None:
    project = ls.create_project(labelstudio_config(CLASSES))
    images = {name: image_bytes(name, seed) for seed, name in enumerate(SIZES)}
    for name, data in images.items():  # stored by Label Studio: the backend fetches them with the token
        ls.upload_image(project, name, data, "image/png" if name.endswith(".png") else "image/jpeg")
    ls.import_tasks(project, [{"data": {"image": "http://127.0.0.1:9/gone.png"}}])  # unreachable: no prediction
    tasks = ls.tasks(project)
    assert len(tasks) == 3

    backend = ls.connect_ml_backend(project, backend_url, is_interactive=True)  # as the Model settings page does
    head_file = str(tmp_path / "run" / "head.pt")
    segmenter = build_segmenter(head=head_file, backbone_weights="random", device="cpu")
    version = model_version(segmenter.model_id, segmenter.head_checksum)
    assert backend["readable_state"] == "Connected" and backend["model_version"] == version

    assert ls.retrieve_predictions(project)["processed_items"] == 3
    predictions = {p["task"]: p for p in ls.predictions(project)}
    by_task = {t["id"]: t for t in tasks}
    assert sorted(predictions) == sorted(t["id"] for t in tasks if "/data/upload/" in t["data"]["image"])
    for task_id, prediction in predictions.items():
        name = next(n for n in images if by_task[task_id]["data"]["image"].endswith(n))
        w, h = SIZES[name]
        direct = segmenter.predict([np.asarray(Image.open(io.BytesIO(images[name])).convert("RGB"))])[0]
        assert prediction["model_version"] == version
        assert 0 < prediction["score"] <= 1
        regions = prediction["result"]
        assert {r["value"]["brushlabels"][0] for r in regions} == {CLASSES.names[c] for c in np.unique(direct.mask)}
        decoded = decode_brush([r["value"]["rle"] for r in regions])
        for region, words in zip(regions, decoded, strict=True):
            assert (region["from_name"], region["to_name"], region["type"]) == ("tag", "image", "brushlabels")
            assert (region["original_width"], region["original_height"]) == (w, h)
            assert words.size == 4 * w * h
            mask = words.reshape(h, w, 4)[..., 3] > 0
            expected = direct.mask == CLASSES.names.index(region["value"]["brushlabels"][0])
            assert (mask == expected).mean() > 0.995  # the same model here (CPU threads may flip a near-tie)
            assert region["score"] == pytest.approx(float(direct.confidence[expected].mean()), abs=0.01)

    # interactive pre-annotation (one task, asked for as a task opens): the same regions
    task_id = min(predictions)
    interactive = ls.interactive_prediction(backend["id"], task_id)
    assert [r["value"] for r in interactive["data"]["result"]] == [r["value"] for r in predictions[task_id]["result"]]


def _check_bad_requests(ls, backend_url: str) -> None:
    # a project whose labeling config has no BrushLabels: Label Studio's connect fails with our reason logged
    choices = '<View><Image name="image" value="$image"/><Choices name="c" toName="image"><Choice value="x"/></Choices></View>'
    project = ls.create_project(choices, title="no brush labels")
    with pytest.raises(requests.HTTPError, match="valid ML backend"):
        ls.connect_ml_backend(project, backend_url)
    answer = requests.post(f"{backend_url}/setup", json={"schema": choices}, timeout=30)
    assert answer.status_code == 400 and "no <BrushLabels>" in answer.json()["error"]
    other = labelstudio_config(ClassMap(("sky", "road"), ((0, 0, 255), (90, 90, 90))))
    answer = requests.post(
        f"{backend_url}/predict",
        json={"tasks": [{"id": 1, "data": {"image": "/x.png"}}], "label_config": other},
        timeout=30,
    )
    assert answer.status_code == 400 and "none of the model's 4 classes" in answer.json()["error"]
    assert requests.post(f"{backend_url}/predict", data=b"{not json", timeout=30).status_code == 400

    # concurrent requests (Serve batches their images into model calls): each gets its own answer,
    # in its tasks' order, with the failed task in its place
    image = "data:image/png;base64," + base64.b64encode(image_bytes("a.png", 0)).decode()
    body = lambda i: {  # noqa: E731
        "tasks": [{"id": 100 + i, "data": {}}, {"id": i, "data": {"image": image}}],
        "label_config": labelstudio_config(CLASSES),
    }
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: requests.post(f"{backend_url}/predict", json=body(i), timeout=180), range(4)))
    first = None
    for i, answer in enumerate(answers):
        payload = answer.json()
        assert answer.status_code == 200, json.dumps(payload)[:500]
        missing, found = payload["results"]
        assert missing == [] and [e["task"] for e in payload["errors"]] == [100 + i]
        regions = [{k: v for k, v in r.items() if k != "id"} for r in found["result"]]  # ids name the task
        first = first or regions
        assert regions == first  # the same image, the same regions, whatever batch it ran in


def test_a_wrong_model_is_one_sentence_before_ray_starts(tmp_path, capsys):
    from jobs.cli import main

    assert main(["serve-labelstudio", "--head", str(tmp_path / "nope.pt"), "--backbone-weights", "random"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nope.pt does not exist" in err and "\n" not in err


@pytest.mark.slow
def test_a_port_in_use_is_one_sentence(tmp_path):
    write_head(tmp_path / "head.pt")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["serve-labelstudio", "--head", str(tmp_path / "head.pt"), "--backbone-weights", "random"]
        done = subprocess.run(
            [sys.executable, "-m", "jobs.cli", *argv, "--port", str(port)],
            cwd=ROOT,
            env=os.environ | {"DINOSEG_CACHE": str(tmp_path / "cache")},
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr
