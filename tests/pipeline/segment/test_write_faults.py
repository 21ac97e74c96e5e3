"""WriteMasks when the store fails: a mask PUT that still fails after retries makes its row a
retryable write error and leaves no overlay or confidence map without its mask."""

from __future__ import annotations

import numpy as np
import pytest
from botocore.exceptions import EndpointConnectionError

from model.classes import bundled
from pipeline.data.schema import empty_errors, object_array
from pipeline.io import files, retry
from pipeline.segment import write as write_module
from pipeline.segment.write import WriteConfig, WriteMasks

VOC = bundled("voc2012")


def batch_of(keys: list[str], h: int = 12, w: int = 16) -> dict:
    n = len(keys)
    masks = [np.full((h, w), i % len(VOC), np.uint8) for i in range(n)]
    return {
        "path": np.array([f"in/{k}.jpg" for k in keys], dtype=object),
        "key": np.array(keys, dtype=object),
        "width": np.full(n, w, np.int32),
        "height": np.full(n, h, np.int32),
        "mask": object_array(masks),
        "class_counts": object_array(np.bincount(m.ravel(), minlength=len(VOC)).astype(np.int64) for m in masks),
        "mean_confidence": np.full(n, 0.5, np.float32),
        "image": object_array(np.zeros((h, w, 3), np.uint8) for _ in range(n)),
        "confidence": object_array(np.full((h, w), 30000, np.uint16) for _ in range(n)),
        **empty_errors(n),
    }


@pytest.fixture(params=["/masks/", "/confidence/"])
def masks_down(monkeypatch, request):
    """Every write of row 'bad''s mask PNG (or confidence map, written after its overlay) fails
    as an unreachable endpoint; everything else works."""
    monkeypatch.setattr(retry, "BACKOFF_S", 0.0)
    real = files.write_bytes_atomic

    def write(url, data, so=None):
        if request.param in url and "bad" in url:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
        real(url, data, so)

    monkeypatch.setattr(write_module, "write_bytes_atomic", write)


def test_failed_mask_put_is_a_retryable_error_without_orphans(tmp_path, masks_down):
    out = tmp_path / "out"
    step = WriteMasks(WriteConfig(str(out), VOC, overlays=True, confidence_bits=8, io_threads=1))
    table = step(batch_of(["good", "bad"])).to_pylist()
    good, bad = table
    assert good["ok"] and not good["retryable"]
    assert not bad["ok"] and bad["stage"] == "write" and bad["error_type"] == "EndpointConnectionError"
    assert bad["message"].startswith("Could not connect")
    assert bad["retryable"] is True
    assert (out / "masks/good.png").exists() and (out / "overlays/good.jpg").exists()
    assert not (out / "masks/bad.png").exists()
    assert not (out / "overlays/bad.jpg").exists(), "an overlay without its mask"
    assert not (out / "confidence/bad.png").exists(), "a confidence map without its mask"


def test_earlier_failures_say_whether_they_are_retryable(tmp_path):
    b = batch_of(["a", "b"])
    b["error_stage"][0], b["error_type"][0], b["error_message"][0] = "read", "OSError", "SlowDown"
    b["error_stage"][1], b["error_type"][1], b["error_message"][1] = "decode", "DinosegError", "corrupt"
    rows = WriteMasks(WriteConfig(str(tmp_path), VOC))(b).to_pylist()
    assert [r["retryable"] for r in rows] == [True, False]
