"""Transient storage faults: which errors are worth trying again, and trying them again.

botocore and s3fs retry most faults of a request by themselves (503 SlowDown, 500, resets,
bodies cut short). What reaches dinoseg after their retries is one of two kinds:

- transient: the store was briefly unreachable, slow or overloaded (`EndpointConnectionError`
  and the other botocore connection and timeout errors, which are not `OSError`s; s3fs's
  `OSError`s for SlowDown/InternalError; aiohttp's connection errors; socket timeouts). Trying
  again later can succeed, so a row that failed this way is `retryable`, and the few writes that
  decide a whole run (a Parquet part, run.json) are tried again here with backoff;
- permanent: missing, forbidden, corrupt, unsafe (a re-run fails the same way).

The classification goes by class names along the exception's MRO, so no client library has
to be imported to ask.
"""

from __future__ import annotations

import errno
import logging
import time

log = logging.getLogger(__name__)

# exceptions (or their bases) that a later attempt can get past
TRANSIENT_TYPES = frozenset(
    {
        # botocore: none of these is an OSError
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ProxyConnectionError",
        "HTTPClientError",
        "IncompleteReadError",
        "ResponseStreamingError",
        # aiohttp, fsspec, the standard library
        "ClientConnectionError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "FSTimeoutError",
        "TimeoutError",
        "ConnectionError",
        "ConnectionResetError",
        "ConnectionRefusedError",
        "ConnectionAbortedError",
        "BrokenPipeError",
    }
)
# error codes of an S3 ClientError that mean "try again"
TRANSIENT_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError", "ServiceUnavailable"}
)
# HTTP statuses of an aiohttp ClientResponseError that mean "try again"
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EIO",
        "EBUSY",
        "EAGAIN",
        "ETIMEDOUT",
        "ECONNRESET",
        "ECONNREFUSED",
        "ECONNABORTED",
        "EPIPE",
        "ENETUNREACH",
        "EHOSTUNREACH",
        "EREMOTEIO",
    )
    if hasattr(errno, name)
)
# stages whose plain `OSError` rows are I/O faults (s3fs turns SlowDown and InternalError into
# plain OSErrors; missing and forbidden files have classes of their own)
IO_STAGES = ("list", "read", "write", "select")

ATTEMPTS = 4  # tries of a whole-run write: 1 + 3 retries, about 0.5 + 1 + 2 s of waiting
BACKOFF_S = 0.5


def is_transient(error: BaseException, context: bool = True) -> bool:
    """Whether `error` (or the error it was raised from) is a fault a later attempt can get past.
    `context=False`: only explicit `raise ... from` causes count, not an error being handled when
    this one was raised (the CLI's view: a bug while handling a fault is a bug)."""
    seen = 0
    while error is not None and seen < 5:
        names = {c.__name__ for c in type(error).__mro__}
        if names & TRANSIENT_TYPES:
            return True
        code = getattr(error, "response", None)
        if isinstance(code, dict) and str(code.get("Error", {}).get("Code", "")) in TRANSIENT_CODES | {"500", "503"}:
            return True
        if "ClientResponseError" in names and getattr(error, "status", None) in TRANSIENT_STATUSES:
            return True  # aiohttp's error for an http(s) host's 503, 429 ... (fsspec's http does not retry)
        if type(error) is OSError and error.errno in TRANSIENT_ERRNOS:
            return True  # s3fs's OSError for SlowDown (EBUSY), InternalError (EREMOTEIO), anything else (EIO)
        # a plain OSError without an errno is no store's (s3fs always sets one): pyarrow reports a
        # damaged Parquet footer or page so, and trying that again only fails again
        error, seen = error.__cause__ or (error.__context__ if context else None), seen + 1
    return False


def retryable_error(stage: str, error_type: str) -> bool:
    """Whether an error row (its stage and exception class name) is worth another run."""
    if error_type in TRANSIENT_TYPES:
        return True
    return error_type == "OSError" and stage in IO_STAGES


def with_retries(fn, what: str, attempts: int | None = None, backoff_s: float | None = None, sleep=time.sleep):
    """fn() tried up to `attempts` times (ATTEMPTS) while it fails transiently (waiting backoff_s,
    BACKOFF_S, then twice as long each time); a permanent error, or the last transient one, is
    raised as it is."""
    attempts, backoff_s = attempts or ATTEMPTS, BACKOFF_S if backoff_s is None else backoff_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == attempts or not is_transient(e):
                raise
            wait = backoff_s * 2 ** (attempt - 1)
            log.warning("%s failed (%s: %s); trying again in %.1f s", what, type(e).__name__, e, wait)
            sleep(wait)
    raise AssertionError("unreachable")


def retry_each(
    fetch,
    items: list,
    what: str = "reading",
    attempts: int | None = None,
    backoff_s: float | None = None,
    sleep=time.sleep,
) -> list:
    """`fetch(items) -> [result or exception per item]`, with the items that failed transiently
    fetched again (backoff as in `with_retries`) until they succeed or attempts run out. An
    exception from `fetch` itself stands for every item it was given."""

    def call(some: list) -> list:
        try:
            return list(fetch(some))
        except Exception as e:
            return [e] * len(some)

    attempts, backoff_s = attempts or ATTEMPTS, BACKOFF_S if backoff_s is None else backoff_s
    results = call(items)
    for attempt in range(1, attempts):
        again = [i for i, r in enumerate(results) if isinstance(r, BaseException) and is_transient(r)]
        if not again:
            break
        wait = backoff_s * 2 ** (attempt - 1)
        first = results[again[0]]
        log.warning(
            "%s %d items failed (%s: %s); trying again in %.1f s", what, len(again), type(first).__name__, first, wait
        )
        sleep(wait)
        for i, r in zip(again, call([items[i] for i in again]), strict=True):
            results[i] = r
    return results
