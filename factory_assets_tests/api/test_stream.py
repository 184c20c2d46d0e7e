"""The live stream: SSE with Last-Event-ID resume, WebSocket, one database reader."""
from __future__ import annotations

import json
import threading

import httpx
import pytest

from factory_assets_tests.api.conftest import report


class SseReader:
    """A real SSE client on a thread: parses events until told to disconnect."""

    def __init__(self, url: str, last_event_id: int | None = None):
        self.url = url
        self.headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
        self.events: list[dict] = []
        self.comments = 0
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with httpx.stream("GET", self.url, headers=self.headers, timeout=30) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            event: dict = {}
            for line in r.iter_lines():
                if self.stop.is_set():
                    return  # leaving the with-block closes the connection: a forced disconnect
                if line.startswith(":"):
                    with self.cond:
                        self.comments += 1
                        self.cond.notify_all()
                elif line == "":
                    if "data" in event:
                        with self.cond:
                            self.events.append({"id": int(event["id"]) if "id" in event else None, "event": event["event"],
                                                "data": json.loads(event["data"])})
                            self.cond.notify_all()
                    event = {}
                elif ":" in line:
                    k, _, v = line.partition(":")
                    event[k] = v[1:] if v.startswith(" ") else v

    def start(self):
        self.thread.start()
        return self

    def wait(self, predicate, timeout=20.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self), timeout)

    def disconnect(self):
        self.stop.set()
        self.thread.join(timeout=30)


def history_versions(event: dict) -> list[int]:
    d = event["data"]
    if d["type"] == "change":
        return [d["change"]["version"]]
    return [c["version"] for c in d.get("changes", [])]


def test_a_new_client_gets_a_snapshot_then_every_change_with_keep_alives(api, fdb):
    url = f"{api.url}/api/factories/factory-1/twin/events"
    sse = SseReader(url).start()
    assert sse.wait(lambda s: s.events)
    assert sse.events[0]["event"] == "snapshot" and sse.events[0]["id"] == 1
    assert sse.events[0]["data"]["twin"]["version"] == 1
    for k in range(1, 4):
        report(fdb, k)
    assert sse.wait(lambda s: s.events[-1]["id"] == 4)
    assert [e["id"] for e in sse.events] == sorted({e["id"] for e in sse.events})
    assert sorted(v for e in sse.events[1:] for v in history_versions(e)) == [2, 3, 4]
    assert sse.wait(lambda s: s.comments >= 1)  # keep-alive comments (0.5 s in this fixture)
    sse.disconnect()


def test_sse_resume_with_last_event_id_after_a_forced_disconnect_has_no_gap_and_no_duplicate(api, fdb):
    url = f"{api.url}/api/factories/factory-1/twin/events"
    first = SseReader(url).start()
    assert first.wait(lambda s: s.events)
    writer_done = threading.Event()

    def writer():  # the twin keeps changing while the client is away
        for k in range(1, 41):
            report(fdb, k)
        writer_done.set()

    t = threading.Thread(target=writer)
    t.start()
    assert first.wait(lambda s: s.events[-1]["id"] >= 10)
    first.disconnect()
    last_id = first.events[-1]["id"]
    second = SseReader(url, last_event_id=last_id).start()
    t.join()
    assert writer_done.is_set()
    assert second.wait(lambda s: s.events and s.events[-1]["id"] == 41)
    second.disconnect()
    assert second.events[0]["event"] in ("change", "update")  # a replay, not a snapshot
    ids = [e["id"] for e in first.events + second.events]
    assert ids == sorted(set(ids)), "event ids strictly increase across the reconnection"
    delivered = [v for e in first.events[1:] + second.events for v in history_versions(e)]
    stored = [h["version"] for h in fdb.twin_history.find({"factory_id": "factory-1", "version": {"$gt": 1}}).sort("version", 1)]
    assert delivered == stored == list(range(2, 42))


def test_a_client_far_behind_gets_a_snapshot_first(api, fdb, monkeypatch):
    from factory_assets.api import hub

    monkeypatch.setattr(hub, "MAX_REPLAY", 3)  # "far behind" = more than 3 changes missed
    for k in range(1, 6):
        report(fdb, k)
    sse = SseReader(f"{api.url}/api/factories/factory-1/twin/events", last_event_id=1).start()
    assert sse.wait(lambda s: s.events)
    sse.disconnect()
    assert sse.events[0]["event"] == "snapshot" and sse.events[0]["id"] == 6


def test_many_subscribers_share_one_database_reader(api, fdb):
    readers = [SseReader(f"{api.url}/api/factories/factory-1/twin/events").start() for _ in range(20)]
    for r in readers:
        assert r.wait(lambda s: s.events)
    assert api.hub.stats.subscribers == 20
    events_before = api.hub.stats.events
    report(fdb, 1)
    for r in readers:
        assert r.wait(lambda s: s.events[-1]["id"] == 2)
        r.disconnect()
    assert api.hub.stats.events == events_before + 1  # one read of the change, twenty deliveries


@pytest.mark.parametrize("change_streams", [True, False], ids=["change-stream", "indexed-poll"])
def test_the_reader_follows_the_twin_by_change_stream_or_by_poll(fdb, change_streams):
    from factory_assets.api.app import ApiSettings, TwinApiServer

    report(fdb, 0)
    with TwinApiServer(fdb, ApiSettings(change_streams=change_streams, keepalive=0.5)) as api:
        sse = SseReader(f"{api.url}/api/factories/factory-1/twin/events").start()
        assert sse.wait(lambda s: s.events)
        report(fdb, 1)
        assert sse.wait(lambda s: s.events[-1]["id"] == 2)
        sse.disconnect()
        assert api.hub.stats.mode == ("change-stream" if change_streams else "poll")


def test_websocket_sends_a_snapshot_then_changes_and_resumes_with_since(api, fdb):
    from websockets.sync.client import connect

    ws_url = api.url.replace("http://", "ws://") + "/api/factories/factory-1/twin/ws"
    with connect(ws_url) as ws:
        first = json.loads(ws.recv(timeout=20))
        assert first["type"] == "snapshot" and first["version"] == 1
        report(fdb, 1)
        msg = json.loads(ws.recv(timeout=20))
        while msg["type"] == "keep-alive":
            msg = json.loads(ws.recv(timeout=20))
        assert msg["type"] == "update" and msg["version"] == 2 and msg["twin"]["version"] == 2
        assert [c["version"] for c in msg["changes"]] == [2]
    report(fdb, 2)
    report(fdb, 3)
    with connect(ws_url + "?since=2") as ws:
        got = [json.loads(ws.recv(timeout=20)) for _ in range(2)]
    assert [(m["type"], m["version"]) for m in got] == [("change", 3), ("update", 4)]


def test_websocket_refuses_an_unknown_factory_with_a_json_error(api):
    from websockets.sync.client import connect

    with connect(api.url.replace("http://", "ws://") + "/api/factories/nope/twin/ws") as ws:
        msg = json.loads(ws.recv(timeout=20))
    assert msg == {"type": "error", "error": "UnknownFactory", "message": msg["message"]}


def test_a_change_while_the_reader_starts_reaches_a_client_that_connected_at_once(fdb, monkeypatch):
    from factory_assets.api import hub as hub_module
    from factory_assets.api.app import ApiSettings, TwinApiServer

    report(fdb, 0)
    go = threading.Event()
    real_prime = hub_module.TwinHub._prime

    def slow_first_read(self):  # the reader's first read of the twins, held until the test lets it go
        assert go.wait(60)
        real_prime(self)

    monkeypatch.setattr(hub_module.TwinHub, "_prime", slow_first_read)
    server = TwinApiServer(fdb, ApiSettings(keepalive=0.5))
    started, waiting = threading.Event(), threading.Event()

    real_wait_ready = hub_module.TwinHub.wait_ready

    async def noting_wait_ready(self, timeout):  # notes that the server's startup waits for the reader
        waiting.set()
        return await real_wait_ready(self, timeout)

    monkeypatch.setattr(hub_module.TwinHub, "wait_ready", noting_wait_ready)
    url = f"{server.url}/api/factories/factory-1/twin/events"

    def start():
        server.start()
        started.set()
        waiting.set()

    starter = threading.Thread(target=start)
    starter.start()
    early = None
    try:
        assert waiting.wait(60)
        if started.is_set():  # the server answers before its reader's first read: a client connects now
            early = SseReader(url).start()
            assert early.wait(lambda s: s.events) and early.events[0]["id"] == 1
        report(fdb, 1)  # lands after that client's catch-up read, before the reader's first read
        go.set()
        starter.join(60)
        assert started.is_set()
        sse = early or SseReader(url).start()
        report(fdb, 2)
        assert sse.wait(lambda s: s.events and s.events[-1]["id"] == 3)
        sse.disconnect()
        first = sse.events[0]["id"]
        assert [v for e in sse.events[1:] for v in history_versions(e)] == list(range(first + 1, 4))
    finally:
        go.set()
        starter.join(60)
        server.stop()


def test_streams_waiting_for_the_readers_first_read_hold_no_worker_thread(fdb):
    # during a startup outage every early client waited in a worker thread, starving catch-up reads
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from factory_assets.api.hub import TwinHub

    hub = TwinHub(fdb)  # not started: its first read has not happened

    async def main():
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=1))
        waits = [asyncio.create_task(hub.wait_ready(60)) for _ in range(20)]
        await asyncio.sleep(0)  # one turn of the loop: every waiter is registered
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 10) == "free"  # the one worker is free
        await asyncio.to_thread(hub._set_ready)  # the reader's first read, from another thread
        assert await asyncio.gather(*waits) == [True] * 20

    asyncio.run(main())
