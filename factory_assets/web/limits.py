"""ASGI middleware bounding what one HTTP request may cost before the app runs.

The body is read here, completely, under a size limit and a deadline, and then
handed to the application in one piece. So an application never waits on a
slow client, and a client that sends headers and then stalls (or trickles) is
answered 408 and disconnected after ``body_timeout`` seconds.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Awaitable, Callable

logger = logging.getLogger(__name__)
_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+

ErrorFactory = Callable[[int, str, str], tuple[bytes, list[tuple[bytes, bytes]]]]


def json_error(status: int, code: str, message: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The default error body: ``{"error": code, "message": message}``."""
    body = json.dumps({"error": code, "message": message}).encode()
    return body, [(b"content-type", b"application/json")]


class _BodyTooLarge(Exception):
    pass


class RequestLimits:
    """Wraps an ASGI app: 413 over ``max_body_bytes``, 408 when the body is not complete
    within ``body_timeout`` seconds. ``error`` builds the error response (status, code,
    message) -> (body, headers), so each app keeps its own error format."""

    def __init__(self, app, *, max_body_bytes: int, body_timeout: float = 30.0,
                 error: ErrorFactory = json_error, max_buffered_bytes: int | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.error = error
        # All bodies being received at once share this budget (None: no budget): without it, every
        # open connection may hold a body just under max_body_bytes. Beyond it, 503 at once.
        self.max_buffered_bytes = max_buffered_bytes
        self.buffered = 0  # bytes of bodies being received now (one event loop: no lock needed)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._reply(send, 413, "PayloadTooLarge",
                              f"request body of {declared} bytes is over the {self.max_body_bytes}-byte limit")
            return
        try:
            if _timeout is not None:  # no extra task per request (wait_for would create one)
                async with _timeout(self.body_timeout):
                    body = await self._read_body(receive)
            else:  # pragma: no cover - Python 3.10
                body = await asyncio.wait_for(self._read_body(receive), self.body_timeout)
        except _BodyTooLarge:
            await self._reply(send, 413, "PayloadTooLarge",
                              f"request body is over the {self.max_body_bytes}-byte limit")
            return
        except asyncio.TimeoutError:
            logger.info("request body not complete after %.0f s: answered 408", self.body_timeout)
            await self._reply(send, 408, "RequestTimeout",
                              f"request body not received within {self.body_timeout:g} s")
            return
        except _OverBudget:
            await self._reply(send, 503, "ServiceUnavailable",
                              "too many request bodies being received at once; retry shortly",
                              extra=[(b"retry-after", b"1")])
            return
        except _Disconnected:
            return
        delivered = False

        async def replay() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls: wait for http.disconnect as usual

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Callable[[], Awaitable[dict]]) -> bytes:
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _Disconnected()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise _BodyTooLarge()
                if self.max_buffered_bytes is not None and self.buffered + len(chunk) > self.max_buffered_bytes:
                    raise _OverBudget()
                self.buffered += len(chunk)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        finally:
            # received (the app holds it now, under its own bounds), refused, timed out or gone
            self.buffered -= sum(len(c) for c in chunks)

    async def _reply(self, send, status: int, code: str, message: str,
                     extra: list[tuple[bytes, bytes]] | None = None) -> None:
        body, headers = self.error(status, code, message)
        if extra:
            headers = headers + [h for h in extra if all(h[0] != name for name, _ in headers)]
        await send({"type": "http.response.start", "status": status,
                    "headers": headers + [(b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _Disconnected(Exception):
    pass


class _OverBudget(Exception):
    pass


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class ConcurrencyLimit:
    """Wraps an ASGI app: at most ``max_requests`` requests inside it at once; beyond,
    503 at once (with ``Retry-After: 1``) instead of queueing. Placed inside
    ``RequestLimits``, it counts only requests whose body has arrived, so slow
    uploads wait on their own deadline and never take a slot from working requests.
    (uvicorn's ``limit_concurrency`` stays the backstop on connections; its 503 is
    plain text, this one uses the app's ``error`` format.)"""

    def __init__(self, app, *, max_requests: int, error: ErrorFactory = json_error):
        if max_requests < 1:
            raise ValueError("max_requests must be at least 1")
        self.app = app
        self.max_requests = max_requests
        self.error = error
        self.active = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.active >= self.max_requests:
            body, headers = self.error(503, "ServiceUnavailable",
                                       f"over {self.max_requests} requests in progress; retry shortly")
            if not any(name == b"retry-after" for name, _ in headers):
                headers = headers + [(b"retry-after", b"1")]
            await send({"type": "http.response.start", "status": 503,
                        "headers": headers + [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        self.active += 1  # one event loop: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
