"""`held_by`: the one-read check a task makes before it publishes a part on its run's behalf; true
only while OUTPUT's lease is that run's (locally and on a loopback S3), false once another run took
it over, once it is gone, or for a lease that is not a record."""

from __future__ import annotations

import pytest

from pipeline.io.lease import LEASE_NAME, STALE_ENV, Lease, held_by


def take_over_at_once(holder: Lease, out: str, so: dict | None) -> Lease:
    """Another run takes `holder`'s lease over (its renewals stopped, its lease stale at once)."""
    holder._stop.set()
    holder._thread.join()
    holder.stale = 0.0
    assert holder._renew()  # its last write says it is stale at once
    taker = Lease(out, "segment", so)
    taker.acquire()
    return taker


@pytest.mark.parametrize("where", ["local", "s3"])
def test_held_by_the_holder_only_until_another_run_takes_it(where, tmp_path, monkeypatch, request):
    monkeypatch.setenv(STALE_ENV, "30")
    if where == "s3":
        bucket, so = request.getfixturevalue("s3_bucket")
        out = f"s3://{bucket}/out"
    else:
        out, so = str(tmp_path / "out"), None
    assert not held_by(out, "no-run", so)  # no lease at all
    holder = Lease(out, "segment", so)
    holder.acquire()
    assert held_by(out, holder.run_id, so)
    assert not held_by(out, "another-run", so) and not held_by(out, "", so)
    taker = take_over_at_once(holder, out, so)
    assert not held_by(out, holder.run_id, so) and held_by(out, taker.run_id, so)
    taker.release()
    assert not held_by(out, taker.run_id, so)  # released: nobody's


def test_a_lease_that_is_not_a_record_is_nobodys(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LEASE_NAME).write_text("{not json")
    assert not held_by(str(out), "any-run")


def test_a_lease_caught_half_rewritten_is_read_again(tmp_path, monkeypatch):
    """A renewal rewriting lease.json in place (stores without an atomic PUT) can be read half
    written: the task reads again rather than take its own run's lease for lost."""
    import json
    import threading

    monkeypatch.setenv(STALE_ENV, "30")
    out = tmp_path / "out"
    holder = Lease(str(out), "segment")
    holder.acquire()
    try:
        whole = (out / LEASE_NAME).read_text()
        assert json.loads(whole)["run_id"] == holder.run_id
        (out / LEASE_NAME).write_text(whole[: len(whole) // 2])  # caught mid-renewal
        fixed = threading.Timer(0.3, lambda: (out / LEASE_NAME).write_text(whole))
        fixed.start()
        assert held_by(str(out), holder.run_id)  # read again until whole: still this run's
        fixed.join()
    finally:
        holder.release()
