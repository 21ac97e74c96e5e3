"""The package boundaries: `model` is pure PyTorch and never pulls in Ray, `pipeline` or `jobs`;
the CPU-task steps never load torch; the import contracts hold."""

from __future__ import annotations

import json
import os
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


LINT = Path(sys.executable).with_name("lint-imports")


def test_the_import_contracts_hold():
    """The static boundaries live in pyproject.toml as import-linter contracts (`lint-imports`,
    which .ci/run runs too)."""
    proc = subprocess.run([str(LINT), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout
    assert "0 broken" in proc.stdout


def test_the_import_contracts_refuse_a_data_module_that_imports_ray(tmp_path):
    import shutil

    copy = tmp_path / "tree"
    for name in ("model", "pipeline", "jobs"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    with open(copy / "pipeline" / "data" / "keys.py", "a") as f:
        f.write("\nimport ray\n")
    proc = subprocess.run(
        [str(LINT), "--no-cache"],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(copy)},
    )
    assert proc.returncode != 0 and "pipeline.data is not allowed to import ray" in proc.stdout


def test_the_cpu_steps_of_training_and_labeling_do_not_import_torch():
    """Ray Data tasks unpickle these modules in fresh worker processes: torch's import (seconds)
    would be paid again and again, every epoch."""
    code = (
        "import json, sys\n"
        "import pipeline.train.data, pipeline.train.trainset, pipeline.data.pairs, pipeline.data.points\n"
        "import pipeline.features.cache, pipeline.features.check, pipeline.features.pairs\n"
        "import pipeline.label.pseudo, pipeline.label.exporters, pipeline.label.prototypes, pipeline.label.discover\n"
        "import pipeline.io.masks\n"
        "print(json.dumps(['torch' in sys.modules, 'pipeline.features.cache' in sys.modules]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [False, True]
