"""Storage options apply only where they were given (`model.storage`), and URLs lose their
secrets before they are shown (`model.redact`)."""

from __future__ import annotations

import pytest

from model.errors import DinosegError
from model.redact import redact_text, redact_url
from model.storage import is_scoped, options_for, scope_options

S3 = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}, "key": "k"}
BEARER = {"headers": {"Authorization": "Bearer abc"}}


def test_plain_options_reach_object_stores_never_local_files_or_web_hosts():
    assert options_for("s3://b/x.jpg", S3) == S3
    assert options_for("s3a://b/x.jpg", S3) == S3
    for url in ("/data/x.jpg", "file:///data/x.jpg", "relative/x.jpg", "https://host/x.jpg", "http://h/x"):
        assert options_for(url, S3) == {}, url


def test_given_with_urls_they_apply_to_those_protocols_and_hosts_only():
    scoped = scope_options(BEARER, ["https://a.example/list.txt", "s3://out/seg", "/local/out", None, 3])
    assert scoped == {"*": BEARER, "https://a.example/": BEARER}
    assert options_for("https://a.example/images/1.jpg", scoped) == BEARER
    assert options_for("https://b.example/images/1.jpg", scoped) == {}  # another host of the manifest
    assert options_for("https://a.example.evil/1.jpg", scoped) == {}  # a prefix of the name is not the host
    assert options_for("http://a.example/1.jpg", scoped) == {}  # another scheme
    assert options_for("https://user:pw@a.example/1.jpg", scoped) == BEARER  # matched without user-info
    assert options_for("s3://other-bucket/x", scoped) == BEARER  # object stores: a manifest's too
    assert options_for("/local/x.jpg", scoped) == {}
    local = scope_options(S3, ["./list.txt", "s3://out"])  # a local manifest of s3:// images
    assert local == S3  # no web host named: plain, as given
    assert options_for("s3://b/x.jpg", local) == S3 and options_for("https://h/x.jpg", local) == {}


def test_scoped_options_longest_prefix_wins():
    scoped = {
        "*": {"gcs": True},
        "s3": {"anon": True},
        "s3://team/": {"profile": "team"},
        "s3://team/private": {"profile": "p"},
    }
    assert scope_options(scoped, ["/x"]) == scoped  # given scoped: kept as they are
    assert options_for("s3://public/x.jpg", scoped) == {"anon": True}
    assert options_for("s3://team/x.jpg", scoped) == {"profile": "team"}
    assert options_for("s3://team/private/x.jpg", scoped) == {"profile": "p"}
    assert options_for("s3://team/privateer/x.jpg", scoped) == {"profile": "team"}  # on a folder boundary
    assert options_for("s3://teammate/x.jpg", scoped) == {"anon": True}
    assert options_for("/tmp/x.jpg", {"file": {"auto_mkdir": True}}) == {}  # local files never get options
    assert options_for("https://h/x", scoped) == {}
    assert options_for("gs://b/x", scoped) == {"gcs": True}  # "*": every other object store


def test_bad_scoped_forms_are_one_sentence():
    with pytest.raises(DinosegError, match="mixes scopes .*s3.* with plain options .*anon"):
        is_scoped({"s3": {}, "anon": True})
    with pytest.raises(DinosegError, match="options for s3://b/ are not a JSON object"):
        is_scoped({"s3://b/": True})
    from pipeline.options import parse_storage_options

    with pytest.raises(DinosegError, match="--storage-options mixes scopes"):
        parse_storage_options('{"https://h/": {}, "key": "x"}')
    with pytest.raises(DinosegError, match="not valid JSON") as e:
        parse_storage_options('{"secret": "CANARY-IN-BAD-JSON" ')
    assert "CANARY" not in str(e.value)  # the error does not echo what may be a secret


@pytest.mark.parametrize(
    "url, shown",
    [
        ("https://user:CANARY@host:8080/a/b.jpg", "https://***@host:8080/a/b.jpg"),
        (
            "https://host/a.jpg?X-Amz-Signature=CANARY&X-Amz-Date=1",
            "https://host/a.jpg?X-Amz-Signature=***&X-Amz-Date=1",  # only credential parameters are masked
        ),
        (
            "https://acct.blob.core.windows.net/c/x.png?sv=1&sig=CANARY",
            "https://acct.blob.core.windows.net/c/x.png?sv=***&sig=***",
        ),
        (
            "https://h/get?id=2&X-Amz-Credential=CANARY&X-Amz-Security-Token=CANARY&token=CANARY&API_KEY=CANARY",
            "https://h/get?id=2&X-Amz-Credential=***&X-Amz-Security-Token=***&token=***&API_KEY=***",
        ),
        ("https://api/get?id=1", "https://api/get?id=1"),  # which object a query-addressed URL is: kept
        ("https://h/a?X-Auth-Token=CANARY&size=big", "https://h/a?X-Auth-Token=***&size=big"),
        ("https://h/cb#access_token=CANARY&state=1", "https://h/cb#access_token=***&state=1"),
        ("s3://bucket/key.jpg", "s3://bucket/key.jpg"),
        ("s3://bucket/why?.jpg", "s3://bucket/why?.jpg"),  # on an object store '?' is part of the name
        ("/local/path.jpg", "/local/path.jpg"),
    ],
)
def test_urls_keep_what_identifies_the_file_and_lose_their_secrets(url, shown):
    assert redact_url(url) == shown
    assert redact_text(f"cannot read '{url}': 403 Forbidden") == f"cannot read '{shown}': 403 Forbidden"


def test_an_object_stores_plain_options_do_not_go_to_a_web_host_named_with_them():
    """A flat S3 dict with an https manifest INPUT: aiohttp would refuse `key` and an
    `endpoint_url` client argument on every row, and they were meant for the bucket."""
    from model.storage import http_options

    scoped = scope_options(S3, ["https://a.example/list.txt", "s3://out/seg"])
    assert scoped == S3  # plain: object stores only
    assert options_for("https://a.example/1.jpg", scoped) == {} and options_for("s3://out/x", scoped) == S3
    assert http_options(BEARER) and http_options({"client_kwargs": {"headers": {}}, "block_size": 0})
    assert not http_options(S3) and not http_options({"anon": True}) and not http_options({"client_kwargs": 3})


def test_a_config_built_in_python_is_scoped_as_its_command_line_would_be():
    from dataclasses import dataclass, field

    from model.storage import scope_config

    @dataclass
    class Inner:
        output: str
        storage_options: dict = field(default_factory=dict)

    @dataclass
    class Outer:
        input: str
        inner: Inner
        extra: list = field(default_factory=list)
        storage_options: dict = field(default_factory=dict)

    config = Outer("https://a.example/list.txt", Inner("s3://out", BEARER), ["https://c.example/h.pt"], BEARER)
    scoped = scope_config(config)
    hosts = {"*": BEARER, "https://a.example/": BEARER, "https://c.example/": BEARER}
    assert scoped.storage_options == hosts and scoped.inner.storage_options == hosts
    assert config.storage_options == BEARER  # the caller's config is left as it was
    assert scope_config(scoped) is scoped  # scoped options stay as they are
    assert scope_config(Outer("/x", Inner("/y"))).storage_options == {}


def test_ray_workers_redact_their_log_records(monkeypatch):
    """Ray's worker processes run `redact_this_process` as they start (the runtime env's setup
    hook): every record they make, through any logger or handler, loses its URLs' secrets."""
    import importlib
    import logging

    from model.redact import redact_this_process
    from pipeline.runtime import console

    monkeypatch.setattr(console, "ensure_configured", lambda: None)
    hook = console.ray_init_options()["runtime_env"]["worker_process_setup_hook"]
    module, name = hook.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is redact_this_process

    before = logging.getLogRecordFactory()
    try:
        redact_this_process()
        redact_this_process()  # once only: not a factory wrapped twice
        factory = logging.getLogRecordFactory()
        assert (
            factory.dinoseg_redacts and factory.__closure__ and before in [c.cell_contents for c in factory.__closure__]
        )
        record = logging.getLogger("any").makeRecord(
            "any", logging.WARNING, __file__, 1, "cannot read %s", ("https://u:CANARY@h/a.jpg?sig=CANARY&id=3",), None
        )
        assert record.getMessage() == "cannot read https://***@h/a.jpg?sig=***&id=3"
    finally:
        logging.setLogRecordFactory(before)
