"""Waiting for a deployment: the inference server follows the ``endpoints`` document
and reports the version it serves in ``/ping``'s ``X-Model-Version`` header."""
from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request

logger = logging.getLogger(__name__)


class ServerUnreachable(ConnectionError):
    """The inference server did not answer ``/ping`` at all."""


def ping_version(url: str, timeout: float = 2.0) -> tuple[int, str | None]:
    """``(status, X-Model-Version)`` of the server's ``/ping``; ``ServerUnreachable`` when it does not answer."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/ping", timeout=timeout) as resp:  # noqa: S310 - http(s) URL
            return resp.status, resp.headers.get("X-Model-Version")
    except urllib.error.HTTPError as exc:  # 503 without a model: an answer, not an outage
        return exc.code, exc.headers.get("X-Model-Version") if exc.headers else None
    except (urllib.error.URLError, OSError) as exc:
        raise ServerUnreachable(f"the inference server at {url} cannot be reached "
                                f"({getattr(exc, 'reason', exc).__class__.__name__})") from exc


def wait_for_served_version(url: str, version: str, timeout: float, poll_seconds: float = 0.25) -> str | None:
    """Poll ``/ping`` until the server serves ``version``; returns the last version seen
    (``version`` on success). ``ServerUnreachable`` when the server does not answer."""
    deadline = time.monotonic() + timeout
    seen = None
    while True:
        status, reported = ping_version(url)
        seen = reported or seen
        if status == 200 and seen == version:
            return seen
        if time.monotonic() >= deadline:
            return seen
        time.sleep(poll_seconds)  # polling an external server, not waiting for a test to settle
