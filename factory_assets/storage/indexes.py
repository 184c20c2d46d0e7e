"""Indexes, created idempotently (create_index is a no-op when one exists)."""
from __future__ import annotations

from pymongo import ASCENDING, DESCENDING

_done: set[tuple[int, str, str]] = set()


def ensure_indexes(fdb) -> None:
    key = (id(fdb.db.client), fdb.db.name, repr(fdb.names))
    if key in _done:
        return
    has_sha = {"sha256": {"$exists": True}}
    # One document per frame: duplicate deliveries (same camera, ts, bytes) collide here.
    fdb.frames.create_index([("camera_id", ASCENDING), ("ts", ASCENDING), ("sha256", ASCENDING)],
                            unique=True, partialFilterExpression=has_sha, name="frame_identity")
    # The never-skipping read cursor (see storage/frames.py).
    # sparse rather than partial: some servers (SecantusDB) only plan range scans on sparse ones
    fdb.frames.create_index([("seq", ASCENDING)], unique=True, sparse=True, name="frame_seq")
    fdb.frames.create_index([("ts", ASCENDING)], name="frame_ts")
    fdb.sensors.create_index([("topic", ASCENDING), ("ts", DESCENDING)], name="topic_ts")
    fdb.mqtt.create_index([("topic", ASCENDING), ("ts", DESCENDING)], name="topic_ts")
    fdb.mqtt.create_index([("message_id", ASCENDING)], unique=True, sparse=True, name="message_id")
    fdb.sensors.create_index([("message_id", ASCENDING)], unique=True, sparse=True, name="message_id")
    fdb.quarantine.create_index([("fingerprint", ASCENDING)], unique=True, sparse=True, name="fingerprint")
    fdb.quarantine.create_index([("received_at", DESCENDING)], name="received_at")
    _done.add(key)
