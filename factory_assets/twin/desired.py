"""The twin's ``desired`` state and the orders that realise it (pure MongoDB, no web, no MQTT).

``desired.stock`` holds target counts per colour (``{"red": 3}``: "three red pieces in
the rack"). A client changes it with the version it last saw (``If-Match``): the write
is a compare-and-swap on the twin's ``version``, so a stale client gets a conflict
instead of overwriting someone else's change (AWS IoT Device Shadow / Eclipse Ditto
semantics). Each unit the desired stock is above what the controller reports (and what
is already on order) becomes one order document, ``pending`` until a later ``f/i/stock``
report shows the count reached (then ``done``).
"""
from __future__ import annotations

import logging

from pymongo import ASCENDING
from pymongo.errors import DuplicateKeyError

from factory_assets.storage.frames import parse_ts
from factory_assets.twin.state import COLOURS, TYPE_TO_COLOUR
from factory_assets.vocabulary import utcnow

logger = logging.getLogger(__name__)

ORDERS_COLLECTION = "twin_orders"
RACK_SLOTS = 9
COLOUR_TO_TYPE = {c: t for t, c in TYPE_TO_COLOUR.items()}


class VersionConflict(Exception):
    """The twin is no longer at the version the client based its change on."""

    def __init__(self, current: int | None):
        super().__init__(f"the twin is at version {current}")
        self.current = current


class UnknownFactory(LookupError):
    pass


class DesiredInvalid(ValueError):
    pass


def orders(fdb):
    return fdb.db[ORDERS_COLLECTION]


def ensure_indexes(fdb) -> None:
    orders(fdb).create_index([("factory_id", ASCENDING), ("status", ASCENDING), ("created_at", ASCENDING)],
                             name="factory_status_created")
    # Resume from Last-Event-ID and history pages read twin_history by factory and version.
    fdb.twin_history.create_index([("factory_id", ASCENDING), ("version", ASCENDING)], name="factory_version")
    fdb.twin_history.create_index([("factory_id", ASCENDING), ("at", ASCENDING)], name="factory_at")


def reported_counts(twin: dict | None) -> dict:
    slots = (((twin or {}).get("reported") or {}).get("slots")) or {}
    counts = {c: 0 for c in COLOURS}
    for kind in slots.values():
        colour = TYPE_TO_COLOUR.get(str(kind).upper()) if kind else None
        if colour:
            counts[colour] += 1
    return counts


def pending_counts(fdb, factory_id: str) -> dict:
    counts = {c: 0 for c in COLOURS}
    for doc in orders(fdb).find({"factory_id": factory_id, "status": "pending"}, {"colour": 1}):
        counts[doc["colour"]] = counts.get(doc["colour"], 0) + 1
    return counts


def plan_orders(twin: dict, stock: dict, pending: dict) -> dict:
    """Colour -> how many orders the desired ``stock`` needs; raises ``DesiredInvalid``."""
    reported = reported_counts(twin)
    target = {c: reported[c] + pending.get(c, 0) for c in COLOURS}
    merged = {**target, **stock}
    if sum(merged.values()) > RACK_SLOTS:
        raise DesiredInvalid(f"the rack has {RACK_SLOTS} slots; desired stock {merged} needs {sum(merged.values())}")
    need = {}
    for colour, count in stock.items():
        if count < target[colour]:
            raise DesiredInvalid(f"desired {colour}={count} is below the {target[colour]} reported or on order; "
                                 "the factory can only be ordered to add workpieces")
        if count > target[colour]:
            need[colour] = count - target[colour]
    return need


def set_desired(fdb, factory_id: str, stock: dict, expected_version: int) -> tuple[dict, list[dict]]:
    """CAS ``desired.stock`` on ``expected_version``; creates the pending orders.

    Returns the new twin document and the orders created. Raises ``UnknownFactory``,
    ``VersionConflict`` or ``DesiredInvalid`` (and then changes nothing)."""
    twin = fdb.twin.find_one({"_id": factory_id})
    if twin is None:
        raise UnknownFactory(factory_id)
    if twin.get("version", 0) != expected_version:
        raise VersionConflict(twin.get("version", 0))
    need = plan_orders(twin, stock, pending_counts(fdb, factory_id))
    now = utcnow()
    desired = {**((twin.get("desired") or {}).get("stock") or {}), **stock}
    new_version = expected_version + 1
    result = fdb.twin.update_one(
        {"_id": factory_id, "version": expected_version},
        {"$set": {"desired": {"stock": desired, "updated_at": now}, "metadata.desired": {"ts": now},
                  "version": new_version, "history_version": new_version, "updated_at": now}})
    if result.modified_count != 1:
        current = (fdb.twin.find_one({"_id": factory_id}, {"version": 1}) or {}).get("version")
        raise VersionConflict(current)
    counts = reported_counts(twin)
    pending = pending_counts(fdb, factory_id)
    created = []
    for colour, n in need.items():
        for k in range(n):
            doc = {"_id": f"{factory_id}:{new_version}:{colour}:{k}", "factory_id": factory_id, "colour": colour,
                   "type": COLOUR_TO_TYPE[colour], "status": "pending", "created_at": now,
                   "twin_version": new_version, "target_count": counts[colour] + pending[colour] + k + 1,
                   "published_at": None, "done_at": None}
            try:
                orders(fdb).insert_one(doc)
            except DuplicateKeyError:  # the same version's orders: already recorded
                continue
            created.append(doc)
    fdb.twin_history.insert_one({"factory_id": factory_id, "version": new_version, "at": now, "kind": "desired",
                                 "changed": sorted(stock), "desired": desired,
                                 "orders": [o["_id"] for o in created], "delta": twin.get("delta", {})})
    twin = fdb.twin.find_one({"_id": factory_id})
    return twin, created


def mark_published(fdb, order_id: str) -> None:
    orders(fdb).update_one({"_id": order_id, "published_at": None}, {"$set": {"published_at": utcnow()}})


def reconcile_orders(fdb, twin: dict | None) -> list[str]:
    """Mark ``done`` the pending orders the controller's latest report shows; their ids."""
    if not twin or not twin.get("reported"):
        return []
    factory_id = twin["_id"]
    reported_ts = twin["reported"].get("ts")
    counts = reported_counts(twin)
    done = []
    for order in orders(fdb).find({"factory_id": factory_id, "status": "pending"}).sort("created_at", 1):
        # only a report made after the order can show it
        if reported_ts is None or parse_ts(reported_ts) <= parse_ts(order["created_at"]):
            continue
        if counts.get(order["colour"], 0) >= order["target_count"]:
            res = orders(fdb).update_one({"_id": order["_id"], "status": "pending"},
                                         {"$set": {"status": "done", "done_at": utcnow(),
                                                   "done_version": twin.get("version")}})
            if res.modified_count:
                done.append(order["_id"])
                logger.info("order %s done (reported %s=%d)", order["_id"], order["colour"], counts[order["colour"]])
    return done


def list_orders(fdb, factory_id: str, limit: int = 50) -> list[dict]:
    return list(orders(fdb).find({"factory_id": factory_id}).sort("created_at", -1).limit(limit))
