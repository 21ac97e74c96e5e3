"""A loopback HTTP file server that records each request's path and headers, for tests of which
credentials reach which host (`with serve(folder) as server: ... server.seen`)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from dataclasses import dataclass, field


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _record(self):
        self.server.seen.append((self.path, dict(self.headers.items())))

    def do_GET(self):
        self._record()
        super().do_GET()

    def do_HEAD(self):
        self._record()
        super().do_HEAD()


@dataclass
class Server:
    url: str
    seen: list = field(default_factory=list)  # (path, {header: value}) per request

    def headers(self, name: str) -> set:
        """The values of header `name` this server was sent (None: a request without it)."""
        return {h.get(name) for _, h in self.seen}


@contextlib.contextmanager
def serve(directory):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(directory)))
    srv.daemon_threads = True
    srv.seen = []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield Server(f"http://127.0.0.1:{srv.server_address[1]}", srv.seen)
    finally:
        srv.shutdown()
        srv.server_close()
