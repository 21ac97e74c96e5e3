"""Training never trains quietly on less than it was given: a pair the storage could not read
(after retries) fails the run in one sentence, where it used to be dropped or trained as all-ignore."""

from __future__ import annotations

import numpy as np
import pytest
from botocore.exceptions import EndpointConnectionError

from model.errors import DinosegError
from pipeline.data import sources
from pipeline.data.schema import empty_errors
from pipeline.features.cache import CachedSamples, SampleConfig
from pipeline.features.pairs import ReadPair
from pipeline.train.data import refuse_unread_pairs


@pytest.fixture
def store_down(monkeypatch):
    """Every read fails as an unreachable endpoint, after ReadBytes' retries."""
    monkeypatch.setattr(
        sources,
        "retry_each",
        lambda fetch, paths: [EndpointConnectionError(endpoint_url="http://127.0.0.1:9")] * len(paths),
    )


def test_an_unreadable_mask_fails_the_epoch_instead_of_training_all_ignore(tmp_path, store_down):
    batch = {  # one cache row whose mask is gone since the check pass
        "image": np.array([str(tmp_path / "a.jpg")], dtype=object),
        "width": np.array([28]),
        "height": np.array([28]),
        "resized_h": np.array([28]),
        "resized_w": np.array([28]),
        "pad_top": np.array([0]),
        "pad_left": np.array([0]),
        "grid_h": np.array([2]),
        "grid_w": np.array([2]),
        "channels": np.array([1]),
        "features": np.array([np.zeros((1, 2, 2), np.float16).tobytes()], dtype=object),
    }
    samples = CachedSamples(SampleConfig({batch["image"][0]: str(tmp_path / "a.png")}, 3, crop_cells=2))
    with pytest.raises(DinosegError, match="re-run with --resume"):
        samples(batch)


def test_an_unreadable_pair_fails_a_training_epoch_without_cache(tmp_path, monkeypatch):
    batch = {
        "path": np.array([str(tmp_path / "a.jpg")], dtype=object),
        "key": np.array(["a"], dtype=object),
        "image": np.array([str(tmp_path / "a.jpg")], dtype=object),
        "mask": np.array([str(tmp_path / "gone.png")], dtype=object),
        **empty_errors(1),
    }
    # a mask deleted since the check: the row's problem, as before
    assert ReadPair(fail_reads=True)(dict(batch))["error_stage"][0] == "read"
    monkeypatch.setattr(
        sources,
        "retry_each",
        lambda fetch, paths: [EndpointConnectionError(endpoint_url="http://127.0.0.1:9")] * len(paths),
    )
    assert ReadPair()(dict(batch))["error_type"][0] == "EndpointConnectionError"  # the check pass: a problem row
    with pytest.raises(DinosegError, match="re-run with --resume"):
        ReadPair(fail_reads=True)(dict(batch))


def test_pairs_the_store_failed_to_read_fail_the_run():
    refuse_unread_pairs([{"key": "a", "message": "corrupt", "retryable": False}])  # a bad pair: left out
    with pytest.raises(
        DinosegError, match=r"1 pairs could not be read because the storage failed .*nothing was trained"
    ):
        refuse_unread_pairs(
            [{"key": "a", "message": "x", "retryable": False}, {"key": "b", "message": "SlowDown", "retryable": True}]
        )


def test_a_refusal_raised_in_a_ray_train_worker_is_found_through_rays_wrappers():
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from pipeline.runtime.train import refusal_in

    refused = DinosegError("1 pair could not be read: re-run with --resume.")
    in_task = RayTaskError("ReadPair", "Traceback (most recent call last): ...", refused).as_instanceof_cause()
    refused.args = (refused.args[0] + "\nFailed to apply UDF transform after 1/1 attempts.",)  # as Ray Data does
    assert isinstance(in_task, DinosegError) and str(in_task) != str(refused)  # Ray's str: process, traceback
    failed = WorkerGroupError("[Rank 0 Error Snippet]: ...", {0: UserExceptionWithTraceback(in_task, "Traceback")})
    assert refusal_in(failed) == "1 pair could not be read: re-run with --resume."
    try:
        raise RuntimeError("training failed") from failed  # Ray Train V1's TrainingFailedError
    except RuntimeError as e:
        assert refusal_in(e) == "1 pair could not be read: re-run with --resume."
    assert refusal_in(WorkerGroupError("x", {0: RayTaskError("f", "tb", MemoryError()).as_instanceof_cause()})) is None


def test_a_refusal_is_not_retried_and_other_worker_failures_are(monkeypatch):
    import ray.train.torch
    from ray.exceptions import RayTaskError

    from pipeline.runtime import train as runtime_train

    fits = []

    class Trainer:  # stands for TorchTrainer: fit() fails as `failures` say, in turn
        def __init__(self, *args, run_config, **kwargs):
            assert run_config.failure_config.max_failures == 0  # fit() restarts, seeing each error

        def fit(self):
            fits.append(1)
            error = failures.pop(0)
            if error:
                raise RuntimeError("training failed") from RayTaskError("f", "tb", error).as_instanceof_cause()
            return "result"

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", Trainer)
    failures = [MemoryError(), ConnectionResetError(), None]  # a worker lost twice, then done
    assert runtime_train.fit(print, None, "t", {}, 1, False, None, max_failures=2) == "result" and len(fits) == 3
    fits.clear()
    failures = [DinosegError("the storage failed: re-run with --resume."), None]
    with pytest.raises(DinosegError) as refused:
        runtime_train.fit(print, None, "t", {}, 1, False, None, max_failures=2)
    assert type(refused.value) is DinosegError and str(refused.value) == "the storage failed: re-run with --resume."
    assert len(fits) == 1  # not retried
    fits.clear()
    failures = [MemoryError()] * 3
    with pytest.raises(RuntimeError):
        runtime_train.fit(print, None, "t", {}, 1, False, None, max_failures=2)
    assert len(fits) == 3
