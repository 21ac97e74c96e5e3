"""OUTPUT's lease: created atomically, names its holder, renewed, taken over when dead, released."""

import json
import threading

import pytest

from model.errors import DinosegError
from pipeline.io.lease import LEASE_NAME, STALE_ENV, Lease


def _race(leases: list) -> list:
    """Acquire every lease at once (threads released by one barrier); the ones that won."""
    won, barrier = [], threading.Barrier(len(leases))

    def take(lease):
        barrier.wait()
        try:
            lease.acquire()
            won.append(lease)
        except DinosegError:
            pass

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    with Lease(str(tmp_path / "out"), "segment"):
        record = json.loads((tmp_path / "out" / LEASE_NAME).read_text())
        assert {"host", "pid", "run_id", "command", "started", "heartbeat"} <= set(record)
        with pytest.raises(DinosegError, match=r"held by run .*segment.*--take-over-lease") as e:
            Lease(str(tmp_path / "out"), "pseudo-label").acquire()
        assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / LEASE_NAME).exists()  # released


def test_released_on_error(tmp_path):
    with pytest.raises(ValueError), Lease(str(tmp_path), "segment"):
        raise ValueError("boom")
    assert not (tmp_path / LEASE_NAME).exists()
    Lease(str(tmp_path), "segment").acquire()  # free again


def test_heartbeat_renews_and_a_dead_holders_lease_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setenv(STALE_ENV, "0.4")
    holder = Lease(str(tmp_path), "segment")
    holder.acquire()
    first = json.loads((tmp_path / LEASE_NAME).read_text())["heartbeat"]
    threading.Event().wait(0.35)
    assert json.loads((tmp_path / LEASE_NAME).read_text())["heartbeat"] > first  # renewed by the thread
    with pytest.raises(DinosegError, match="held by"):  # alive: refused
        Lease(str(tmp_path), "segment").acquire()
    holder._stop.set()  # the holder "dies": no more heartbeats (a kill -9)
    holder._thread.join()
    threading.Event().wait(0.5)
    taker = Lease(str(tmp_path), "segment")
    taker.acquire()
    assert json.loads((tmp_path / LEASE_NAME).read_text())["run_id"] == taker.run_id
    assert not holder._renew()  # the old holder notices it lost the lease
    holder.release()  # and does not delete the new holder's lease
    assert (tmp_path / LEASE_NAME).exists()
    taker.release()


def test_take_over_option_and_only_one_of_two_takers_wins(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv(STALE_ENV, "0.4")
    (tmp_path / LEASE_NAME).write_text(json.dumps({"run_id": "dead", "heartbeat": time.time() + 3600}))
    with pytest.raises(DinosegError, match="held by"):
        Lease(str(tmp_path), "segment").acquire()
    live = Lease(str(tmp_path / "live"), "segment")
    live.acquire()
    with pytest.raises(DinosegError, match="held by"):  # its heartbeat moves: --take-over-lease refused
        Lease(str(tmp_path / "live"), "segment", take_over=True).acquire()
    live.release()
    won = _race([Lease(str(tmp_path), "segment", take_over=True) for _ in range(6)])
    assert len(won) == 1
    assert json.loads((tmp_path / LEASE_NAME).read_text())["run_id"] == won[0].run_id
    won[0].release()


def test_s3_conditional_create_and_takeover(s3_bucket, monkeypatch):
    import fsspec

    bucket, so = s3_bucket
    out = f"s3://{bucket}/out"
    fs = fsspec.filesystem("s3", **so)
    holder = Lease(out, "segment", so)
    holder.acquire()
    assert fs.exists(f"{bucket}/out/{LEASE_NAME}")
    with pytest.raises(DinosegError, match="held by"):
        Lease(out, "segment", so).acquire()
    holder._stop.set()
    holder._thread.join()
    monkeypatch.setenv(STALE_ENV, "0")  # the taker's threshold does not count: the holder's does
    with pytest.raises(DinosegError, match="held by"):
        Lease(out, "segment", so).acquire()
    holder.stale = 0.0  # a holder whose lease is stale at once: taken over with If-Match
    assert holder._renew()
    taker = Lease(out, "segment", so)
    taker.acquire()
    assert not holder._renew()  # its ETag is no longer the lease's: the conditional renewal fails
    taker.release()
    assert not fs.exists(f"{bucket}/out/{LEASE_NAME}")


def test_s3_two_runs_at_once_only_one_wins(s3_bucket):
    bucket, so = s3_bucket
    won = _race([Lease(f"s3://{bucket}/race", "segment", so) for _ in range(4)])
    assert len(won) == 1
    won[0].release()


def _answer_lost(fs):
    """Every PUT lands but its answer is lost, so botocore sends it again: the second copy is the
    one whose answer arrives (a 412 for a conditional PUT, since the first one changed the lease)."""
    real = fs.pipe_file

    def pipe_file(path, data, **kw):
        real(path, data, **kw)
        return real(path, data, **kw)

    fs.pipe_file = pipe_file


def test_s3_a_retried_conditional_put_is_not_refused_by_its_first_copy(s3_bucket, monkeypatch):
    import fsspec

    bucket, so = s3_bucket
    fs = fsspec.filesystem("s3", **so)
    lease = Lease(f"s3://{bucket}/dup", "segment", so)
    _answer_lost(lease.fs)
    lease.acquire()  # If-None-Match: its retry's 412 is its own lease
    lease._stop.set()
    lease._thread.join()
    assert json.loads(fs.cat_file(f"{bucket}/dup/{LEASE_NAME}"))["run_id"] == lease.run_id
    assert lease._renew() and lease._renew()  # If-Match: the retry's 412 is its own renewal; its ETag taken
    assert not lease.lost
    lease._stop.clear()
    lease.check()
    lease.release()
    assert not fs.exists(f"{bucket}/dup/{LEASE_NAME}")
    # a takeover (If-Match on the dead lease's ETag) whose answer was lost
    dead = Lease(f"s3://{bucket}/dup", "segment", so)
    dead.stale = 0.0
    dead._create()
    taker = Lease(f"s3://{bucket}/dup", "segment", so)
    _answer_lost(taker.fs)
    taker.acquire()
    assert json.loads(fs.cat_file(f"{bucket}/dup/{LEASE_NAME}"))["run_id"] == taker.run_id
    assert not dead._renew()  # a lease that is not ours is still refused
    taker.release()


def test_local_lease_being_written_is_alive_until_stale_by_its_age(tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.setenv(STALE_ENV, "30")
    (tmp_path / LEASE_NAME).write_bytes(b"")  # a creator between its create and its write, or damaged
    with pytest.raises(DinosegError, match="not a lease record") as e:
        Lease(str(tmp_path), "segment").acquire()
    assert "\n" not in str(e.value)
    old = time.time() - 31
    os.utime(tmp_path / LEASE_NAME, (old, old))
    taker = Lease(str(tmp_path), "segment")
    taker.acquire()  # 31 s without a write: taken over
    assert json.loads((tmp_path / LEASE_NAME).read_text())["run_id"] == taker.run_id
    taker.release()


def test_local_create_is_whole_and_renewal_waits_for_a_takeover_in_progress(tmp_path, monkeypatch):
    import os

    from pipeline.io import lease as lease_module

    seen = []
    link = os.link

    def spy(src, dst, *a, **k):  # at the moment the lease appears, its content is complete
        seen.append(json.loads(open(src, "rb").read())["run_id"])
        return link(src, dst, *a, **k)

    monkeypatch.setattr(lease_module.os, "link", spy)
    holder = Lease(str(tmp_path), "segment")
    holder.acquire()
    holder._stop.set()
    holder._thread.join()
    assert seen == [holder.run_id]
    assert [p.name for p in tmp_path.iterdir()] == [LEASE_NAME]  # no temporary file left
    monkeypatch.setattr(lease_module, "GUARD_WAIT_SECONDS", 0.05)
    (tmp_path / f"{LEASE_NAME}.takeover").touch()  # another run is re-reading the lease to replace it
    before = (tmp_path / LEASE_NAME).read_bytes()
    with pytest.raises(OSError, match="checking the lease"):  # this beat is skipped, not lost
        holder._renew()
    assert (tmp_path / LEASE_NAME).read_bytes() == before
    (tmp_path / f"{LEASE_NAME}.takeover").unlink()
    assert holder._renew()
    holder.release()


def _dead_pid() -> int:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_gone_pid_counts_only_in_this_pid_namespace_and_the_holders_thresholds_count(tmp_path, monkeypatch):
    import socket
    import time

    from pipeline.io.lease import _machine

    here = _machine()
    if not here["boot_id"]:
        pytest.skip("no /proc boot id: a pid is never trusted here")
    record = {
        "host": socket.gethostname(),
        "pid": _dead_pid(),
        "run_id": "other",
        "command": "segment",
        "heartbeat": time.time(),
        "heartbeat_seconds": 30.0,
        "stale_seconds": 120.0,
    }
    monkeypatch.setenv(STALE_ENV, "0")  # the taker's own threshold: every lease stale, were it used
    (tmp_path / LEASE_NAME).write_text(json.dumps({**record, "pid_namespace": "pid:[1]", "boot_id": here["boot_id"]}))
    with pytest.raises(DinosegError, match="held by run other"):  # a container with the same host name
        Lease(str(tmp_path), "segment").acquire()
    (tmp_path / LEASE_NAME).write_text(json.dumps(record))  # a record of an earlier version: no ids
    with pytest.raises(DinosegError, match="held by run other"):
        Lease(str(tmp_path), "segment").acquire()
    (tmp_path / LEASE_NAME).write_text(json.dumps({**record, **here}))  # this namespace: its process is gone
    taker = Lease(str(tmp_path), "segment")
    taker.acquire()
    assert json.loads((tmp_path / LEASE_NAME).read_text())["run_id"] == taker.run_id
    taker.release()


def test_age_is_the_stores_and_take_over_waits_the_holders_period(tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.delenv(STALE_ENV, raising=False)  # the taker's period would be 30 s
    behind = {"run_id": "behind", "command": "segment", "heartbeat": time.time() - 3600, "stale_seconds": 120.0}
    (tmp_path / LEASE_NAME).write_text(json.dumps(behind))  # a holder whose clock is an hour behind
    with pytest.raises(DinosegError, match=r"held by run behind.*0 s ago"):
        Lease(str(tmp_path), "segment").acquire()
    ahead = {**behind, "run_id": "ahead", "heartbeat": time.time() + 3600}
    (tmp_path / LEASE_NAME).write_text(json.dumps(ahead))  # an hour ahead, and silent for 121 s
    old = time.time() - 121
    os.utime(tmp_path / LEASE_NAME, (old, old))
    taker = Lease(str(tmp_path), "segment")
    taker.acquire()
    taker.release()
    quick = {**behind, "run_id": "quick", "heartbeat_seconds": 0.1}  # renews every 0.1 s, when alive
    (tmp_path / LEASE_NAME).write_text(json.dumps(quick))
    started = time.monotonic()
    taker = Lease(str(tmp_path), "segment", take_over=True)
    taker.acquire()  # silent for 1.5 of its periods: 0.15 s, not the taker's 45 s
    assert time.monotonic() - started < 5
    taker.release()


def test_a_writer_publishes_nothing_once_its_lease_is_taken_over(tmp_path, monkeypatch):
    import pyarrow as pa

    from pipeline.io.parts import RollingParquetWriter, read_parts

    monkeypatch.setenv(STALE_ENV, "30")
    out = tmp_path / "out"
    holder = Lease(str(out), "segment")
    holder.acquire()
    schema = pa.schema([("key", pa.string())])
    writer = RollingParquetWriter(str(out / "rows"), schema, max_rows=2, guard=holder.check)
    writer.write(pa.table({"key": ["a", "b", "c"]}, schema=schema))  # a, b published; c held
    holder._stop.set()  # paused past its threshold (a suspended machine): another run takes OUTPUT
    holder._thread.join()
    holder.stale = 0.0
    assert holder._renew()
    taker = Lease(str(out), "segment")
    taker.acquire()
    with pytest.raises(DinosegError, match="taken over"):  # the part c, d fill is not published
        writer.write(pa.table({"key": ["d", "e"]}, schema=schema))
    assert holder.lost  # the guard found the lease another run's before publishing
    with pytest.raises(DinosegError, match="taken over by another run") as e:
        holder.close_writers(writer)
    assert "\n" not in str(e.value)
    assert read_parts(str(out / "rows"), ["key"]).column("key").to_pylist() == ["a", "b"]
    assert writer.unpublished_rows == 0  # dropped: the new holder redoes c, d and e
    holder.release()
    assert json.loads((out / LEASE_NAME).read_text())["run_id"] == taker.run_id
    taker.release()
