"""Ray Serve: an HTTP service from a plain service object, its model calls batched across
concurrent requests. Ray is imported inside the functions.

The service (built in each replica by `make(arg)`, so the model loads once per replica) answers
    reply(method, path, body) -> (status, JSON) | None      None: a request for the model, which goes
    prepare(body) -> pending     (blocking I/O: read + decode; runs in a thread)
    segment(rows) -> rows        (one model batch: the rows of every request waiting, @serve.batch)
    finish(pending, rows) -> (status, JSON)
Errors a user causes (DinosegError) answer 400 with {"error": message}; anything else 500: the
server never goes down for a request.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable

from model.errors import DinosegError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 9090
    replicas: int = 1
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0
    max_batch_size: int = 8
    batch_wait_s: float = 0.05
    name: str = "dinoseg"


def _ingress(options: ServeOptions):
    import asyncio
    import json

    from ray import serve
    from starlette.responses import JSONResponse

    @serve.deployment(name=options.name)
    class Ingress:
        def __init__(self, make: Callable[[Any], Any], arg: Any):
            self.service = make(arg)

        @serve.batch(max_batch_size=options.max_batch_size, batch_wait_timeout_s=options.batch_wait_s)
        async def _segment(self, rows: list) -> list:
            return await asyncio.to_thread(self.service.segment, rows)

        async def __call__(self, request):
            method, path = request.method, request.url.path
            try:
                body = None
                if method == "POST":
                    raw = await request.body()
                    try:
                        body = json.loads(raw) if raw else {}
                    except ValueError as e:
                        raise DinosegError(f"the body of {method} {path} is not JSON ({e}).") from None
                    if not isinstance(body, dict):
                        raise DinosegError(f"the body of {method} {path} must be a JSON object.")
                answer = self.service.reply(method, path, body)
                if answer is None:
                    pending = await asyncio.to_thread(self.service.prepare, body)
                    rows = await asyncio.gather(*(self._segment(row) for row in pending.rows))
                    answer = await asyncio.to_thread(self.service.finish, pending, list(rows))
            except DinosegError as e:
                log.warning("%s %s: %s", method, path, e)
                answer = 400, {"error": str(e)}
            except Exception as e:  # a bug or a broken model must not take the server down
                log.exception("%s %s failed", method, path)
                answer = 500, {"error": f"{type(e).__name__}: {e}"}
            status, payload = answer
            return JSONResponse(payload, status_code=status)

    return Ingress


def serve_http(
    make: Callable[[Any], Any], arg: Any, options: ServeOptions, on_ready: Callable[[str], None] | None = None
) -> None:
    """Run the service on Ray Serve at http://host:port/ until SIGINT or SIGTERM, then shut it
    down. Ray must be started (`start_ray`); the caller stops it."""
    from ray import serve

    app = _ingress(options).options(
        num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": options.num_gpus},
        # room for the requests one batch gathers (Serve's default is 5 per replica)
        max_ongoing_requests=max(16, 2 * options.max_batch_size),
    )
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    deployed = False
    try:
        _quiet_serve_logger()
        try:
            serve.start(http_options={"host": options.host, "port": options.port})
        except Exception as e:  # the proxy could not listen: a port in use, an address not this machine's
            cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise DinosegError(
                f"Ray Serve cannot listen on {options.host}:{options.port} ({cause}): pass another --port, or a "
                "--host of this machine."
            ) from None
        _quiet_serve_logger()  # serve.start may have given it a console handler again
        try:
            serve.run(app.bind(make, arg), name=options.name, route_prefix="/")
            deployed = True
        except RuntimeError as e:  # a replica that cannot start (no GPU where one was asked for...)
            raise DinosegError(f"the {options.name} service did not start: {e}") from None
        if on_ready:
            on_ready(f"http://{options.host}:{options.port}")
        while not stop.wait(0.5):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if deployed:
            # only this application: Serve itself (and other applications on a cluster) stays,
            # and an embedded Ray takes it along when it stops
            serve.delete(options.name)


def _quiet_serve_logger() -> None:
    """Serve's driver logger writes INFO lines to the console; at the default verbosity they go
    to the run's log file instead (`pipeline.runtime.console`), as Ray Data's do."""
    from pipeline.runtime import console

    if not console.is_verbose():
        console.to_our_handlers("ray.serve")
