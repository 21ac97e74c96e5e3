"""The Label Studio ML backend's protocol without HTTP or Ray: labeling configs, label names,
image URLs (Label Studio's own with its token, others without), and /predict's answer checked
against the model run directly, its brush RLE decoded by this folder's independent decoder."""

from __future__ import annotations

import base64
import http.server
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from test_exporters import ls_mask

from model.checkpoint import HeadCheckpoint, save_head_checkpoint
from model.classes import ClassMap
from model.heads import HeadConfig, LinearHead
from pipeline.label.backend import (
    BackendConfig,
    BackendError,
    BrushTarget,
    LabelStudioBackend,
    brush_target,
    fetch_bytes,
    label_map,
    model_version,
    resolve_image_url,
)
from pipeline.label.exporters import labelstudio_config
from pipeline.segment.predict import PredictConfig

CLASSES = ClassMap(("bg", "red", "green", "blue"), ((0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)))
CONFIG = labelstudio_config(CLASSES, "tag", "image")
TOKEN = "t" * 40


def png(w: int, h: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def backend(tmp_path_factory) -> LabelStudioBackend:
    torch.manual_seed(0)
    head = LinearHead(HeadConfig("linear", (11,), 384, 4))
    for p in head.parameters():
        p.data.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("head") / "head.pt"
    save_head_checkpoint(
        HeadCheckpoint("dinov2_vits14", head.config, CLASSES, head.state_dict(), resolution=28), str(path)
    )
    predict = PredictConfig(None, head=str(path), backbone_weights="random", device="cpu", threads=1)
    return LabelStudioBackend(
        BackendConfig(predict=predict, labelstudio_url="http://ls.invalid:8080", labelstudio_token=TOKEN)
    )


# --- labeling configs and labels ----------------------------------------------------------------


def test_brush_target_reads_the_brushlabels_over_an_image():
    target = brush_target(labelstudio_config(CLASSES, "brush", "img"))
    assert target == BrushTarget("brush", "img", "image", CLASSES.names)
    other = '<View><Text name="t" value="$text"/><Image name="pic" value="$photo"/><View><BrushLabels name="b" toName="pic"><Label value="cat"/></BrushLabels></View></View>'
    assert brush_target(other) == BrushTarget("b", "pic", "photo", ("cat",))


@pytest.mark.parametrize(
    "config, says",
    [
        ('<View><Image name="image" value="$image"/><Choices name="c" toName="image"/></View>', "no <BrushLabels>"),
        ("<View><Image", "not valid XML"),
        ('<View><Image name="i" value="http://x/a.png"/><BrushLabels name="b" toName="i"/></View>', 'value="$image"'),
        ("", "not valid XML"),
    ],
)
def test_a_config_without_brush_labels_on_an_image_is_one_clear_error(config, says):
    with pytest.raises(BackendError, match="config|Image") as e:
        brush_target(config)
    assert says in str(e.value)


def test_labels_match_class_names_exactly_or_ignoring_case_and_none_matching_is_an_error():
    target = BrushTarget("tag", "image", "image", ("Red", "blue", "sky"))
    assert label_map(target, CLASSES.names) == {1: "Red", 3: "blue"}  # bg and green have no label: never predicted
    with pytest.raises(BackendError, match="none of the model's 4 classes .*bg, red.* is a label.*sky"):
        label_map(BrushTarget("tag", "image", "image", ("sky", "tree")), CLASSES.names)


def test_model_version_names_the_model_and_the_head_weights():
    assert (
        model_version("dinov2_vits14+/runs/r1/head.pt", "0123456789abcdef") == "dinoseg-dinov2_vits14+head.pt-01234567"
    )
    assert model_version("dinov2_vits14_voc2012_linear", "") == "dinoseg-dinov2_vits14_voc2012_linear"


# --- image URLs -------------------------------------------------------------------------------------


def test_label_studio_urls_get_the_token_and_others_do_not():
    ls = "http://ls.example:8080"
    assert resolve_image_url("/data/upload/3/a.png", ls) == ("http://ls.example:8080/data/upload/3/a.png", True)
    assert resolve_image_url("/data/local-files/?d=x/a.png", ls + "/") == (f"{ls}/data/local-files/?d=x/a.png", True)
    assert resolve_image_url(f"{ls}/data/upload/3/a.png", ls) == (f"{ls}/data/upload/3/a.png", True)
    assert resolve_image_url("http://elsewhere:8080/a.png", ls) == ("http://elsewhere:8080/a.png", False)
    assert resolve_image_url("s3://b/a.png", ls) == ("s3://b/a.png", False)
    # a path that joins to another host is fetched without the token
    assert resolve_image_url("/https://evil.example/x.png", ls) == ("https://evil.example/x.png", False)
    assert resolve_image_url("//evil.example/x.png", ls)[1] is False
    with pytest.raises(BackendError, match="--labelstudio-url"):
        resolve_image_url("/data/upload/3/a.png", None)


def test_local_paths_are_refused_and_data_urls_read():
    with pytest.raises(BackendError, match="local path"):
        fetch_bytes("/etc/passwd")
    with pytest.raises(BackendError, match="local path"):
        fetch_bytes("file:///etc/passwd")
    assert fetch_bytes(data_url(b"abc")) == b"abc"


class _TokenServer(http.server.BaseHTTPRequestHandler):
    """Serves `files` only to requests with Label Studio's token, as Label Studio does."""

    files: dict[str, bytes] = {}
    seen: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.seen.append((self.path, self.headers.get("Authorization")))
        if self.headers.get("Authorization") != f"Token {TOKEN}":
            self.send_response(401)
            self.end_headers()
            return
        body = self.files.get(self.path)
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")


@pytest.fixture
def token_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# --- the protocol -------------------------------------------------------------------------------


def test_health_setup_webhook_and_unknown_routes(backend):
    status, health = backend.reply("GET", "/health", None)
    assert status == 200 and health["status"] == "UP" and health["model_version"] == backend.version
    assert backend.reply("GET", "/", None)[0] == 200
    assert backend.reply("POST", "/setup", {"project": "1.1", "schema": CONFIG}) == (
        200,
        {"model_version": backend.version},
    )
    status, error = backend.reply("POST", "/setup", {"schema": '<View><Image name="i" value="$i"/></View>'})
    assert status == 400 and "no <BrushLabels>" in error["error"]
    status, ack = backend.reply("POST", "/webhook", {"action": "START_TRAINING", "project": {"id": 1}})
    assert status == 200 and ack["action"] == "START_TRAINING" and "dinoseg train" in ack["message"]
    assert backend.reply("POST", "/webhook", {"action": "ANNOTATION_CREATED"})[0] == 200
    assert backend.reply("POST", "/train", {})[0] == 200
    assert backend.reply("POST", "/predict", {}) is None  # the model's work: prepare -> segment -> finish
    assert backend.reply("GET", "/nothing", None)[0] == 404


def test_predict_answers_every_task_in_order_and_matches_the_model(backend, token_server, monkeypatch):
    images = {"a": png(37, 23, 1), "b": png(20, 41, 2)}
    _TokenServer.files, _TokenServer.seen = {"/data/upload/1/b.png": images["b"]}, []
    monkeypatch.setattr(backend.config, "labelstudio_url", token_server)
    tasks = [
        {"id": 11, "data": {"image": data_url(images["a"])}},
        {"id": 12, "data": {"image": "/data/upload/1/b.png"}},  # Label Studio's own file: with its token
        {"id": 13, "data": {"image": "http://127.0.0.1:9/unreachable.png"}},
        {"id": 14, "data": {"text": "no image"}},
        {"id": 15, "data": {"image": data_url(b"not an image")}},
    ]
    status, answer = backend.predict({"tasks": tasks, "label_config": CONFIG, "project": "1.1"})
    assert status == 200 and len(answer["results"]) == len(tasks)
    assert _TokenServer.seen == [("/data/upload/1/b.png", f"Token {TOKEN}")]
    assert answer["results"][2:] == [[], [], []]  # no prediction for those; the others keep their places
    errors = {e["task"]: e for e in answer["errors"]}
    assert sorted(errors) == [13, 14, 15]
    assert "unreachable.png" in errors[13]["error"] and errors[13]["stage"] == "read"
    assert "no 'image' in its data" in errors[14]["error"]
    assert errors[15]["stage"] == "decode"

    segmenter = backend.predictor.segmenter
    for prediction, name in zip(answer["results"][:2], ("a", "b"), strict=True):
        image = np.asarray(Image.open(io.BytesIO(images[name])).convert("RGB"))
        direct = segmenter.predict([image])[0]
        h, w = direct.mask.shape
        assert prediction["model_version"] == backend.version
        seen = np.zeros((h, w), dtype=bool)
        for region in prediction["result"]:
            assert (region["from_name"], region["to_name"], region["type"]) == ("tag", "image", "brushlabels")
            assert (region["original_width"], region["original_height"]) == (w, h)
            assert region["value"]["format"] == "rle"
            (label,) = region["value"]["brushlabels"]
            c = CLASSES.names.index(label)
            decoded = ls_mask(region["value"]["rle"], h, w)
            assert (decoded == (direct.mask == c)).all()
            assert region["score"] == pytest.approx(direct.confidence[decoded].mean(), abs=1e-4)
            seen |= decoded
        assert seen.all()  # every class has a label here, so every pixel is in one region
        assert prediction["score"] == pytest.approx(direct.confidence.mean(), abs=1e-4)


def test_classes_without_a_label_get_no_region(backend):
    config = '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image"><Label value="Red"/><Label value="sky"/></BrushLabels></View>'
    status, answer = backend.predict(
        {"tasks": [{"id": 1, "data": {"image": data_url(png(30, 30, 3))}}], "label_config": config}
    )
    assert status == 200
    assert {r["value"]["brushlabels"][0] for r in answer["results"][0]["result"]} <= {"Red"}


@pytest.mark.parametrize(
    "body, says",
    [
        ({"tasks": [{"id": 1, "data": {}}], "label_config": "<View/>"}, "no <BrushLabels>"),
        ({"tasks": [], "label_config": CONFIG}, "no tasks"),
        ({"label_config": CONFIG}, "no tasks"),
        (
            {
                "tasks": [{"id": 1, "data": {"image": "x"}}],
                "label_config": CONFIG.replace('"red"', '"car"')
                .replace('"bg"', '"a"')
                .replace('"green"', '"b"')
                .replace('"blue"', '"c"'),
            },
            "none of the model's 4 classes",
        ),
    ],
)
def test_a_request_that_cannot_be_answered_is_a_400_with_the_reason(backend, body, says):
    status, answer = backend.predict(body)
    assert status == 400 and says in answer["error"]


def test_the_config_repr_hides_the_token_and_the_storage_secrets():
    from dataclasses import replace

    config = BackendConfig(labelstudio_token=TOKEN)
    config = replace(config, predict=replace(config.predict, storage_options={"key": "AKIA-ID", "secret": "s3cr3t"}))
    shown = repr(config)
    assert TOKEN not in shown and "s3cr3t" not in shown and "AKIA-ID" not in shown  # storage options: not shown
