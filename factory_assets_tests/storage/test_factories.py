"""The fleet's ``factories`` collection: one small document per factory, written by the ingester
before it stores a factory's first documents, read instead of scanning messages or frames."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from factory_assets.storage.factories import (BUILT_MARKER, FactoryNotes, factories, factories_with_frames,
                                              known_factories)
from factory_assets.storage.frames import build_frame, insert_frames
from factory_assets_tests.fixtures.mongo import CommandRecorder, recorded_client
from factory_assets_tests.helpers import jpeg_bytes

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc)


@pytest.fixture
def watched(mongo_uri, database_name, fdb):
    listener = CommandRecorder()
    with recorded_client(mongo_uri, database_name, fdb, listener) as db:
        yield db, listener


def camera_message(i: int) -> bytes:
    import base64

    data = base64.b64encode(jpeg_bytes(seed=i, size=(32, 24))).decode()
    ts = (T0 + timedelta(seconds=i)).isoformat()
    return json.dumps({"ts": ts, "data": f"data:image/jpeg;base64,{data}"}).encode()


def stock_message(i: int) -> bytes:
    return json.dumps({"ts": (T0 + timedelta(seconds=i)).isoformat(), "stockItems": []}).encode()


def ingest(fdb, factory: str, n: int, start: int = 0, camera_id: str = "cam-1") -> None:
    from factory_assets.ingest.service import Ingestor

    ingestor = Ingestor(fdb, camera_id=camera_id)
    for i in range(start, start + n):
        received = T0 + timedelta(seconds=i)
        ingestor.handle_mqtt("i/cam", camera_message(i), {"kind": "mqtt", "topic": f"fleet/{factory}/i/cam"},
                             received_at=received, factory_id=factory)
        ingestor.handle_mqtt("f/i/stock", stock_message(i), {"kind": "mqtt", "topic": f"fleet/{factory}/f/i/stock"},
                             received_at=received, factory_id=factory)
        if i - start < 5:
            ingestor.flush()  # a few batches of one message each, then one batch of the rest
    ingestor.flush()


def test_the_ingester_records_each_factory_with_its_cameras_and_prefixes_before_storing_its_documents(watched):
    fdb, listener = watched
    listener.recording.set()
    ingest(fdb, "factory-2", 5)
    ingest(fdb, "factory-7", 1, camera_id="cam-9")
    listener.recording.clear()
    docs = {d["_id"]: d for d in factories(fdb).find()}
    assert sorted(docs) == ["factory-2", "factory-7"]
    assert docs["factory-2"]["cameras"] == ["cam-1"] and docs["factory-2"]["prefixes"] == ["fleet/factory-2/"]
    assert docs["factory-2"]["has_frames"] is True
    assert docs["factory-2"]["first_seen"] == T0 and docs["factory-2"]["last_seen"] == T0
    assert docs["factory-7"]["cameras"] == ["cam-9"]
    # five batches of factory-2 by one ingester: one write; the factory is written before its frames
    names = [(name, coll) for name, coll, _ in listener.sent if name in ("update", "insert")]
    assert names.count(("update", "factories")) == 2
    assert names.index(("update", "factories")) < names.index(("insert", fdb.names.frames))


def test_a_factorys_last_seen_moves_at_most_once_a_minute_and_a_new_camera_is_recorded_at_once(fdb):
    now = [0.0]
    notes = FactoryNotes(every_s=60, clock=lambda: now[0])
    assert notes.record(fdb, {"factory-3": (T0, {"cam-1"}, set())}) == 1
    now[0] = 30
    assert notes.record(fdb, {"factory-3": (T0 + timedelta(seconds=30), {"cam-1"}, set())}) == 0
    assert notes.record(fdb, {"factory-3": (T0 + timedelta(seconds=31), {"cam-2"}, set())}) == 1
    now[0] = 95
    assert notes.record(fdb, {"factory-3": (T0 + timedelta(seconds=95), {"cam-1"}, set())}) == 1
    doc = factories(fdb).find_one({"_id": "factory-3"})
    assert doc["cameras"] == ["cam-1", "cam-2"]
    assert (doc["first_seen"], doc["last_seen"]) == (T0, T0 + timedelta(seconds=95))


def test_listing_the_factories_reads_one_document_per_factory_whatever_the_history(watched):
    """executionStats on the real server: the same documents examined with 10 and 100 messages
    and frames per factory, and only the ``factories`` collection is read (after the database's
    first listing, which checks once whether it must be built)."""
    fdb, listener = watched

    def examined() -> tuple[list[str], int]:
        listener.clear()
        listener.recording.set()
        ids = known_factories(fdb)
        listener.recording.clear()
        reads = [(coll, c) for name, coll, c in listener.sent if name in ("find", "aggregate", "distinct")]
        assert {coll for coll, _ in reads} <= {"factories", fdb.names.counters}
        total = 0
        for _, c in reads:
            body = {k: c[k] for k in ("find", "filter", "projection") if k in c}
            total += fdb.db.command({"explain": body, "verbosity": "executionStats"})["executionStats"][
                "totalDocsExamined"]
        return ids, total

    ingest(fdb, "factory-1", 10)
    ingest(fdb, "factory-2", 10)
    known_factories(fdb)  # this database's first listing: the collection is found complete (built once)
    few = examined()
    ingest(fdb, "factory-1", 90, start=10)
    ingest(fdb, "factory-2", 90, start=10)
    many = examined()
    assert few == many == (["factory-1", "factory-2"], 2)


def test_a_database_from_before_the_collection_gets_it_built_once_from_what_is_stored(watched):
    fdb, listener = watched
    frames = [build_frame(jpeg_bytes(seed=i, size=(32, 24)), ts=T0 + timedelta(seconds=i), camera_id="cam-1",
                          factory_id=f, content_type="image/jpeg", width=32, height=24, source={"kind": "old"})
              for i, f in enumerate(["factory-4", "factory-5"])]
    insert_frames(fdb, frames)
    old = build_frame(jpeg_bytes(seed=9, size=(32, 24)), ts=T0, camera_id="cam-1", factory_id="x",
                      content_type="image/jpeg", width=32, height=24, source={"kind": "old"})
    old.pop("factory_id")
    fdb.frames.insert_one(old)  # a frame from before factories had ids: the default factory's
    fdb.mqtt.insert_one({"topic": "f/i/stock", "ts": T0, "factory_id": "factory-6", "message_id": "m",
                         "payload": {"stockItems": []}})
    listener.recording.set()
    assert known_factories(fdb) == ["factory-1", "factory-4", "factory-5", "factory-6"]
    assert factories_with_frames(fdb) == {"factory-1", "factory-4", "factory-5"}
    assert fdb.counters.find_one({"_id": BUILT_MARKER})["factories"] == 4
    listener.recording.clear()
    assert len([name for name, _, _ in listener.sent if name == "distinct"]) == 2  # once, not per call

    # another process (a fresh client) finds the marker: no distinct again
    listener.clear()
    from factory_assets.storage import factories as module

    module._built.clear()
    listener.recording.set()
    assert known_factories(fdb) == ["factory-1", "factory-4", "factory-5", "factory-6"]
    listener.recording.clear()
    assert not [name for name, _, _ in listener.sent if name == "distinct"]


def test_the_live_updater_lists_the_factories_from_the_collection_not_the_messages(watched):
    from factory_assets.twin.live import LiveTwinUpdater, known_factories as live_factories

    fdb, listener = watched
    ingest(fdb, "factory-2", 3)
    updater = LiveTwinUpdater(fdb, predictor=None, change_stream=False)
    live_factories(fdb)  # the database's first listing checks once whether the collection must be built
    listener.recording.set()
    assert updater.factories(now=1e9) == live_factories(fdb) == ["factory-1", "factory-2"]
    listener.recording.clear()
    assert not listener.on("find", fdb.names.mqtt) and not listener.on("find", fdb.names.frames)
