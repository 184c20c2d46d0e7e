"""The fleet's factories, one small document each (collection ``factories``).

``{_id: factory_id, first_seen, last_seen, has_frames, cameras: [...], prefixes: [...]}``: when the
platform first and last stored something of the factory (our clock, ``received_at``), whether a
frame of it was stored, the cameras its frames came from and the MQTT topic prefixes its
messages arrived under. The ingester upserts it
(:class:`FactoryNotes`) before it stores a batch: once per factory, camera and prefix per process,
then ``last_seen`` at most every :data:`LAST_SEEN_EVERY_S`. So "which factories are there?" is one
read of a collection with one document per factory (:func:`known_factories`), whatever the
history, instead of a scan over the messages or frames.

A database written before this collection existed (or by another tool) gets it built once from
the factory ids already stored (:func:`ensure_built`: a ``distinct`` over ``factory_camera`` and
``mqtt``, once per database, recorded in ``counters``; such documents have no times, cameras or
prefixes until the ingester next stores something of the factory).
"""
from __future__ import annotations

import logging
import threading
import time
from datetime import datetime

from factory_assets.vocabulary import DEFAULT_FACTORY_ID, utcnow

logger = logging.getLogger(__name__)

FACTORIES_COLLECTION = "factories"
BUILT_MARKER = "factories:built"  # in ``counters``: the collection was built from the stored data once
ID_INDEX = [("_id", 1)]
LAST_SEEN_EVERY_S = 60.0  # the ingester moves a factory's last_seen at most this often

_built: set[tuple[int, str, str]] = set()  # (client, database, counters) this process found built


def factories(fdb):
    return fdb.db[FACTORIES_COLLECTION]


def note_seen(fdb, factory_id: str, *, at: datetime | None = None, cameras=(), prefixes=(),
              first_seen: datetime | None = None) -> None:
    """Record that ``factory_id`` was heard at ``at`` (default now), with these cameras and topic
    prefixes (idempotent: one upsert by ``_id``; times only move outwards)."""
    at = at or utcnow()
    update: dict = {"$min": {"first_seen": first_seen or at}, "$max": {"last_seen": at}}
    sets = {k: {"$each": sorted({v for v in values if isinstance(v, str)})}
            for k, values in (("cameras", cameras), ("prefixes", prefixes)) if values}
    if sets:
        update["$addToSet"] = sets
    if cameras:
        update["$set"] = {"has_frames": True}
    factories(fdb).update_one({"_id": factory_id}, update, upsert=True)


def _stored_factory_ids(fdb, coll) -> set[str]:
    """Every factory id on a stored frame or message of ``coll`` (none: the default factory's): a
    ``distinct``, which MongoDB answers from the ``factory_*`` index's keys (no document, no image),
    and one look for documents without an id (the index's null keys)."""
    ids = {v if isinstance(v, str) and v else DEFAULT_FACTORY_ID for v in coll.distinct("factory_id")}
    if DEFAULT_FACTORY_ID not in ids and coll.find_one({"factory_id": None}, {"_id": 1}) is not None:
        ids.add(DEFAULT_FACTORY_ID)
    return ids


def ensure_built(fdb) -> None:
    """Build the collection from what is stored, once per database (a database with data from
    before the collection existed, or written by another tool): one document per factory id found
    on a frame (``has_frames``) or a message. Later calls: one lookup per process."""
    key = (id(fdb.db.client), fdb.db.name, fdb.names.counters)
    if key in _built:
        return
    if fdb.counters.find_one({"_id": BUILT_MARKER}, {"_id": 1}) is None:
        with_frames = _stored_factory_ids(fdb, fdb.frames)
        ids = with_frames | _stored_factory_ids(fdb, fdb.mqtt)
        for fid in sorted(ids):
            update: dict = {"$setOnInsert": {"built_from": "stored data"}}
            if fid in with_frames:
                update["$set"] = {"has_frames": True}
            factories(fdb).update_one({"_id": fid}, update, upsert=True)
        fdb.counters.update_one({"_id": BUILT_MARKER}, {"$set": {"at": utcnow(), "factories": len(ids)}},
                                upsert=True)
        if ids:
            logger.info("factories: built from the stored data once (%d factories)", len(ids))
    _built.add(key)


def known_factories(fdb) -> list[str]:
    """Every factory the platform has stored something of, sorted: one read of ``factories``
    (one small document per factory), whatever the history."""
    ensure_built(fdb)
    # the _id index, in order (a server may otherwise plan a collection scan of even this small collection)
    return sorted(d["_id"] for d in factories(fdb).find({}, {"_id": 1}).hint(ID_INDEX) if isinstance(d.get("_id"), str))


def factories_with_frames(fdb) -> set[str]:
    """The factories that sent a frame (``has_frames``): one read of ``factories``."""
    ensure_built(fdb)
    return {d["_id"] for d in factories(fdb).find({}, {"has_frames": 1}).hint(ID_INDEX) if d.get("has_frames")
            and isinstance(d.get("_id"), str)}


class FactoryNotes:
    """The ingester's side: which factories (cameras, prefixes) this process already recorded, so a
    batch costs a write only for something new, or a ``last_seen`` older than ``every_s``."""

    def __init__(self, every_s: float = LAST_SEEN_EVERY_S, clock=time.monotonic):
        self.every_s = every_s
        self.clock = clock
        self._lock = threading.Lock()
        self._noted: dict[str, tuple[float, set, set]] = {}  # factory -> (written at, cameras, prefixes)

    def due(self, seen: dict) -> dict:
        """The entries of ``seen`` (factory -> (at, cameras, prefixes)) worth a write now."""
        now = self.clock()
        with self._lock:
            out = {}
            for fid, (at, cameras, prefixes) in seen.items():
                known = self._noted.get(fid)
                if known is None or not cameras <= known[1] or not prefixes <= known[2] \
                        or now - known[0] >= self.every_s:
                    out[fid] = (at, cameras, prefixes)
            return out

    def record(self, fdb, seen: dict) -> int:
        """Upsert the factories of ``seen`` that are due (see :meth:`due`); returns how many were
        written. MongoDB errors propagate (the caller retries with its batch)."""
        due = self.due(seen)
        for fid, (at, cameras, prefixes) in sorted(due.items()):
            note_seen(fdb, fid, at=at, cameras=cameras, prefixes=prefixes)
            with self._lock:
                old = self._noted.get(fid, (0.0, set(), set()))
                self._noted[fid] = (self.clock(), old[1] | cameras, old[2] | prefixes)
        return len(due)
