"""The twin's ``desired`` state and the orders that realise it (pure MongoDB, no web, no MQTT).

``desired.stock`` holds target counts per colour (``{"red": 3}``: "three red pieces in
the rack"). A client changes it with the version it last saw (``If-Match``): the write
is a compare-and-swap on the twin's ``version``, so a stale client gets a conflict
instead of overwriting someone else's change (AWS IoT Device Shadow / Eclipse Ditto
semantics). Each unit the desired stock is above what the controller reports (and what
is already on order) becomes one order document, ``pending`` until a later ``f/i/stock``
report shows the count reached (then ``done``).

What is on order is part of the twin document (``on_order``: id, colour, target count),
added by the same compare-and-swap that sets ``desired``, so a writer chained on the new
version plans from it even before the order documents are stored; a done order is
pulled from it. The ``twin_orders`` documents (deterministic ids) are inserted after the
swap; ``restore_orders`` recreates any a crash left out.
"""
from __future__ import annotations

import logging
from datetime import timedelta

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
    # the publishers' sweep: pending orders of every factory, oldest first
    orders(fdb).create_index([("status", ASCENDING), ("created_at", ASCENDING)], name="status_created")
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


def _entry(order: dict) -> dict:
    """What the twin keeps of an order in ``on_order`` (enough to recreate its document)."""
    return {"id": order["_id"], "colour": order["colour"], "target_count": order["target_count"],
            "twin_version": order.get("twin_version"), "created_at": order["created_at"]}


def _document(factory_id: str, entry: dict) -> dict:
    return {"_id": entry["id"], "factory_id": factory_id, "colour": entry["colour"],
            "type": COLOUR_TO_TYPE[entry["colour"]], "status": "pending", "created_at": entry["created_at"],
            "twin_version": entry.get("twin_version"), "target_count": entry["target_count"],
            "published_at": None, "done_at": None}


def on_order(fdb, twin: dict) -> list[dict]:
    """The twin's open orders. Twins written before ``on_order`` existed: their pending orders."""
    if "on_order" in twin:
        return list(twin["on_order"] or [])
    return [_entry(o) for o in orders(fdb).find({"factory_id": twin["_id"], "status": "pending"})
            .sort("created_at", 1)]


def shows(twin: dict, entry: dict) -> bool:
    """Does the controller's report in ``twin`` show the order done (made after it, count reached)?"""
    reported_ts = ((twin or {}).get("reported") or {}).get("ts")
    if reported_ts is None or parse_ts(reported_ts) <= parse_ts(entry["created_at"]):
        return False  # only a report made after the order can show it
    return reported_counts(twin).get(entry["colour"], 0) >= entry["target_count"]


def pending_counts(twin: dict, open_orders: list[dict]) -> dict:
    """Per colour, the open orders the twin's report does not show done yet."""
    counts = {c: 0 for c in COLOURS}
    for entry in open_orders:
        if not shows(twin, entry):
            counts[entry["colour"]] = counts.get(entry["colour"], 0) + 1
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


def _store(fdb, factory_id: str, entries: list[dict]) -> int:
    """Insert the order documents of ``entries`` that do not exist yet; how many were inserted."""
    inserted = 0
    for entry in entries:
        try:
            orders(fdb).insert_one(_document(factory_id, entry))
            inserted += 1
        except DuplicateKeyError:  # already stored (a retry, or another process restored it)
            continue
    return inserted


def set_desired(fdb, factory_id: str, stock: dict, expected_version: int) -> tuple[dict, list[dict]]:
    """CAS ``desired.stock`` on ``expected_version``; creates the pending orders.

    The orders are planned from the same twin snapshot the swap checks, and recorded on the
    twin (``on_order``) by the swap itself: a writer chained on the new version sees them
    whether or not their documents are stored yet. The documents follow under deterministic
    ids; ``restore_orders`` recreates any a crash left out.

    Returns the new twin document and the orders this change placed. Raises ``UnknownFactory``,
    ``VersionConflict`` or ``DesiredInvalid`` (and then changes nothing)."""
    twin = fdb.twin.find_one({"_id": factory_id})
    if twin is None:
        raise UnknownFactory(factory_id)
    if twin.get("version", 0) != expected_version:
        raise VersionConflict(twin.get("version", 0))
    open_orders = on_order(fdb, twin)
    pending = pending_counts(twin, open_orders)
    need = plan_orders(twin, stock, pending)
    now = utcnow()
    desired = {**((twin.get("desired") or {}).get("stock") or {}), **stock}
    new_version = expected_version + 1
    counts = reported_counts(twin)
    placed = [{"id": f"{factory_id}:{new_version}:{colour}:{k}", "colour": colour,
               "target_count": counts[colour] + pending[colour] + k + 1, "twin_version": new_version,
               "created_at": now}
              for colour, n in need.items() for k in range(n)]
    fields = {"desired": {"stock": desired, "updated_at": now}, "metadata.desired": {"ts": now},
              "version": new_version, "history_version": new_version, "updated_at": now}
    query = {"_id": factory_id, "version": expected_version}
    if "on_order" in twin:
        update = {"$set": fields, "$push": {"on_order": {"$each": placed}}}
    else:  # the first change since on_order exists: it starts from the stored pending orders
        query["on_order"] = {"$exists": False}
        update = {"$set": {**fields, "on_order": open_orders + placed}}
    if fdb.twin.update_one(query, update).modified_count != 1:
        current = (fdb.twin.find_one({"_id": factory_id}, {"version": 1}) or {}).get("version")
        raise VersionConflict(current)
    if "on_order" not in twin:
        _store(fdb, factory_id, open_orders)  # a no-op unless an old pending order's document went missing
    _store(fdb, factory_id, placed)
    created = [_document(factory_id, e) for e in placed]
    fdb.twin_history.insert_one({"factory_id": factory_id, "version": new_version, "at": now, "kind": "desired",
                                 "changed": sorted(stock), "desired": desired,
                                 "orders": [e["id"] for e in placed], "delta": twin.get("delta", {})})
    twin = fdb.twin.find_one({"_id": factory_id})
    return twin, created


def restore_orders(fdb, twin: dict | None = None) -> int:
    """Store the documents of open orders the twin records but a crash left unwritten
    (between the swap and the inserts of ``set_desired``); how many. Idempotent."""
    twins = [twin] if twin is not None else fdb.twin.find({"on_order.0": {"$exists": True}}, {"on_order": 1})
    restored = 0
    for doc in twins:
        entries = doc.get("on_order") or []
        if not entries:
            continue
        stored = {o["_id"] for o in orders(fdb).find({"_id": {"$in": [e["id"] for e in entries]}}, {"_id": 1})}
        missing = [e for e in entries if e["id"] not in stored]
        if missing:
            n = _store(fdb, doc["_id"], missing)
            if n:
                logger.warning("twin %s: restored %d order(s) a crash left unstored: %s", doc["_id"], n,
                               ", ".join(e["id"] for e in missing))
            restored += n
    return restored


def claim_order(fdb, order_id: str, owner: str, lease_seconds: float) -> bool:
    """Take the right to publish a pending, unpublished order for ``lease_seconds`` (unless
    someone else holds an unexpired claim): two API processes never both send it."""
    now = utcnow()
    res = orders(fdb).update_one(
        {"_id": order_id, "status": "pending", "published_at": None,
         "$or": [{"claimed_until": None}, {"claimed_until": {"$lte": now}}]},
        {"$set": {"claimed_by": owner, "claimed_until": now + timedelta(seconds=lease_seconds)}})
    return res.modified_count == 1


def renew_claims(fdb, order_ids: list[str], owner: str, lease_seconds: float) -> None:
    """Extend this owner's claims on orders it sent and the broker has not acknowledged yet."""
    if order_ids:
        orders(fdb).update_many({"_id": {"$in": list(order_ids)}, "claimed_by": owner, "published_at": None},
                                {"$set": {"claimed_until": utcnow() + timedelta(seconds=lease_seconds)}})


def release_claim(fdb, order_id: str, owner: str) -> None:
    orders(fdb).update_one({"_id": order_id, "claimed_by": owner, "published_at": None},
                           {"$set": {"claimed_until": None}})


def unpublished_orders(fdb, factory_id: str | None = None, limit: int = 100) -> list[dict]:
    """Pending orders not published yet and not claimed by a live sender, oldest first."""
    query: dict = {"status": "pending", "published_at": None,
                   "$or": [{"claimed_until": None}, {"claimed_until": {"$lte": utcnow()}}]}
    if factory_id:
        query["factory_id"] = factory_id
    return list(orders(fdb).find(query).sort("created_at", 1).limit(limit))


def mark_published(fdb, order_id: str) -> bool:
    res = orders(fdb).update_one({"_id": order_id, "published_at": None}, {"$set": {"published_at": utcnow()}})
    return res.modified_count == 1


def reconcile_orders(fdb, twin: dict | None) -> list[str]:
    """Mark ``done`` the open orders the controller's latest report shows and remove them from
    the twin's ``on_order`` ($pull: idempotent, and never undoes a concurrent swap's additions);
    restore any open order's missing document first. The ids marked done now."""
    if not twin:
        return []
    factory_id = twin["_id"]
    restore_orders(fdb, twin)
    open_orders = on_order(fdb, twin)
    if not twin.get("reported"):
        return []
    counts = reported_counts(twin)
    done = []
    # marked done by an earlier call that stopped before its $pull: the report may no longer
    # show the count (a piece taken out since), so the entry would stay on order for good
    already = {d["_id"] for d in orders(fdb).find(
        {"_id": {"$in": [e["id"] for e in open_orders]}, "status": "done"}, {"_id": 1})} if open_orders else set()
    if already:
        fdb.twin.update_one({"_id": factory_id, "on_order": {"$exists": True}},
                            {"$pull": {"on_order": {"id": {"$in": sorted(already)}}}})
    for entry in sorted(open_orders, key=lambda e: parse_ts(e["created_at"])):
        if entry["id"] in already or not shows(twin, entry):
            continue
        res = orders(fdb).update_one({"_id": entry["id"], "status": "pending"},
                                     {"$set": {"status": "done", "done_at": utcnow(),
                                               "done_version": twin.get("version")}})
        if res.modified_count:
            done.append(entry["id"])
            logger.info("order %s done (reported %s=%d)", entry["id"], entry["colour"], counts[entry["colour"]])
        # after the status: a crash in between leaves the entry, and the next call pulls it
        fdb.twin.update_one({"_id": factory_id, "on_order": {"$exists": True}},
                            {"$pull": {"on_order": {"id": entry["id"]}}})
    return done


def list_orders(fdb, factory_id: str, limit: int = 50) -> list[dict]:
    return list(orders(fdb).find({"factory_id": factory_id}).sort("created_at", -1).limit(limit))
