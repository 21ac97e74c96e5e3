"""Shared fixtures: an isolated weights cache, a loopback S3 endpoint (moto), a loopback HTTP
server, and one random dinov2_vits14 checkpoint in Meta's layout. Nothing here reaches the network."""

from __future__ import annotations

import functools
import http.server
import os
import re
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from pipeline.runtime.cluster import TRAIN_POLL_ENV, TRAIN_POLL_LOCAL

# what an embedded Ray gets from `runtime.start_ray`, for the session's Ray and the jobs tests start
os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_LOCAL)


@pytest.fixture(autouse=True)
def _isolated_weights_env(tmp_path_factory, monkeypatch):
    """Every test gets its own empty cache, and a hub that is a missing local folder: nothing
    falls back to ~/.cache/dinoseg or to Meta's public host. Tests that need a hub set one."""
    root = tmp_path_factory.mktemp("dinoseg-env")
    monkeypatch.setenv("DINOSEG_CACHE", str(root / "cache"))
    monkeypatch.setenv("DINOSEG_HUB", str(root / "no-hub"))


# --- loopback S3 ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 endpoint on 127.0.0.1 (a free port); yields its URL."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(var, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture(scope="session")
def s3_client(s3_server):
    """A boto3 S3 client of the loopback endpoint (bucket creation: s3fs.mkdir sends a location
    constraint that moto's us-east-1 rejects)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture(scope="session")
def s3_new_bucket(s3_server, s3_client):
    """Factory: `s3_new_bucket()` creates a fresh bucket and returns (bucket_name, storage_options),
    for fixtures of a wider scope than `s3_bucket`."""
    import s3fs

    client = s3_client

    def new_bucket() -> tuple[str, dict]:
        name = f"test-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=name)  # not s3fs.mkdir: moto's us-east-1 rejects its request
        s3fs.S3FileSystem.clear_instance_cache()  # no listings cached by an earlier test
        return name, {"client_kwargs": {"endpoint_url": s3_server}, "key": "testing", "secret": "testing"}

    return new_bucket


@pytest.fixture
def s3_bucket(s3_new_bucket):
    """A fresh bucket; yields (bucket_name, storage_options for fsspec/s3fs)."""
    import s3fs

    yield s3_new_bucket()
    s3fs.S3FileSystem.clear_instance_cache()


# --- loopback HTTP ----------------------------------------------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler that records requests, optionally answers Range requests (as
    Meta's file host, nginx and object stores do) and optionally breaks off every body halfway."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _record(self):
        self.server.requests.append((self.command, self.path))

    def do_HEAD(self):
        self._record()
        super().do_HEAD()

    def do_GET(self):
        self._record()
        path = self.translate_path(self.path)
        rng = self.headers.get("Range")
        if not os.path.isfile(path) or not (self.server.ranges or self.server.truncate):
            return super().do_GET()
        size = os.path.getsize(path)
        start, end = 0, size - 1
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if self.server.ranges and m:
            start = int(m[1])
            end = min(int(m[2]) if m[2] else size - 1, size - 1)
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes" if self.server.ranges else "none")
        self.end_headers()
        length = end - start + 1
        if self.server.truncate:
            length //= 2  # declare the whole body, send half, hang up
        with open(path, "rb") as f:
            f.seek(start)
            self.wfile.write(f.read(length))
        if self.server.truncate:
            self.close_connection = True


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # clients hanging up mid-body are expected
        pass


@dataclass
class HttpServer:
    url: str
    requests: list = field(default_factory=list)
    _server: _Server | None = None

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture
def http_server():
    """Factory: `http_server(directory, ranges=True, truncate=False)` serves `directory` on
    127.0.0.1 (a free port) and returns an HttpServer with `.url`, `.requests` and `.stop()`.

    `ranges=False` is a plain `python -m http.server` (no Range support); `truncate=True` sends
    half of every body it declares. Every server is shut down at the end of the test."""
    servers: list[HttpServer] = []

    def serve(directory, ranges: bool = True, truncate: bool = False) -> HttpServer:
        handler = functools.partial(_Handler, directory=str(directory))
        srv = _Server(("127.0.0.1", 0), handler)
        srv.requests, srv.ranges, srv.truncate = [], ranges, truncate
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        server = HttpServer(f"http://127.0.0.1:{srv.server_address[1]}", srv.requests, srv)
        servers.append(server)
        return server

    yield serve
    for server in servers:
        server.stop()


# --- weights ----------------------------------------------------------------------------------


def random_state_dict(name: str, seed: int) -> dict[str, torch.Tensor]:
    """A named backbone's state dict in Meta's released key layout, every tensor random (norms,
    biases and LayerScale too), so that a tensor left unloaded cannot pass for a loaded one."""
    from model.backbone import build_backbone

    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in build_backbone(name).state_dict().items()}


@pytest.fixture(scope="session")
def vits14_state_dict() -> dict[str, torch.Tensor]:
    """A random dinov2_vits14 state dict in Meta's released key layout (do not mutate it)."""
    return random_state_dict("dinov2_vits14", seed=1234)


@pytest.fixture(scope="session")
def vits14_file(tmp_path_factory, vits14_state_dict) -> Path:
    """`vits14_state_dict` saved with torch.save, as Meta's dinov2_vits14_pretrain.pth is."""
    path = tmp_path_factory.mktemp("weights") / "dinov2_vits14_pretrain.pth"
    torch.save(vits14_state_dict, path)
    return path


# --- one local Ray for the whole session ------------------------------------------------------


@pytest.fixture(scope="session")
def ray_local():
    """Local Ray with 2 CPUs, started once; tests give their stages small CPU requests so the
    predictor actor never takes every CPU and starves the readers."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


# --- one real Label Studio for the whole session ----------------------------------------------


@pytest.fixture(scope="session")
def labelstudio(tmp_path_factory):
    """A running Label Studio (tests/labelstudio.py: installed once into its own virtualenv,
    started on a free loopback port); a Label Studio that cannot be installed or started fails
    the tests that use it, with the reason, and never skips them."""
    import labelstudio as ls

    try:
        server, reason = ls.start(tmp_path_factory.mktemp("labelstudio")), None
    except ls.Unavailable as e:
        server, reason = None, str(e)
    if reason:  # failed outside the except block: the reason once, not with its context again
        pytest.fail(reason, pytrace=False)
    yield server
    server.stop()
