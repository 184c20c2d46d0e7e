#!/usr/bin/env python3
"""Follow the digital twin over Server-Sent Events and resume after a disconnect.

Standard library only, so it runs anywhere (copy it next to a game engine bridge):

    python examples/follow_twin.py --url http://127.0.0.1:8000 --factory factory-1 [--token fa_...]

Prints one JSON line per message. On a dropped connection it reconnects with
``Last-Event-ID`` = the last twin version it saw, and the server sends exactly the
changes it missed (``change`` events from ``twin_history``), then the current twin
(``update``), then live updates; a client too far behind gets a ``snapshot``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request


def events(url: str, last_event_id: int | None, token: str | None, timeout: float = 60.0):
    """Yield (id, event, data) from one SSE connection until it drops."""
    req = urllib.request.Request(url, headers={"Accept": "text/event-stream"})
    if last_event_id is not None:
        req.add_header("Last-Event-ID", str(last_event_id))
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        fields: dict = {}
        for raw in resp:
            line = raw.decode("utf-8").rstrip("\r\n")
            if not line:
                if "data" in fields:
                    yield (int(fields["id"]) if "id" in fields else None, fields.get("event", "message"),
                           json.loads(fields["data"]))
                fields = {}
            elif not line.startswith(":"):  # ":" lines are keep-alive comments
                key, _, value = line.partition(":")
                fields[key] = value[1:] if value.startswith(" ") else value


def follow(base: str, factory: str, token: str | None = None, max_events: int | None = None, out=sys.stdout):
    url = f"{base.rstrip('/')}/api/factories/{factory}/twin/events"
    last_id: int | None = None
    seen = 0
    backoff = 1.0
    while max_events is None or seen < max_events:
        try:
            for event_id, event, data in events(url, last_id, token):
                if event_id is not None:
                    last_id = event_id  # resume point: the twin version
                print(json.dumps({"id": event_id, "event": event, "data": data}), file=out, flush=True)
                seen += 1
                backoff = 1.0
                if max_events is not None and seen >= max_events:
                    return last_id
        except (OSError, ValueError) as exc:
            print(f"# disconnected ({exc.__class__.__name__}); resuming from version {last_id} "
                  f"in {backoff:.0f}s", file=sys.stderr, flush=True)
            time.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
    return last_id


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--factory", default="factory-1")
    p.add_argument("--token", default=None)
    p.add_argument("--max-events", type=int, default=None)
    a = p.parse_args()
    try:
        follow(a.url, a.factory, a.token, a.max_events)
    except KeyboardInterrupt:
        pass
