"""Credentials never persist: URLs as run.json, logs, error rows and exceptions may show them.

A URL can carry a secret in two places: its user-info (`https://user:pass@host/x`), always
removed, and, in an http(s) URL, credential-like query parameters (`CREDENTIAL_PARAMETERS`: a
presigned URL's `X-Amz-Signature`, Azure's SAS `sig`, a `token`, an `api_key` ...), whose values
are masked. Every other parameter is kept (`?id=2` is which object a query-addressed URL is, and
a later command that re-reads the image needs it); in an object store's URL a '?' is part of the
name and is kept. `redact_url` keeps what identifies the file (scheme, host, port, path, the
other parameters) and replaces the secret parts with `***`; `redact_text` does it for every URL
inside a message (an exception's text quotes its URL).

So a URL's embedded credentials do not reach later commands: a recorded `path` whose signature
was masked no longer opens; give credentials as scoped storage options instead.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus, urlsplit, urlunsplit

MASK = "***"
# query parameters (compared case-insensitively, after percent-decoding) whose values are
# secrets, or parts of a signature: AWS SigV4 and CloudFront presigned URLs, Google's signed URLs,
# Azure SAS tokens (sig and the fields it signs), OAuth tokens, API keys, passwords
CREDENTIAL_PARAMETERS = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "x-goog-credential",
        "signature",
        "policy",
        "key-pair-id",
        "awsaccesskeyid",
        "sig",
        "se",
        "sp",
        "sv",
        "sr",
        "st",
        "spr",
        "skoid",
        "sktid",
        "skt",
        "ske",
        "sks",
        "skv",
        "token",
        "access_token",
        "id_token",
        "refresh_token",
        "auth",
        "authorization",
        "api_key",
        "apikey",
        "api-key",
        "key",
        "password",
        "passwd",
        "pwd",
        "secret",
        "client_secret",
    }
)
# and any parameter whose name says it holds one (`X-Auth-Token`, `db_password`, `sessionSecret`)
_CREDENTIAL_WORDS = re.compile(r"token|secret|passw|signature|credential|api[-_]?key", re.IGNORECASE)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")


def is_credential_parameter(name: str) -> bool:
    """Whether a URL query parameter of this name holds a credential (`CREDENTIAL_PARAMETERS`)."""
    name = unquote_plus(name).strip().lower()
    return name in CREDENTIAL_PARAMETERS or bool(_CREDENTIAL_WORDS.search(name))


def _redact_query(query: str) -> str:
    return "&".join(
        f"{p.split('=', 1)[0]}={MASK}" if "=" in p and is_credential_parameter(p.split("=", 1)[0]) else p
        for p in query.split("&")
    )


def redact_url(url: str) -> str:
    """`url` without its user-info and with its credential parameters' values masked; other
    strings as they are."""
    if not isinstance(url, str) or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query and parts.scheme.lower() in ("http", "https"):  # on object stores '?' is part of a name
        query = _redact_query(query)
    fragment = parts.fragment  # an OAuth redirect's `#access_token=...`
    if "=" in fragment and parts.scheme.lower() in ("http", "https"):
        fragment = _redact_query(fragment)
    if netloc == parts.netloc and query == parts.query and fragment == parts.fragment:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def redact_text(text: str) -> str:
    """Every URL in `text` redacted (`redact_url`)."""
    if not isinstance(text, str) or "://" not in text:
        return text
    return _URL.sub(lambda m: redact_url(m.group(0)), text)


def redacted(obj):
    """`obj` (JSON-like: dicts, lists, strings) with every URL in its strings redacted."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {redacted(k) if isinstance(k, str) else k: redacted(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redacted(v) for v in obj]
    return obj


class RedactingFilter(logging.Filter):
    """A handler's filter: the record's message and traceback with their URLs redacted (attach it
    to every handler that writes somewhere: the console, the run's log file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not fit: left to the handler to report
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def redact_this_process() -> None:
    """Every log record this process makes from now on, redacted as it is made (a record
    factory, so every logger and handler is covered, Ray's own and those set up later): the
    setup hook of Ray's worker processes (`pipeline.runtime.console.ray_init_options`), whose
    records go to the session's worker logs, not through the driver's filtered handlers. It
    never raises: a failing hook would stop every worker."""
    try:
        previous = logging.getLogRecordFactory()
        if getattr(previous, "dinoseg_redacts", False):
            return
        redact = RedactingFilter()

        def factory(*args, **kwargs):
            record = previous(*args, **kwargs)
            redact.filter(record)
            return record

        factory.dinoseg_redacts = True
        logging.setLogRecordFactory(factory)
    except Exception:  # noqa: BLE001 - a worker without redaction still works; one that fails here does not
        pass
