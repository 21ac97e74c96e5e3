"""cluster.yaml is a config `ray up` accepts: checked against the schema the installed Ray ships,
before and after Ray fills in its AWS defaults, and pinned to the Ray that pyproject.toml pins."""

import copy
import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(Path(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json").read_text())


def test_cluster_yaml_matches_rays_schema(cluster, schema):
    jsonschema.validate(cluster, schema)
    # the schema is strict enough to catch a typo or a float resource: the test can fail
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cluster | {"max_worker": 2}, schema)
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["gpu"]["resources"] = {"GPU": 0.5}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_ray_fills_its_aws_defaults_and_accepts_the_result(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))  # what `ray up` does before launching anything
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["gpu"]["min_workers"] == 0  # GPUs only while a job needs them
    assert prepared["available_node_types"]["head"]["node_config"]["InstanceType"].startswith("m")  # a CPU head


def test_image_and_setup_follow_the_project(cluster):
    pinned = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())[1]
    assert pinned == ray.__version__
    assert cluster["docker"]["image"] == f"rayproject/ray:{pinned}-py311-gpu"
    assert cluster["file_mounts"] == {"/home/ray/dinoseg": "."}
    assert ".gitignore" in cluster["rsync_filter"]  # .venv and weights never travel
    assert any("pip install" in c and "/home/ray/dinoseg" in c for c in cluster["setup_commands"])


def test_every_install_gets_a_torch_whose_weights_only_load_holds():
    """torch.load(weights_only=True) is the only loader dinoseg uses; releases before 2.10 have
    known bypasses (CVE-2025-32434, fixed in 2.6; CVE-2026-24747, fixed in 2.10). The cluster's
    setup installs this package, so the floor in pyproject.toml is what its nodes get; bootstrap
    pins the version the tests run on."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    text = (ROOT / "pyproject.toml").read_text()
    torch_req = next(
        Requirement(r) for r in re.findall(r'^\s*"(torch[^"]*)"', text, re.M) if Requirement(r).name == "torch"
    )
    floor = min(Version(s.version) for s in torch_req.specifier if s.operator in (">=", "=="))
    assert floor >= Version("2.10"), f"pyproject allows torch {floor}, which has known weights_only bypasses"
    pinned = re.search(
        r"torch_spec=\$\{DINOSEG_TORCH_SPEC:-torch==([0-9.]+)\}", (ROOT / "scripts/bootstrap.sh").read_text()
    )
    assert pinned and Version(pinned[1]) in torch_req.specifier
    import torch

    assert Version(torch.__version__.split("+")[0]) in torch_req.specifier
