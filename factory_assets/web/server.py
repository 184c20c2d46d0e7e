"""Run an ASGI app on uvicorn: in the foreground (CLI; SIGTERM/SIGINT shut down
gracefully) or on a background thread (tests, embedding), on 127.0.0.1 by default.

Port 0 picks a free port; the socket is bound before uvicorn starts, so ``url``
is known as soon as ``start()`` returns and no request can race the bind.
"""
from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on what clients can make the server hold."""

    limit_concurrency: int = 64          # connections + tasks; uvicorn answers 503 beyond
    timeout_keep_alive: float = 5.0      # idle keep-alive connections closed after this
    timeout_graceful_shutdown: float = 30.0  # SIGTERM: in-flight requests get this long (SageMaker: 30 s)
    backlog: int = 128
    max_incomplete_event_size: int = 16 * 1024  # bound on request line + headers (h11)
    # A connection must send complete request headers within this after it opens or after its last
    # response, else it is closed (uvicorn has no such deadline: a client that connects and sends
    # nothing, or half its headers, would hold a connection slot for ever). None: no deadline.
    header_timeout: float | None = 10.0


class WebServer:
    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *,
                 limits: ServerLimits = ServerLimits(), log_level: str = "warning", access_log: bool = False,
                 overload_error=None):
        """``overload_error(status, code, message) -> (body, headers)`` formats the 503 answered beyond
        ``limit_concurrency`` (default ``json_error``), so it matches the app's other errors."""
        self.app = app
        self.overload_error = overload_error
        self.host = host
        self.requested_port = port
        self.limits = limits
        self.log_level = log_level
        self.access_log = access_log
        self._sock: socket.socket | None = None
        self._server = None
        self._thread: threading.Thread | None = None

    # -- setup -------------------------------------------------------------------
    def bind(self) -> socket.socket:
        if self._sock is None:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.requested_port))
            sock.listen(self.limits.backlog)
            sock.set_inheritable(True)
            self._sock = sock
        return self._sock

    @property
    def port(self) -> int:
        return self.bind().getsockname()[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _uvicorn(self):
        import uvicorn

        config = uvicorn.Config(
            self.app, log_level=self.log_level, access_log=self.access_log, lifespan="auto", log_config=None,
            http=_http_protocol(self.limits.header_timeout, self.overload_error),
            limit_concurrency=self.limits.limit_concurrency,
            timeout_keep_alive=int(max(1, self.limits.timeout_keep_alive)),
            timeout_graceful_shutdown=int(self.limits.timeout_graceful_shutdown),
            h11_max_incomplete_event_size=self.limits.max_incomplete_event_size,
            backlog=self.limits.backlog, server_header=False, date_header=True)
        return uvicorn.Server(config)

    # -- foreground ----------------------------------------------------------------
    def run(self) -> None:
        """Serve until SIGINT/SIGTERM (then drain in-flight requests)."""
        sock = self.bind()
        self._server = self._uvicorn()
        logger.info("listening on %s", self.url)
        self._server.run(sockets=[sock])

    # -- background thread -----------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "WebServer":
        sock = self.bind()
        self._server = self._uvicorn()
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name=f"web-{self.port}", daemon=True)
        self._thread.start()
        import time

        deadline = time.monotonic() + timeout
        pause = threading.Event()
        # uvicorn sets ``started`` once it accepts connections; it exposes no event, so poll briefly
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            pause.wait(0.01)
        if not self._server.started:
            raise RuntimeError(f"server on {self.url} failed to start")
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (bounded), close the socket."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else self.limits.timeout_graceful_shutdown + 5)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "WebServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _http_protocol(header_timeout: float | None, overload_error=None):
    """uvicorn's httptools protocol with a deadline for request headers and the 503 beyond
    ``limit_concurrency`` in the app's error format ("auto", uvicorn's own, without httptools)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - h11 only: uvicorn's own behaviour
        return "auto"
    from factory_assets.web.limits import json_error

    error = overload_error or json_error

    async def overloaded(scope, receive, send) -> None:
        body, headers = error(503, "ServiceUnavailable", "too many connections; retry shortly")
        if not any(name == b"retry-after" for name, _ in headers):
            headers = headers + [(b"retry-after", b"1")]
        await send({"type": "http.response.start", "status": 503,
                    "headers": headers + [(b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    class BoundedProtocol(HttpToolsProtocol):
        _headers_seen = 0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # the bound is checked here, so uvicorn's own check (plain-text 503) never fires
            self._limit, self.limit_concurrency = self.limit_concurrency, None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_headers_complete(self) -> None:
            self._headers_seen += 1
            if self._limit is not None and (len(self.connections) >= self._limit or len(self.tasks) >= self._limit):
                logger.warning("over %d connections or requests: answered 503", self._limit)
                app, self.app = self.app, overloaded
                try:
                    super().on_headers_complete()
                finally:
                    self.app = app
            else:
                super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            if header_timeout is not None:
                self.loop.call_later(header_timeout, self._header_deadline, self._headers_seen)

        def _header_deadline(self, seen: int) -> None:
            # no request headers completed since the deadline was armed: idle or a slow-header client
            if self._headers_seen == seen and not self.transport.is_closing():
                logger.info("no complete request headers within %.0f s: connection closed", header_timeout)
                self.transport.close()

    return BoundedProtocol
