"""Fixtures for the twin API tests: the real app on a real uvicorn server, the embedded MongoDB."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

BASE_TS = datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc)
FILLS = ["RED", "BLUE", "WHITE", None]


def report(fdb, k: int, factory_id: str = "factory-1") -> None:
    """The controller's k-th stock report: a different rack each time, so each one is a change."""
    from factory_assets.twin.state import SLOTS, Reported
    from factory_assets.twin.store import apply_reported

    slots = {s: FILLS[(k + i) % len(FILLS)] if i < 1 + k % 8 else None for i, s in enumerate(SLOTS)}
    assert apply_reported(fdb, Reported(factory_id, BASE_TS + timedelta(seconds=k), slots, f"m{k}"))


@pytest.fixture
def api(fdb):
    """The twin API (reads open, no MQTT) with a twin at version 1."""
    from factory_assets.api.app import ApiSettings, TwinApiServer

    report(fdb, 0)
    # start() returns once the server accepts connections, which is after the twin reader's
    # first read: a test's first change is news to every stream, no further wait needed
    server = TwinApiServer(fdb, ApiSettings(keepalive=0.5)).start()
    assert server.hub.ready.is_set()
    yield server
    server.stop()


@pytest.fixture
def write_token(fdb):
    from factory_assets.api.tokens import create_token

    return create_token(fdb, "operator", "write")
