"""Label Studio exports written by a real Label Studio (tests/labelstudio.py: started once per
session on loopback) import to the masks they hold: our predictions become annotations through
its API, one is corrected, the project is exported through its API, and `dinoseg import` gives
back our masks with the correction; a brush drawn with Label Studio's own RLE encoder (single
words, colour strokes) imports too."""

from __future__ import annotations

import json
import subprocess

import labelstudio as ls
import numpy as np
import pytest
from label_samples import CLASSES, masks, write_segmented

from pipeline.io.masks import decode_mask_png
from pipeline.label import ExportConfig, ImportConfig, run_export, run_import

pytestmark = pytest.mark.slow


def ls_encode(words: np.ndarray) -> list[int]:
    """Label Studio's own brush encoder (label_studio_sdk.converter.brush.encode_rle), in its environment."""
    python = ls.venv_dir() / "bin" / "python"
    script = (
        "import json, sys, numpy as np\n"
        "from label_studio_sdk.converter.brush import encode_rle\n"
        "print(json.dumps([int(b) for b in encode_rle(np.asarray(json.load(sys.stdin)))]))\n"
    )
    done = subprocess.run(
        [str(python), "-c", script], input=json.dumps(words.tolist()), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_a_real_label_studio_export_imports_to_our_masks_and_the_correction(labelstudio, tmp_path):
    segmented = write_segmented(tmp_path)
    run_export(ExportConfig(str(segmented), str(tmp_path / "ls"), "labelstudio"))
    project = labelstudio.create_project((tmp_path / "ls" / "labeling_config.xml").read_text())
    labelstudio.import_tasks(project, json.loads((tmp_path / "ls" / "tasks.json").read_text()))
    tasks = labelstudio.tasks(project)
    assert len(tasks) == len(masks())
    corrected = {}
    for task in tasks:
        key = task["data"]["key"]
        result = labelstudio.task(task["id"])["predictions"][0]["result"]
        mask = masks()[key].copy()
        if key == "c c":  # the person corrects one image: a person drawn with Label Studio's encoder
            on = np.zeros(mask.shape, dtype=bool)
            on[5:15, 10:20] = True
            rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)
            rgba[on] = (*CLASSES.colors[2], 255)  # the label's colour, as the brush paints it
            h, w = mask.shape
            stroke = {
                "from_name": "tag",
                "to_name": "image",
                "type": "brushlabels",
                "original_width": w,
                "original_height": h,
                "value": {"format": "rle", "rle": ls_encode(rgba.ravel()), "brushlabels": ["person"]},
            }
            result = [*result, stroke]
            mask[on] = 2
        labelstudio.create_annotation(task["id"], result)
        corrected[key] = mask
    exported = labelstudio.export(project)
    assert all(t["annotations"] for t in exported)  # written by Label Studio, not by us
    (tmp_path / "project.json").write_text(json.dumps(exported))
    out = tmp_path / "set"
    result = run_import(
        ImportConfig(str(tmp_path / "project.json"), str(out), "labelstudio", classes=str(segmented / "classes.yaml"))
    )
    assert result["counts"]["imported"] == len(masks())
    assert result["counts"]["with_problems"] == 1  # the stroke over other labels, decided by the rule
    for key, want in corrected.items():
        got = decode_mask_png((out / "masks" / f"{key}.png").read_bytes())
        assert (got == want).all(), key  # the stroke drawn last wins (--overlap default for Label Studio)
