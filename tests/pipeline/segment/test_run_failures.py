"""A segment run that fails is reported by its own failure: closing its result writers after it
(which can fail too, the store being down) does not replace it; and the few whole-run writes are
tried again at one level. Without Ray: the model and the graph are faked."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from botocore.exceptions import EndpointConnectionError

from model.classes import ClassMap
from pipeline import runtime
from pipeline.io import parts, records, retry
from pipeline.segment import SegmentConfig, run_segment
from pipeline.segment import run as segment_run

CLASSES = ClassMap(("sky", "road"), ((0, 0, 255), (90, 90, 90)))


def down(url, data, so=None):
    raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")


@pytest.fixture
def config(tmp_path, monkeypatch):
    """A run over two colliding inputs (one listing error row to publish) whose graph fails."""
    inp = tmp_path / "in"
    (inp / "a").mkdir(parents=True)
    (inp / "a" / "b.jpg").write_bytes(b"never read")
    (inp / "a\\b.jpg").write_bytes(b"never read")  # collides with a/b.jpg
    monkeypatch.setattr(
        segment_run,
        "_load_model",
        lambda config, inference, so, unsaved=None: (SimpleNamespace(inference=inference), CLASSES, "m", "0" * 16, {}),
    )
    monkeypatch.setattr(runtime, "start_ray", lambda address: False)
    monkeypatch.setattr(runtime, "cluster_resources", lambda joined: {})
    monkeypatch.setattr(runtime, "Resources", lambda *a: SimpleNamespace(resolve=lambda cluster: "resources"))
    monkeypatch.setattr(runtime, "build", lambda *a, **k: "dataset")

    def results(ds):
        raise RuntimeError("the cluster went away")
        yield

    monkeypatch.setattr(runtime, "iter_results", results)
    monkeypatch.setattr(retry, "BACKOFF_S", 0.0)
    return SegmentConfig(str(inp), str(tmp_path / "out"), resolution=56)


def test_the_runs_own_failure_is_raised_not_the_failure_to_close_its_parts(config, monkeypatch, caplog):
    monkeypatch.setattr(parts, "write_bytes_atomic", down)  # the error part cannot be published either
    with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="the cluster went away"):
        run_segment(config)
    assert any("closing the result parts failed too" in r.getMessage() for r in caplog.records), "and said"


def test_identity_and_classes_are_tried_again_at_one_level(config, monkeypatch):
    calls = []
    monkeypatch.setattr(
        records, "write_bytes_atomic", lambda url, data, so=None: (calls.append(url), down(url, data))[1]
    )
    with pytest.raises(EndpointConnectionError):
        run_segment(config)
    assert len(calls) == retry.ATTEMPTS and calls[0].endswith("identity.json"), "not ATTEMPTS x ATTEMPTS"
