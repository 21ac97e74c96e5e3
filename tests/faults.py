"""A fault-injecting S3 proxy for tests: a threaded HTTP server on 127.0.0.1 that forwards every
request to a (moto) S3 endpoint and fails a seeded fraction of them, per operation class:

    list    GET of a bucket (?list-type=2, ?prefix=...)
    read    GET / HEAD of an object
    write   PUT / POST (PutObject, multipart uploads, CopyObject)
    delete  DELETE, POST ?delete

A failed request gets one of the configured faults:

    503     503 SlowDown with S3's XML error body
    500     500 InternalError with S3's XML error body
    reset   the connection closed without an answer (RST), the request never forwarded
    cut     the real answer with its full Content-Length, but only half of the body (a request
            whose answer has no body to cut, a PUT's or a HEAD's, is answered as it is)
    stall   no answer for `stall_s` (past the client's read timeout), then closed, the request
            never forwarded
    lost    the request forwarded and applied at the store, then the connection reset instead
            of the answer: the client retries a write that has already landed
    late    the request forwarded and applied, then no answer for `stall_s`, then closed

`outage(seconds)` refuses every connection for a while (the listening socket is closed, as when an
endpoint is briefly unreachable: botocore's EndpointConnectionError); `outage_at(op, n, seconds)`
starts one when the n-th request of an operation arrives. `injected` counts the faults actually
applied, per (operation, fault), and `applied` lists them with their method and path. Nothing
here reaches the network.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import random
import socket
import struct
import threading
import time
from collections import Counter
from urllib.parse import parse_qs, urlsplit

FAULTS = ("503", "500", "reset", "cut", "stall", "lost", "late")
APPLIED = ("lost", "late")  # the faults that forward the request before failing it
ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
    "<RequestId>fault</RequestId></Error>"
)


def operation(method: str, target: str) -> str:
    """The operation class of a request: list, read, write or delete."""
    parts = urlsplit(target)
    query = parse_qs(parts.query, keep_blank_values=True)
    path = parts.path.strip("/")
    if method == "DELETE" or (method == "POST" and "delete" in query):
        return "delete"
    if method in ("PUT", "POST"):
        return "write"
    if "/" not in path or "list-type" in query:  # the bucket itself: a listing (or a bucket HEAD)
        return "list"
    return "read"


class FaultProxy:
    """`FaultProxy(target_url, seed)`; `.url` is the proxy's endpoint. Set `rates` (operation ->
    fraction of requests that fail) and `faults` (the kinds to draw from) at any time (`set`)."""

    def __init__(self, target: str, seed: int = 0, stall_s: float = 2.0):
        t = urlsplit(target)
        self.target = (t.hostname, t.port)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.rates: dict[str, float] = {}
        self.faults: tuple[str, ...] = FAULTS
        self.stall_s = stall_s
        self.only: tuple[str, ...] = ()
        self.once = False
        self._seen: set[tuple] = set()  # with `once`: the requests already failed once
        self._trigger: tuple[str, int, float, str] | None = None  # outage_at's (op, n, seconds, only)
        self.injected: Counter = Counter()  # (operation, fault) -> how many were applied
        self.applied: list[tuple[str, str, str, str]] = []  # (operation, fault, method, path) of each
        self.requests: Counter = Counter()  # operation -> how many
        self.outages = 0  # how many outages began
        self._server = None
        self._port = 0
        self.down_until = 0.0  # during an outage, connections kept alive are dropped too
        self._start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def storage_options(self, timeout_s: float = 1.0) -> dict:
        """s3fs options for this endpoint, with small timeouts so a stall costs about a second."""
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.url},
            "config_kwargs": {"connect_timeout": timeout_s, "read_timeout": timeout_s},
        }

    def set(
        self,
        rates: dict[str, float] | None = None,
        faults: tuple[str, ...] | None = None,
        only: str | tuple[str, ...] = (),
        once: bool = False,
    ) -> None:
        """Fail `rates[op]` of each operation's requests with one of `faults`; with `only` (a
        string or several), just the requests whose path contains one (e.g. '/out/masks/sub/');
        with `once`, each request (method, target and body) at most once, so that the client's
        retry of it goes through."""
        with self.lock:
            self.rates = dict(rates or {})
            self.only = (only,) if isinstance(only, str) and only else tuple(only)
            self.once = once
            self._seen.clear()
            if faults is not None:
                self.faults = tuple(faults)

    def draw(self, op: str, path: str = "", request: tuple = ()) -> str | None:
        """The fault for this request, if any (counted once the handler applies it)."""
        with self.lock:
            self.requests[op] += 1
            if self._trigger and self._trigger[0] == op and self._trigger[3] in path:
                _, n, seconds, only = self._trigger
                self._trigger = (op, n - 1, seconds, only) if n > 1 else None
                if n <= 1:
                    self._outage(seconds)
                    return "outage"
            if self.only and not any(part in path for part in self.only):
                return None
            if self.once and request in self._seen:
                return None
            if self.rng.random() < self.rates.get(op, 0.0):
                if self.once:
                    self._seen.add(request)
                return self.rng.choice(self.faults)
        return None

    def clear(self) -> None:
        """A new tally: no requests, faults or outages counted yet."""
        with self.lock:
            self.injected.clear()
            self.applied.clear()
            self.requests.clear()
            self.outages = 0

    def count(self, op: str, fault: str, method: str, path: str) -> None:
        with self.lock:
            self.injected[op, fault] += 1
            self.applied.append((op, fault, method, path))

    def outage(self, seconds: float) -> None:
        """Refuse connections for `seconds` (from now, in the background)."""
        with self.lock:
            self._outage(seconds)

    def outage_at(self, op: str, n: int, seconds: float, only: str = "") -> None:
        """Begin an outage of `seconds` when the n-th request of `op` (whose path contains `only`)
        arrives from now on; that request is refused too."""
        with self.lock:
            self._trigger = (op, n, seconds, only)

    def _outage(self, seconds: float) -> None:  # under self.lock
        self.outages += 1
        self.down_until = time.monotonic() + seconds
        server = self._server

        def down_and_back():
            server.shutdown()  # waits for the accept loop to stop: not on a handler's thread
            server.server_close()
            time.sleep(max(self.down_until - time.monotonic(), 0.0))
            for _ in range(50):  # the same port again, as an endpoint that comes back
                try:
                    return self._start(self._port)
                except OSError:
                    time.sleep(0.1)

        threading.Thread(target=down_and_back, daemon=True).start()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _start(self, port: int = 0) -> None:
        proxy = self

        class Handler(_Forward):
            owner = proxy

        server = _Server(("127.0.0.1", port), Handler)
        server.daemon_threads = True
        self._server, self._port = server, server.server_address[1]
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()  # an outage stops it at once


class _Server(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True

    def handle_error(self, request, client_address):  # a connection reset on purpose is no error
        pass


class _Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def log_message(self, *args):  # quiet
        pass

    def handle_error(self, *args):  # clients hanging up on a fault are expected
        pass

    def do_GET(self):
        self._forward()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _forward(self):
        op = operation(self.command, self.path)
        body = self._body()
        owner = self.owner
        if time.monotonic() < owner.down_until:  # a connection kept alive across an outage
            owner.count(op, "outage", self.command, self.path)
            return self._reset()
        fault = owner.draw(op, self.path, (self.command, self.path, hashlib.sha256(body).hexdigest()))
        if fault not in (None, "cut"):  # a cut is counted only where there is a body to cut
            owner.count(op, fault, self.command, self.path)
        if fault == "outage":
            return self._reset()
        if fault in ("503", "500"):
            code, message = (
                ("SlowDown", "Please reduce your request rate.")
                if fault == "503"
                else ("InternalError", "We encountered an internal error.")
            )
            return self._answer(int(fault), ERROR_BODY.format(code=code, message=message).encode(), "application/xml")
        if fault == "reset":
            return self._reset()
        if fault == "stall":
            time.sleep(owner.stall_s)
            return self._reset()
        headers = {
            k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "expect", "connection")
        }
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*owner.target, timeout=30)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status, reply = resp.status, resp.getheaders()
        finally:
            conn.close()
        if fault in APPLIED:  # the store has done it; the client never hears so
            if fault == "late":
                time.sleep(owner.stall_s)
            return self._reset()
        self.send_response(status)
        for k, v in reply:
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                self.send_header(k, v)
        length = (
            {k.lower(): v for k, v in reply}.get("content-length", "0") if self.command == "HEAD" else str(len(data))
        )
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault == "cut" and len(data) > 1:
            owner.count(op, fault, self.command, self.path)
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            return self._reset()
        self.wfile.write(data)

    def _answer(self, status: int, data: bytes, content_type: str):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _reset(self):
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close_connection = True
        try:
            self.connection.close()
        except OSError:
            pass
