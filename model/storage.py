"""Which fsspec options a URL is opened with: storage options apply only where they were given.

A user's `--storage-options` are meant for the stores they named (INPUT, OUTPUT, a `--head`
URL), not for every filesystem the job meets: an S3 endpoint must not reach the weights hub,
and a bearer header for one https host must not go to every host a manifest lists. Two forms:

- scoped: every key is a protocol (`"s3"`), a URL prefix (`"s3://bucket/"`, `"https://host/"`)
  or `"*"` (every object store), and every value a dict of options; the longest prefix that
  matches a URL wins, then its protocol, then `"*"` (`s3a` is `s3`, `gcs` is `gs`).
- flat (plain fsspec options): they apply to every object store (any protocol but local files
  and http(s)) and, scoped by `scope_options(options, given_for)`, to the http(s) hosts of the
  URLs they were given with, if they are options an http filesystem takes (`http_options`:
  `headers`, `auth`, `client_kwargs` of an aiohttp session ...). A web host is only ever named:
  a manifest's other hosts get nothing, and an object store's options (`key`, `endpoint_url`
  under `client_kwargs` ...) given with an https manifest stay with the object stores, where
  they were meant to go (aiohttp would refuse them, row by row). Object stores are not narrowed
  to the command line's protocols: a local manifest of `s3://` images, or a labeling task's
  image in a bucket, needs them too.

Every `run_*` scopes its config's options as it starts (`scope_config`, over the URLs its
fields name), so a config built in Python means what the same command line means; scoping
scoped options changes nothing.

Local files never get options. `options_for(url, options)` is the one resolver: every place that
opens a URL with the user's options goes through it (`url_to_fs(url, **options_for(url, so))`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import uuid
from typing import Iterable, Iterator
from urllib.parse import urlsplit

from .errors import DinosegError

LOCAL = ("file", "local")
WEB = ("http", "https", "data")  # named by host, never reached by a flat dict


@functools.lru_cache(maxsize=256)
def canonical_protocol(protocol: str | None) -> str:
    """'file' for local paths; otherwise the filesystem's own first name (s3a -> s3, gcs -> gs)."""
    if protocol in (None, "", *LOCAL):
        return "file"
    if protocol in WEB:
        return protocol
    import fsspec

    try:
        p = fsspec.get_filesystem_class(protocol).protocol
        return p if isinstance(p, str) else p[0]
    except (ImportError, ValueError):
        return protocol


def protocol_of(url: str) -> str:
    """The canonical protocol of a URL's outermost filesystem ('file' for a plain path)."""
    head = url.split("::", 1)[0]
    return canonical_protocol(head.split("://", 1)[0] if "://" in head else None)


def _strip(url: str) -> str:
    """The URL without user-info: scopes are matched on scheme, host and path."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return url.replace(parts.netloc, parts.netloc.rsplit("@", 1)[1], 1)


def _is_scope(key: str) -> bool:
    from fsspec.registry import known_implementations

    return "://" in key or key == FLAT or key in known_implementations or key in LOCAL


def is_scoped(options: dict | None, what: str = "--storage-options") -> bool:
    """True if every key names a scope; False for plain options; a mix is one sentence."""
    if not options:
        return False
    scopes = [k for k in options if isinstance(k, str) and _is_scope(k)]
    if not scopes:
        return False
    others = [str(k) for k in options if k not in scopes]
    if others:
        raise DinosegError(
            f"{what} mixes scopes ({', '.join(scopes)}) with plain options ({', '.join(others)}): put every "
            f'option under a scope, e.g. {{"{scopes[0]}": {{...}}}}, or give plain options only.'
        )
    bad = [k for k in scopes if not isinstance(options[k], dict)]
    if bad:
        raise DinosegError(
            f'{what}: the options for {bad[0]} are not a JSON object: give them as {{"{bad[0]}": {{"anon": true}}}}.'
        )
    return True


def _host_scope(url: str) -> str:
    parts = urlsplit(_strip(url))
    return f"{parts.scheme}://{parts.netloc}/"


# what fsspec gives every filesystem, whatever its protocol
_ANY_FILESYSTEM = frozenset({"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths"})


@functools.lru_cache(maxsize=1)
def _http_keys() -> tuple[frozenset, frozenset]:
    """(options fsspec's http filesystem takes, including each request's aiohttp arguments; the
    aiohttp session's arguments, its `client_kwargs`), read from their signatures."""
    import inspect

    try:
        import aiohttp
        from fsspec.implementations.http import HTTPFileSystem
    except ImportError:  # no http filesystem: no options for one
        return frozenset(), frozenset()
    own = set(inspect.signature(HTTPFileSystem.__init__).parameters) - {"self", "storage_options"}
    request = set(inspect.signature(aiohttp.ClientSession._request).parameters) - {"self", "method", "str_or_url"}
    session = set(inspect.signature(aiohttp.ClientSession.__init__).parameters) - {"self"}
    return frozenset(own | request | _ANY_FILESYSTEM), frozenset(session)


def http_options(options: dict) -> bool:
    """Whether plain `options` are ones an http(s) filesystem takes (`headers`, `auth` ...), not
    an object store's (`key`, `anon`, `client_kwargs={"endpoint_url": ...}`)."""
    keys, session = _http_keys()
    client = options.get("client_kwargs") or {}
    return set(options) <= keys and isinstance(client, dict) and set(client) <= session


def scope_options(options: dict | None, given_for: Iterable[str | None], what: str = "--storage-options") -> dict:
    """Plain options given with these URLs, for every object store (`"*"`) and, if an http
    filesystem takes them (`http_options`), for the host of each http(s) URL among them (then
    scoped; without such a host they stay plain, which means the same). Scoped options come
    back as they are (checked)."""
    options = dict(options or {})
    if not options or is_scoped(options, what) or not http_options(options):
        return options
    hosts = {
        _host_scope(url): options
        for url in given_for
        if isinstance(url, str) and "://" in url.split("::", 1)[0] and protocol_of(url) in ("http", "https")
    }
    return {FLAT: options, **hosts} if hosts else options


def _urls(obj, seen: int = 0) -> Iterator[str]:
    """The strings a config's fields hold (in lists too, and in the configs it holds)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name, None)
        if dataclasses.is_dataclass(value) and not isinstance(value, type) and seen < 3:
            yield from _urls(value, seen + 1)
        elif isinstance(value, str):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, str))


def _rescoped(obj, urls: list[str], seen: int = 0):
    changes = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name, None)
        if dataclasses.is_dataclass(value) and not isinstance(value, type) and seen < 3:
            inner = _rescoped(value, urls, seen + 1)
            if inner is not value:
                changes[f.name] = inner
        elif f.name == "storage_options" and isinstance(value, dict) and value and f.init:
            scoped = scope_options(value, urls)
            if scoped != value:
                changes[f.name] = scoped
    return dataclasses.replace(obj, **changes) if changes else obj


def scope_config(config):
    """`config` (a dataclass; the configs it holds too) with its plain `storage_options` scoped
    to the URLs its fields name, as the command line scopes them (`scope_options`); the config
    itself when nothing changes. Every `run_*` starts with it."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return config
    return _rescoped(config, list(_urls(config)))


def _matches(url: str, prefix: str) -> bool:
    if prefix == FLAT:
        return protocol_of(url) not in (*WEB, "file")
    if "://" not in prefix:
        return protocol_of(url) == canonical_protocol(prefix)
    p_scheme, p_rest = prefix.split("://", 1)
    u_scheme, u_rest = url.split("://", 1) if "://" in url else ("file", url)
    if canonical_protocol(p_scheme) != canonical_protocol(u_scheme):
        return False
    p_rest = p_rest.rstrip("/")
    return not p_rest or u_rest == p_rest or u_rest.startswith(p_rest + "/")


def _weight(prefix: str) -> int:
    if prefix == FLAT:
        return -1  # the widest scope
    return len(prefix.rstrip("/")) if "://" in prefix else 0  # then a protocol


FLAT = "*"  # the scope of plain options: every object store


def scope_of(url: str, options: dict | None) -> str | None:
    """Which scope of `options` applies to url: a key of scoped options (FLAT for plain ones),
    None for none. URLs with the same scope and protocol can share one filesystem."""
    if not options or not isinstance(url, str):
        return None
    url = _strip(url.split("::", 1)[0])
    protocol = protocol_of(url)
    if protocol == "file":
        return None
    if not is_scoped(options):
        return None if protocol in WEB else FLAT
    hits = [k for k in options if _matches(url, k)]
    return max(hits, key=_weight) if hits else None


def options_for(url: str, options: dict | None) -> dict:
    """The fsspec options to open `url` with (a new dict; empty for local files)."""
    scope = scope_of(url, options)
    if scope is None:
        return {}
    return dict(options[scope]) if is_scoped(options) else dict(options)


# ---- atomic local writes ------------------------------------------------------------------------

TEMP_SUFFIX = ".dinoseg-tmp"
TEMP_STEM_BYTES = 64  # of the final name kept in the temp name: it stays far below a 255-byte name limit


def temp_name(name: str) -> str:
    """A temporary name for a file that will be renamed to `name`, in the same folder:
    `.<first 64 bytes of name>.<8 hex>.dinoseg-tmp`. Hidden, unique, recognisable by
    `pipeline.io.files.is_temp_name` (so a sweep never takes a user's file), and short whatever
    `name` is."""
    stem = name.encode("utf-8", "surrogateescape")[:TEMP_STEM_BYTES].decode("utf-8", "ignore")
    return f".{stem}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}"


def write_local_atomic(path: str, data: bytes) -> None:
    """Write a local file whole or not at all: `temp_name` in its folder, then os.replace (no
    fsync: this is about readers and killed writers, not power loss). The one local write of
    model/ (class maps, head checkpoints) and of `pipeline.io.files.write_bytes_atomic`."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, temp_name(os.path.basename(path)))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, unlike mkstemp's 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
