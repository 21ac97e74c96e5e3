"""The session's real Label Studio (tests/labelstudio.py) and its helpers: projects, the three
kinds of image reference that work offline, tasks with predictions, annotations, the JSON export."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
from PIL import Image

from model.classes import ClassMap
from pipeline.io.brush_rle import brush_rle
from pipeline.label.exporters import labelstudio_config

CLASSES = ClassMap(("bg", "cat"), ((0, 0, 0), (255, 0, 0)))


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def region(mask: np.ndarray, label: str) -> dict:
    h, w = mask.shape
    return {
        "from_name": "tag",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": w,
        "original_height": h,
        "value": {"format": "rle", "rle": brush_rle(mask), "brushlabels": [label]},
    }


@pytest.mark.slow
def test_label_studio_round_trip_through_the_helpers(labelstudio, tmp_path, http_server):
    ls = labelstudio
    assert requests.get(f"{ls.url}/health", timeout=10).json()["status"] == "UP"
    project = ls.create_project(labelstudio_config(CLASSES))
    image = png(12, 8)
    (tmp_path / "a.png").write_bytes(image)
    served = http_server(tmp_path)
    mask = np.zeros((8, 12), dtype=bool)
    mask[2:5, 3:9] = True
    summary = ls.import_tasks(
        project,
        [
            {"data": {"image": "data:image/png;base64," + base64.b64encode(image).decode()}},
            {
                "data": {"image": f"{served.url}/a.png"},
                "predictions": [{"model_version": "m1", "result": [region(mask, "cat")]}],
            },
        ],
    )
    assert summary["task_count"] == 2 and summary["prediction_count"] == 1
    ls.upload_image(project, "b.png", image)
    tasks = ls.tasks(project)
    assert len(tasks) == 3
    stored = tasks[2]["data"]["image"]
    assert stored.startswith(f"/data/upload/{project}/") and stored.endswith("b.png")
    got = requests.get(ls.url + stored, headers={"Authorization": f"Token {ls.token}"}, timeout=30)
    assert got.content == image  # Label Studio serves its files to the token, as the ML backend fetches them
    assert requests.get(ls.url + stored, timeout=30).status_code == 401

    (prediction,) = ls.predictions(project)
    assert prediction["task"] == tasks[1]["id"] and prediction["model_version"] == "m1"
    ls.create_annotation(tasks[1]["id"], [region(~mask, "bg")])
    exported = {t["id"]: t for t in ls.export(project)}
    assert len(exported) == 3
    (annotation,) = exported[tasks[1]["id"]]["annotations"]
    assert annotation["result"][0]["value"]["rle"] == brush_rle(~mask)
    assert not exported[tasks[0]["id"]]["annotations"]
