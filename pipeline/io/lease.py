"""A lease on OUTPUT: one run writes there at a time.

The lease is OUTPUT/lease.json, created atomically before the run writes anything: locally a
complete temporary file hard-linked to that name (the link fails if the lease exists, and a reader
never sees it half written), on S3 a conditional PUT (`If-None-Match: *`). It names its holder
(host, pid, run id, command, started, last heartbeat, and the holder's renewal period and
staleness threshold); a daemon thread on the driver renews it every `heartbeat_seconds()`, each
write with a fresh nonce. A lease is dead once it has not been written for its holder's
`stale_seconds()` (the holder was killed, its machine lost), measured by the store's clock (a
file's mtime; on S3 the answer's Date against the object's LastModified), never the holder's; a
holder whose process is gone is dead at once, when it ran on this machine in this PID namespace
(same host name, boot id and PID-namespace id: a container that shares only the host name does
not count). A dead lease is taken over by the next run; `--take-over-lease` takes it over sooner:
once it has not been written for 1.5 of its holder's renewal periods (a live holder's is). A lease
that cannot be read as a record (a store that cannot create it whole, damaged) is alive until it
is stale by its age. A holder whose lease was taken over stops (`Lease.check`) before it writes
more; the tasks that publish rows on its behalf read the lease before each part (`held_by`).

A takeover is a conditional replace, so of two runs taking over one dead lease only one wins:
locally, under an exclusive `lease.json.takeover` guard file, the lease is re-read and replaced
with one rename (renewals and the release take the same guard, so none overwrites a takeover); on
S3 the PUT carries `If-Match` with the dead lease's ETag. A renewal is conditional the same way,
so a holder whose lease was taken over notices, logs it and stops renewing. A conditional PUT
refused with 412 is read back before it counts as refused: a request whose answer was lost and
that botocore sent again is refused by its own first copy, which holds this write's nonce.
Stores that cannot create conditionally (other object stores, or an S3-compatible store that
refuses the header) get a plain write read back after a moment: a warning says two runs started
at the same instant are not both refused there.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import NamedTuple

import fsspec

from model.errors import DinosegError
from model.storage import options_for
from pipeline.io.files import check_writable, is_local_url, temp_name
from pipeline.io.retry import with_retries

log = logging.getLogger(__name__)

LEASE_NAME = "lease.json"
STALE_ENV = "DINOSEG_LEASE_STALE_S"  # seconds without a heartbeat after which a lease is dead
DEFAULT_STALE_SECONDS = 120.0
CONDITIONAL_PROTOCOLS = frozenset({"s3", "s3a"})  # If-None-Match / If-Match on PutObject
READ_BACK_SECONDS = 1.0  # stores without conditional writes: how long a racer has to overwrite ours
GUARD_STALE_SECONDS = 10.0  # a takeover guard this old was left by a run killed holding it (held for milliseconds)
GUARD_WAIT_SECONDS = 1.0  # how long a takeover, renewal or release waits for another's guard
NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV})


def stale_seconds() -> float:
    value = os.environ.get(STALE_ENV, "")
    try:
        return float(value) if value else DEFAULT_STALE_SECONDS
    except ValueError:
        raise DinosegError(f"{STALE_ENV}={value!r} is not a number of seconds: set it to e.g. 120.") from None


def heartbeat_seconds() -> float:
    """A quarter of the staleness threshold: three renewals may fail before the lease looks dead."""
    return max(stale_seconds() / 4, 0.05)


class _Seen(NamedTuple):
    """The lease as read: its record, which write it is, and how long ago that write was."""

    holder: dict  # a lease that is not a record reads as a record of nobody
    etag: str | None  # the store's ETag; locally the file's inode and mtime
    age: float  # seconds since the write, by the store's clock where it has one


class _GuardBusy(OSError):
    """Another run holds the local takeover guard."""


class Lease:
    """`with Lease(output, command, storage_options):` holds OUTPUT's lease for the block."""

    def __init__(self, output: str, command: str, storage_options: dict | None = None, take_over: bool = False):
        self.output = output.rstrip("/")
        self.url = f"{self.output}/{LEASE_NAME}"
        self.command = command
        self.take_over = take_over
        self.fs, self.path = fsspec.core.url_to_fs(self.url, **options_for(self.url, storage_options))
        self.local = is_local_url(self.url)
        self.protocol = fsspec.utils.get_protocol(self.url)
        self.run_id = uuid.uuid4().hex
        self.started = time.time()
        self.stale, self.period = stale_seconds(), heartbeat_seconds()  # this run's, recorded for takers
        self._etag: str | None = None
        self._confirmed = time.monotonic()  # when the lease was last known to be this run's
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    # ---- the record ----------------------------------------------------------------------------

    def record(self) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "run_id": self.run_id,
            "command": self.command,
            "started": round(self.started, 3),
            "heartbeat": round(time.time(), 3),
            "nonce": uuid.uuid4().hex,  # this write's: a retried PUT finds its own first copy by it
            "heartbeat_seconds": self.period,
            "stale_seconds": self.stale,
            **_machine(),
        }

    def _body(self) -> tuple[bytes, str]:
        record = self.record()
        return json.dumps(record, indent=1).encode(), record["nonce"]

    # ---- acquire / release -----------------------------------------------------------------------

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lease or raise one DinosegError naming its holder."""
        check_writable(self.url)  # http, zip...: one sentence, not a failed PUT
        if self.local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(3):  # a holder that released, or another taker: look again
            if self._create():
                break
            seen = self._read()
            if seen is None:
                continue
            holder = seen.holder
            dead = _died_here(holder) or seen.age >= _stale_of(holder) or (self.take_over and self._not_beating(seen))
            if not dead:
                raise DinosegError(_held_message(self.url, seen))
            log.warning("taking over %s from %s (last written %.0f s ago)", self.url, _who(holder), seen.age)
            if self._replace(seen):
                break
        else:
            raise DinosegError(f"{self.url} keeps changing hands: another run is starting there; re-run once it has.")
        self._confirmed = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name="dinoseg-lease", daemon=True)
        self._thread.start()

    def _not_beating(self, seen: _Seen) -> bool:
        """--take-over-lease: the holder is dead once its lease has not been written for 1.5 of its
        renewal periods (a live holder's is; so is the lease of another run that took it over)."""
        wait = 1.5 * _period_of(seen.holder) - seen.age
        if wait > 0:
            time.sleep(wait)
        now = self._read()
        return now is not None and (now.etag, now.holder.get("nonce")) == (seen.etag, seen.holder.get("nonce"))

    def check(self) -> None:
        """DinosegError once another run took the lease over: this run stops before it writes more.
        When no renewal has succeeded for the staleness threshold (the process was paused, the store
        out of reach), the lease is read to be sure before anything is written."""
        if not self.lost and time.monotonic() - self._confirmed > self.stale:
            try:
                seen = self._read()
            except Exception as e:  # the store out of reach: the writes fail the same way
                log.warning("could not read %s to confirm this run still holds it (%s)", self.url, e)
            else:
                if seen is None or seen.holder.get("run_id") != self.run_id:
                    self.lost = True
                else:
                    self._confirmed = time.monotonic()
        if self.lost:
            raise DinosegError(
                f"{self.url} was taken over by another run while this one wrote: OUTPUT now belongs to that run; "
                "re-run once it has ended (finished work is kept)."
            )

    def taken_over(self) -> None:
        """A task of this run found the lease another run's (`held_by`) before its renewal thread
        did: this run stops as it would then (`check` raises from now on)."""
        if not self.lost:
            log.error("%s was taken over by another run (a write task found it so): this run stops", self.url)
        self.lost = True
        self.check()

    def close_writers(self, *writers) -> None:
        """Publish the writers' rows (`close_all`) while this run holds the lease; once it lost it,
        drop them instead (`abandon`: the run that holds OUTPUT now redoes their keys) and raise
        `check`'s DinosegError."""
        from pipeline.io.parts import close_all

        try:
            if not self.lost:
                close_all(*writers)
        finally:
            if self.lost:
                for writer in writers:
                    writer.abandon()
        self.check()

    def release(self) -> None:
        """Stop renewing and delete the lease, if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.lost:
            return
        try:
            with self._guard(GUARD_WAIT_SECONDS) if self.local else contextlib.nullcontext():
                seen = self._read()
                if seen is not None and seen.holder.get("run_id") == self.run_id:
                    self.fs.rm(self.path)
        except Exception as e:  # a lease left behind turns stale and is taken over: never fail the run for it
            log.warning("could not remove %s (%s): the next run takes it over once it is stale", self.url, e)

    # ---- the store's operations ------------------------------------------------------------------

    def _create(self) -> bool:
        """Create the lease if none exists; False if one does."""
        body, nonce = self._body()
        if self.local:
            return self._create_local(body)
        if self.protocol in CONDITIONAL_PROTOCOLS:
            created = self._put_conditionally(body, nonce, IfNoneMatch="*")
            if created is not None:
                return created
        return self._create_unconditionally(body)

    def _create_local(self, body: bytes) -> bool:
        tmp = os.path.join(os.path.dirname(self.path), temp_name(LEASE_NAME))  # a kill leaves it to the sweep
        with open(tmp, "wb") as f:
            f.write(body)
        try:
            os.link(tmp, self.path)  # the lease appears whole or not at all; EEXIST when one exists
            return True
        except FileExistsError:
            return False
        except FileNotFoundError:  # the holder's sweep took our temporary file: there is a holder
            return False
        except OSError as e:
            if e.errno not in NO_HARD_LINKS:
                raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        # a filesystem without hard links: an exclusive create, written after (a reader meanwhile
        # sees a lease that is not a record, alive until stale)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        return True

    def _put_conditionally(self, body: bytes, nonce: str, **condition) -> bool | None:
        """PUT the lease with `condition` (IfNoneMatch / IfMatch): True when it is now this body,
        False when the condition failed, None when the store refuses the header."""
        try:
            self._etag = _etag_of(self.fs.pipe_file(self.path, body, **condition))
            return True
        except OSError as e:  # FileExistsError, FileNotFoundError (If-Match on no lease) included
            if not (isinstance(e, (FileExistsError, FileNotFoundError)) or _precondition_failed(e)):
                if not _unsupported(e):
                    raise
                log.warning("%s does not write objects conditionally (%s)", self.url, e)
                return None
        # refused, perhaps by our own write: an answer lost, the request sent again finds it there
        seen = self._read()
        if seen is not None and seen.holder.get("nonce") == nonce:
            self._etag = seen.etag
            return True
        return False

    def _create_unconditionally(self, body: bytes) -> bool:
        log.warning(
            "%s: this store cannot create the lease atomically; two runs started at the same moment may both "
            "proceed (a store with conditional writes, S3 or a local disk, refuses the second).",
            self.url,
        )
        if self.fs.exists(self.path):
            return False
        self.fs.pipe_file(self.path, body)
        time.sleep(READ_BACK_SECONDS)  # a racer's write lands in this window: the last writer wins, the other backs off
        seen = self._read()
        return seen is not None and seen.holder.get("run_id") == self.run_id

    def _read(self) -> _Seen | None:
        """The lease as it is now; None when there is none."""
        try:
            if self.local:
                data, etag, age = self._read_local()
            elif self.protocol in CONDITIONAL_PROTOCOLS:
                data, etag, age = with_retries(self._read_s3, f"reading {self.url}")
            else:
                data, etag, age = with_retries(self._read_other, f"reading {self.url}")
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(data)
            if not isinstance(holder, dict):
                raise ValueError("not an object")
        except ValueError:  # not whole yet, or damaged: alive until stale by its age
            holder = {"host": "?", "pid": "?", "run_id": "", "command": "?"}
        return _Seen(holder, etag, max(age, 0.0))

    def _read_local(self) -> tuple[bytes, str, float]:
        with open(self.path, "rb") as f:  # one file: a rename meanwhile does not mix two leases
            stat = os.fstat(f.fileno())
            data = f.read()
        return data, f"{stat.st_ino}-{stat.st_mtime_ns}", time.time() - stat.st_mtime

    def _read_s3(self) -> tuple[bytes, str | None, float]:
        """One GET: the body, its ETag and its age by S3's clock (the answer's Date)."""
        from fsspec.asyn import sync

        data, answer = sync(self.fs.loop, _get_object, self.fs, self.path)
        modified = answer["LastModified"].timestamp()
        date = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        try:
            now = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):  # no Date header: this machine's clock
            now = time.time()
        return data, answer.get("ETag"), now - modified

    def _read_other(self) -> tuple[bytes, str | None, float]:
        self.fs.invalidate_cache(self.path)
        info = self.fs.info(self.path)
        data = self.fs.cat_file(self.path)
        try:
            age = time.time() - self.fs.modified(self.path).timestamp()
        except Exception:  # no modification times: the holder's heartbeat
            age = time.time() - float(_record(data).get("heartbeat") or 0)
        return data, info.get("ETag") or info.get("etag"), age

    def _replace(self, seen: _Seen) -> bool:
        """Replace the lease `seen` with ours, only if it is still that write."""
        body, nonce = self._body()
        if self.local:
            try:
                with self._guard(GUARD_WAIT_SECONDS):
                    now = self._read()
                    if now is None or now.etag != seen.etag:
                        return False
                    self._write_local(body)
                    return True
            except _GuardBusy:  # another run is taking over right now
                return False
        if self.protocol in CONDITIONAL_PROTOCOLS and seen.etag:
            replaced = self._put_conditionally(body, nonce, IfMatch=seen.etag)
            if replaced is not None:
                return replaced
        self.fs.pipe_file(self.path, body)
        time.sleep(READ_BACK_SECONDS)
        now = self._read()
        return now is not None and now.holder.get("run_id") == self.run_id

    @contextlib.contextmanager
    def _guard(self, wait: float):
        """Locally, the exclusive `lease.json.takeover` file for the block: a takeover, a renewal
        and a release each re-read and replace the lease under it. _GuardBusy after `wait` s."""
        guard = f"{self.path}.takeover"
        deadline = time.monotonic() + wait
        while True:
            try:
                fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - os.path.getmtime(guard) > GUARD_STALE_SECONDS:  # its taker was killed
                        os.unlink(guard)
                        continue
                if time.monotonic() >= deadline:
                    raise _GuardBusy(f"{guard} is held by another run checking the lease") from None
                time.sleep(0.01)
        os.close(fd)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(guard)

    def _write_local(self, body: bytes) -> None:
        tmp = os.path.join(os.path.dirname(self.path), temp_name(LEASE_NAME))  # a kill leaves it to the sweep
        with open(tmp, "wb") as f:
            f.write(body)
        os.replace(tmp, self.path)  # one rename: a reader sees the old lease or the new one

    def _renew(self) -> bool:
        """A new heartbeat, only while the lease is still ours."""
        body, nonce = self._body()
        if self.local:
            with self._guard(GUARD_WAIT_SECONDS):  # busy: raised, this beat is skipped
                seen = self._read()
                if seen is None or seen.holder.get("run_id") != self.run_id:
                    return False
                self._write_local(body)
                return True
        if self.protocol in CONDITIONAL_PROTOCOLS and self._etag:
            renewed = self._put_conditionally(body, nonce, IfMatch=self._etag)
            if renewed is not None:
                return renewed
        seen = self._read()
        if seen is None or seen.holder.get("run_id") != self.run_id:
            return False
        self.fs.pipe_file(self.path, body)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.period):
            try:
                if not self._renew():
                    self.lost = True
                    log.error("%s was taken over by another run: this run stops", self.url)
                    return
                self._confirmed = time.monotonic()
            except Exception as e:  # the store briefly out of reach: the next beat tries again
                log.warning("renewing %s failed (%s); trying again", self.url, e)


def held_by(output: str, run_id: str, storage_options: dict | None = None) -> bool:
    """Whether OUTPUT's lease is run `run_id`'s now, by one read of lease.json: the check of a task
    about to publish on that run's behalf (it has no renewal thread to tell it, as the run's
    `Lease` has). False when there is no lease, another run's or one that is not a record; a store
    that still fails after the retries raises. A record not whole yet (a renewal rewriting it in
    place, on stores without an atomic PUT) is read again: it is another run's only once it says so."""
    lease = Lease(output, "", storage_options)
    for attempt in range(UNREADABLE_READS):
        seen = lease._read()
        if seen is None or seen.holder.get("run_id") or attempt == UNREADABLE_READS - 1:
            break
        time.sleep(0.2 * (attempt + 1))
    return bool(run_id) and seen is not None and seen.holder.get("run_id") == run_id


UNREADABLE_READS = 5  # reads of a lease.json that is not a whole record before a task takes it as lost


async def _get_object(fs, path: str) -> tuple[bytes, dict]:
    bucket, key, _ = fs.split_path(path)
    answer = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    try:
        return await answer["Body"].read(), answer
    finally:
        answer["Body"].close()


def _machine() -> dict:
    """This process's kernel (boot id) and PID namespace: a pid means this process only where both
    match (Linux; elsewhere empty, and no pid is trusted)."""
    ids = {"boot_id": "", "pid_namespace": ""}
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            with open("/proc/sys/kernel/random/boot_id") as f:
                ids["boot_id"] = f.read().strip()
        with contextlib.suppress(OSError):
            ids["pid_namespace"] = os.readlink("/proc/self/ns/pid")
    return ids


def _died_here(holder: dict) -> bool:
    """A holder in this machine's PID namespace whose process is gone (a kill -9, an out-of-memory
    kill): dead now, no need to wait for its lease to go stale. A holder elsewhere (another
    container with the same host name, another boot) is never judged by its pid."""
    here = _machine()
    if (
        holder.get("host") != socket.gethostname()
        or not isinstance(holder.get("pid"), int)
        or not here["boot_id"]
        or not here["pid_namespace"]
        or (holder.get("boot_id"), holder.get("pid_namespace")) != (here["boot_id"], here["pid_namespace"])
    ):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def _seconds(value, default: float) -> float:
    """A number of seconds from a lease record, else `default` (a record of an earlier version)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return default


def _stale_of(holder: dict) -> float:
    """The holder's staleness threshold: its heartbeat period is its, not the taker's."""
    return _seconds(holder.get("stale_seconds"), stale_seconds())


def _period_of(holder: dict) -> float:
    return _seconds(holder.get("heartbeat_seconds"), heartbeat_seconds())


def _record(data: bytes) -> dict:
    with contextlib.suppress(ValueError):
        record = json.loads(data)
        if isinstance(record, dict):
            return record
    return {}


def _etag_of(result) -> str | None:
    return result.get("ETag") if isinstance(result, dict) else None


def _precondition_failed(e: OSError) -> bool:
    return "pre-condition" in str(e).lower() or "precondition" in str(e).lower()


def _unsupported(e: OSError) -> bool:
    text = str(e).lower()
    return "notimplemented" in text or "not implemented" in text or "invalidargument" in text or "501" in text


def _who(holder: dict) -> str:
    return f"run {str(holder.get('run_id', ''))[:8]} ({holder.get('command', '?')}, pid {holder.get('pid', '?')} on {holder.get('host', '?')})"


def _held_message(url: str, seen: _Seen) -> str:
    if not seen.holder.get("run_id"):
        return (
            f"{url} is not a lease record (another run is creating it, or it is damaged) and was written "
            f"{seen.age:.0f} s ago: re-run in a moment; once it is {_stale_of(seen.holder):.0f} s old it is taken over."
        )
    return (
        f"{url} is held by {_who(seen.holder)}, whose last heartbeat was {seen.age:.0f} s ago: wait for that run "
        f"to end, or, if it is dead, re-run with --take-over-lease (a lease without a heartbeat for "
        f"{_stale_of(seen.holder):.0f} s is taken over without it)."
    )
