"""The package boundary: `model` is pure PyTorch and never pulls in Ray, `pipeline` or `jobs`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("ray", "pipeline", "jobs")


def test_importing_model_does_not_import_ray_pipeline_or_jobs():
    code = (
        "import json, sys\n"
        "import model\n"
        "import model.hub, model.segmenter, model.weights\n"
        f"roots = {FORBIDDEN!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in roots)))\n"
        "print(json.dumps('model.backbone' in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    leaked_line, loaded_line = proc.stdout.strip().splitlines()[-2:]
    assert json.loads(loaded_line) is True  # the imports really happened
    assert json.loads(leaked_line) == []


_IMPORT = re.compile(r"^\s*(?:import|from)\s+(ray|pipeline|jobs)(?:[\s.,]|$)", re.MULTILINE)


def test_no_file_under_model_imports_ray_pipeline_or_jobs():
    files = sorted((ROOT / "model").rglob("*.py"))
    assert len(files) >= 5  # the scan sees the package
    offenders = [
        f"{path.relative_to(ROOT)}: {m.group(0).strip()}"
        for path in files
        for m in _IMPORT.finditer(path.read_text())
    ]
    assert offenders == []
    # the pattern itself catches the forms it is meant to catch
    for line in ("import ray", "from ray import data", "import ray.data as rd", "    from pipeline.segment.predict import X"):
        assert _IMPORT.search(line), line
    for line in ("import rays", "from raytracer import x", "# import ray is forbidden here"):
        assert not _IMPORT.search(line), line


def test_only_pipeline_runtime_imports_ray():
    files = sorted((ROOT / "pipeline").rglob("*.py"))
    assert {p.parent.name for p in files} >= {"runtime", "train", "segment"}
    ray_import = re.compile(r"^\s*(?:import|from)\s+ray(?:[\s.,]|$)", re.MULTILINE)
    offenders = [str(p) for p in files if p.parent.name != "runtime" and ray_import.search(p.read_text())]
    assert offenders == []


def test_the_steps_of_the_training_graph_do_not_import_torch():
    """Ray Data tasks unpickle these modules in fresh worker processes: torch's import (seconds)
    would be paid again and again, every epoch."""
    code = (
        "import json, sys\n"
        "import pipeline.train.data, pipeline.train.features, pipeline.train.trainset, pipeline.data.pairs\n"
        "print(json.dumps(['torch' in sys.modules, 'pipeline.train.features' in sys.modules]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [False, True]
