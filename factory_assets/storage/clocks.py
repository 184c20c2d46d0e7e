"""Each factory's clock, as estimated from its messages (collection ``factory_clocks``).

The TXT controller sets its clock by NTP only at boot and drifts; the ``ts`` it writes is in
its own clock, ``received_at`` in ours. ``offset_s`` is *factory clock minus our clock*
(positive: the controller is ahead), estimated by the ingester from recent messages
(``ts - received_at``, robustly: see ``ingest.clock``) and written here at most every few
seconds. Orders are stamped in the factory's clock (``factory_now``), so the controller's
10 s acceptance window holds with a drifted controller.

One document per factory: ``{_id: factory_id, offset_s, samples, spread_s, updated_at}``.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

CLOCKS_COLLECTION = "factory_clocks"


def clocks(fdb):
    return fdb.db[CLOCKS_COLLECTION]


def record_offset(fdb, factory_id: str, offset_s: float, *, samples: int, spread_s: float | None = None,
                  at: datetime | None = None) -> None:
    """Store the current estimate for ``factory_id`` (idempotent upsert by factory)."""
    at = at or datetime.now(timezone.utc)
    clocks(fdb).update_one({"_id": factory_id},
                           {"$set": {"offset_s": float(offset_s), "samples": int(samples),
                                     "spread_s": None if spread_s is None else float(spread_s),
                                     "updated_at": at}}, upsert=True)


def clock_offset(fdb, factory_id: str) -> float | None:
    """Factory clock minus ours, in seconds; None before any estimate."""
    doc = clocks(fdb).find_one({"_id": factory_id}, {"offset_s": 1})
    return None if doc is None else doc.get("offset_s")


def clock_info(fdb, factory_id: str) -> dict | None:
    doc = clocks(fdb).find_one({"_id": factory_id})
    if doc is not None:
        doc.pop("_id", None)
    return doc


def factory_now(fdb, factory_id: str, now: datetime | None = None) -> datetime:
    """Now in the factory's clock (ours when no estimate exists yet)."""
    now = now or datetime.now(timezone.utc)
    offset = clock_offset(fdb, factory_id)
    return now + timedelta(seconds=offset or 0.0)


UPDATED_AT_INDEX = [("updated_at", 1)]


def clocks_updated_since(fdb, after: datetime) -> list[dict]:
    """The estimates written after ``after`` (``{_id: factory_id, offset_s, ..., updated_at}``): a
    range of the ``updated_at`` index, hinted, so a look costs the estimates that moved. Fleet-wide
    on purpose ("whose clock moved?"), hence not led by ``factory_id``."""
    return list(clocks(fdb).find({"updated_at": {"$gt": after}}).hint(UPDATED_AT_INDEX))
