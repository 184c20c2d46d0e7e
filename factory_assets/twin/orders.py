"""Orders that ship a workpiece out of the warehouse, as the factory's controller knows them
(pure MongoDB: no web, no MQTT; the API's dispatcher publishes what this module decides).

The controller takes ``f/o/order`` ``{"ts", "type"}``: it accepts the order only when ``type``
is ``BLUE``, ``RED`` or ``WHITE`` and ``ts`` is within 10 s of its own clock, then fetches one
piece of that colour from the high-bay warehouse and delivers it to the output (the stock
falls by one). It works on one order at a time and publishes the progress on ``f/i/order``
``{ts, state, type}``: ``ORDERED`` -> ``IN_PROCESS`` -> ``SHIPPED`` -> ``WAITING_FOR_ORDER``.
It has no order id: a second message within the window ships a second piece.

Our orders (collection ``twin_orders``) have the states

* ``queued``: stored, waiting for the factory to be ready;
* ``sent``: published (``attempts``: each with a fresh ``ts`` in the factory's clock), not
  acknowledged yet; re-sent (fresh ``ts``) after ``ack_timeout_s`` while unacknowledged;
* ``ordered``, ``in_process``, ``shipped``: as the controller's ``f/i/order`` says;
* ``failed`` with a ``reason``: the factory never acknowledged it (``max_attempts`` sends),
  the warehouse reported a fault (``f/i/state/hbw`` with an error code) while it was in work,
  or the factory went back to ``WAITING_FOR_ORDER`` without shipping it.

Placing orders is a compare-and-swap on the twin's ``version`` (as every twin write is):
the availability check (reported stock minus what is on order) and the new entries of the
twin's ``orders`` list happen in one atomic update, so two requests racing for the last red
piece place one order. The order documents follow under deterministic ids; a crash in
between is repaired from the twin (``restore_orders``).

The states follow what the ingester stored of the factory's messages (collection ``mqtt``:
``f/i/order`` and ``f/i/state/hbw``), read per factory by a cursor kept in ``order_dispatch``
(one document per factory: the cursor, the factory's last order state, the order in work,
and the lease of the API process that dispatches it): a restarted API resumes where it
stopped. ``current`` in that document is the one order in work; it is set by a conditional
update, so two API processes never both start an order.
"""
from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from pymongo import ASCENDING
from pymongo.errors import DuplicateKeyError

from factory_assets.storage.clocks import factory_now
from factory_assets.vocabulary import (COLOUR_TO_TYPE, COLOURS, ORDER_STATE_TOPIC, STATION_CODES,
                                       STATION_ERROR_CODES, STATION_STATE_PREFIX, TYPE_TO_COLOUR, TYPES,
                                       utcnow)

logger = logging.getLogger(__name__)

ORDERS_COLLECTION = "twin_orders"
DISPATCH_COLLECTION = "order_dispatch"
HBW_STATE_TOPIC = STATION_STATE_PREFIX + "hbw"
FOLLOWED_TOPICS = (ORDER_STATE_TOPIC, HBW_STATE_TOPIC)

STATES = ("queued", "sent", "ordered", "in_process", "shipped", "failed")
ON_ORDER = ("queued", "sent", "ordered")  # still to leave the reported stock (see available_counts)
LIVE = ("queued", "sent", "ordered", "in_process")  # shown on the twin
FINAL = ("shipped", "failed")
MAX_RETRIES = 50
BATCH = 500


@dataclass(frozen=True)
class OrderRules:
    """How long and how often an unacknowledged order is sent, and how messages are matched."""

    ack_timeout_s: float = 15.0  # no ORDERED this long after a send: send again (fresh ts)
    max_attempts: int = 3  # sends the broker took without an ORDERED: then failed
    ack_slack_s: float = 1.0  # a message received this much before our send still counts (clocks)
    shipped_grace_s: float = 30.0  # SHIPPED and no WAITING_FOR_ORDER this long: ready anyway
    lease_s: float = 30.0  # an API process dispatches a factory's orders for this long, renewed


class UnknownFactory(LookupError):
    pass


class VersionConflict(Exception):
    """The twin is no longer at the version the client based its change on."""

    def __init__(self, current: int | None):
        super().__init__(f"the twin is at version {current}")
        self.current = current


class NoStock(Exception):
    """The reported stock minus what is on order holds no piece of a colour asked for."""

    def __init__(self, message: str, short: dict | None = None):
        super().__init__(message)
        self.short = short or {}


class IdempotencyConflict(Exception):
    """An ``Idempotency-Key`` already placed an order of another type."""


@dataclass(frozen=True)
class Send:
    """One send the dispatcher recorded and must now publish (store, then act)."""

    order_id: str
    factory_id: str
    attempt: int
    payload: dict  # {"ts", "type"}: exactly what the controller reads


# -- collections and indexes --------------------------------------------------------------------

def orders(fdb):
    return fdb.db[ORDERS_COLLECTION]


def dispatch(fdb):
    return fdb.db[DISPATCH_COLLECTION]


LEGACY_REASON = ("placed by an earlier version of the platform that ordered pieces INTO the warehouse; "
                 "never sent under the controller's rules")


def ensure_indexes(fdb) -> None:
    """Indexes, and the one-time retirement of orders placed under the earlier rules. Idempotent."""
    orders(fdb).create_index([("factory_id", ASCENDING), ("state", ASCENDING), ("seq", ASCENDING),
                              ("idx", ASCENDING)], name="factory_state_seq")
    orders(fdb).create_index([("state", ASCENDING), ("factory_id", ASCENDING)], name="state_factory")
    orders(fdb).create_index([("factory_id", ASCENDING), ("seq", ASCENDING)], name="factory_seq")
    # the dispatcher's cursor over what the ingester stored: a factory's order and warehouse states
    fdb.mqtt.create_index([("factory_id", ASCENDING), ("topic", ASCENDING), ("_id", ASCENDING)],
                          name="factory_topic_id")
    fdb.twin_history.create_index([("factory_id", ASCENDING), ("version", ASCENDING)], name="factory_version")
    fdb.twin_history.create_index([("factory_id", ASCENDING), ("at", ASCENDING)], name="factory_at")
    retired = orders(fdb).update_many({"state": {"$exists": False}},
                                      {"$set": {"state": "failed", "reason": LEGACY_REASON}}).modified_count
    fdb.twin.update_many({"on_order": {"$exists": True}}, {"$unset": {"on_order": ""}})
    if retired:
        logger.warning("retired %d order(s) placed under the earlier rules (pieces ordered in)", retired)


# -- counting ---------------------------------------------------------------------------------

def reported_counts(twin: dict | None) -> dict:
    slots = (((twin or {}).get("reported") or {}).get("slots")) or {}
    counts = {c: 0 for c in COLOURS}
    for kind in slots.values():
        colour = TYPE_TO_COLOUR.get(str(kind).upper()) if kind else None
        if colour:
            counts[colour] += 1
    return counts


def on_order_counts(twin: dict | None) -> dict:
    """Per colour, the twin's orders whose piece is still in the reported stock.

    ``queued``/``sent``/``ordered`` count; from ``in_process`` on they do not: the warehouse
    fetched the piece (and reported the lower stock) before the controller says IN_PROCESS.
    Between that report and IN_PROCESS the piece counts twice: a request may be refused for
    those seconds, never accepted for a piece that is not there."""
    counts = {c: 0 for c in COLOURS}
    for entry in (twin or {}).get("orders") or []:
        if entry.get("state") in ON_ORDER and entry.get("colour") in counts:
            counts[entry["colour"]] += 1
    return counts


def available_counts(twin: dict | None) -> dict:
    reported, ordered = reported_counts(twin), on_order_counts(twin)
    return {c: max(reported[c] - ordered[c], 0) for c in COLOURS}


# -- placing ----------------------------------------------------------------------------------

def key_order_id(factory_id: str, key: str) -> str:
    """The one order an ``Idempotency-Key`` places for a factory (a retry finds it by id)."""
    return f"{factory_id}:key:{hashlib.sha256(key.encode()).hexdigest()[:24]}"


def _entry(order_id: str, kind: str, now: datetime, seq: int, idx: int) -> dict:
    return {"id": order_id, "type": kind, "colour": TYPE_TO_COLOUR[kind], "state": "queued",
            "created_at": now, "seq": seq, "idx": idx}


def _document(factory_id: str, entry: dict, *, source: str, key: str | None) -> dict:
    doc = {"_id": entry["id"], "factory_id": factory_id, "type": entry["type"], "colour": entry["colour"],
           "state": "queued", "seq": entry["seq"], "idx": entry["idx"], "created_at": entry["created_at"],
           "updated_at": entry["created_at"], "source": source, "attempt_count": 0, "attempts": [],
           "events": [{"state": "queued", "at": entry["created_at"]}]}
    if key is not None:
        doc["idempotency_key"] = key
    return doc


def _store(fdb, factory_id: str, entries: list[dict], *, source: str = "api", key: str | None = None) -> int:
    inserted = 0
    for entry in entries:
        try:
            orders(fdb).insert_one(_document(factory_id, entry, source=source, key=key))
            inserted += 1
        except DuplicateKeyError:  # stored already (a retry, or restored by another process)
            continue
    return inserted


def _no_stock_message(factory_id: str, twin: dict, short: dict) -> str:
    reported, ordered = reported_counts(twin), on_order_counts(twin)
    parts = [f"no {c} piece to ship: the controller reports {reported[c]} {c} in the rack and "
             f"{ordered[c]} {'is' if ordered[c] == 1 else 'are'} already on order" for c in short]
    return "; ".join(parts) + ". Pieces come in at the input station."


def place_orders(fdb, factory_id: str, types: list[str], *, key: str | None = None,
                 expected_version: int | None = None, desired: dict | None = None,
                 source: str = "api") -> tuple[dict, list[dict], bool]:
    """Place one order per entry of ``types`` (``"RED"``...) in one compare-and-swap on the twin.

    ``key`` (an ``Idempotency-Key``) makes a retry return the order it placed (replayed=True)
    instead of placing another; the same key with another type raises ``IdempotencyConflict``.
    ``expected_version`` (``If-Match``) raises ``VersionConflict`` when the twin moved; without
    it a concurrent change of the twin is retried. ``desired`` is recorded as ``desired.stock``
    by the same update. Raises ``UnknownFactory`` (no twin), ``NoStock``. Returns the twin
    after the change, the orders (documents) and whether this was a replay."""
    bad = [t for t in types if t not in TYPES]
    if bad:
        raise ValueError(f"unknown workpiece type(s) {bad}; the controller knows {list(TYPES)}")
    if key is not None and len(types) != 1:
        raise ValueError("an Idempotency-Key places exactly one order")
    key_id = key_order_id(factory_id, key) if key is not None else None
    for _ in range(MAX_RETRIES):
        if key_id is not None:
            placed = orders(fdb).find_one({"_id": key_id})
            if placed is not None:
                return _replay(fdb, factory_id, placed, types)
        twin = fdb.twin.find_one({"_id": factory_id})
        if twin is None:
            raise UnknownFactory(factory_id)
        version = twin.get("version", 0)
        if expected_version is not None and version != expected_version:
            raise VersionConflict(version)
        entries = list(twin.get("orders") or [])
        if key_id is not None and any(e.get("id") == key_id for e in entries):
            restore_orders(fdb, twin)  # placed by a request that died before storing the document
            continue
        if not types and desired is None:
            return twin, [], False
        if not (twin.get("reported") or {}).get("slots") and types:
            raise NoStock(f"factory {factory_id!r} has reported no stock yet (f/i/stock): nothing to ship")
        need = Counter(TYPE_TO_COLOUR[t] for t in types)
        available = available_counts(twin)
        short = {c: n for c, n in need.items() if n > available[c]}
        if short:
            raise NoStock(_no_stock_message(factory_id, twin, short), short)
        now = utcnow()
        new_version = version + 1
        placed_entries = [_entry(key_id if key_id is not None else f"{factory_id}:{new_version}:{i}", t, now,
                                 new_version, i) for i, t in enumerate(types)]
        fields = {"orders": entries + placed_entries, "version": new_version, "history_version": new_version,
                  "updated_at": now}
        if desired is not None:
            merged = {**((twin.get("desired") or {}).get("stock") or {}), **desired}
            fields["desired"] = {"stock": merged, "updated_at": now}
            fields["metadata.desired"] = {"ts": now}
        update: dict = {"$set": fields}
        if "on_order" in twin:
            update["$unset"] = {"on_order": ""}
        if fdb.twin.update_one({"_id": factory_id, "version": version}, update).modified_count != 1:
            if expected_version is not None:
                current = (fdb.twin.find_one({"_id": factory_id}, {"version": 1}) or {}).get("version")
                raise VersionConflict(current)
            continue  # another writer moved the twin: decide again on fresh state
        _store(fdb, factory_id, placed_entries, source=source, key=key)
        summary = [{"id": e["id"], "type": e["type"], "state": "queued"} for e in placed_entries]
        history = {"factory_id": factory_id, "version": new_version, "at": now,
                   "kind": "desired" if desired is not None else "order",
                   "changed": [e["id"] for e in placed_entries], "orders": summary, "delta": twin.get("delta", {})}
        if desired is not None:
            history["desired"] = fields["desired"]["stock"]
        fdb.twin_history.insert_one(history)
        docs = list(orders(fdb).find({"_id": {"$in": [e["id"] for e in placed_entries]}}).sort("idx", 1))
        return fdb.twin.find_one({"_id": factory_id}), docs, False
    raise RuntimeError(f"twin {factory_id}: too much write contention to place an order")


def _replay(fdb, factory_id: str, placed: dict, types: list[str]):
    if [placed["type"]] != list(types):
        raise IdempotencyConflict(f"this Idempotency-Key already placed order {placed['_id']} for "
                                  f"{placed['type']}, not {', '.join(types)}; use a new key for a new order")
    return fdb.twin.find_one({"_id": factory_id}), [placed], True


def restore_orders(fdb, twin: dict | None = None) -> int:
    """Store the documents of orders a twin records but a crash left unwritten (between the
    swap and the inserts of ``place_orders``); how many. Idempotent."""
    twins = [twin] if twin is not None else fdb.twin.find({"orders.0": {"$exists": True}}, {"orders": 1})
    restored = 0
    for doc in twins:
        entries = doc.get("orders") or []
        if not entries:
            continue
        stored = {o["_id"] for o in orders(fdb).find({"_id": {"$in": [e["id"] for e in entries]}}, {"_id": 1})}
        missing = [e for e in entries if e["id"] not in stored]
        # an entry leaves "queued" only once its document exists; a keyed order's id still finds it
        restored += _store(fdb, doc["_id"], missing, source="restored")
        if missing:
            logger.warning("twin %s: restored %d order(s) a crash left unstored: %s", doc["_id"], len(missing),
                           ", ".join(e["id"] for e in missing))
    return restored


def list_orders(fdb, factory_id: str, limit: int = 50) -> list[dict]:
    return list(orders(fdb).find({"factory_id": factory_id}, {"events": 0})
                .sort([("seq", -1), ("idx", -1)]).limit(limit))


def get_order(fdb, factory_id: str, order_id: str) -> dict | None:
    return orders(fdb).find_one({"_id": order_id, "factory_id": factory_id})


# -- the twin's view of the orders in work ------------------------------------------------------

def sync_twin(fdb, factory_id: str) -> bool:
    """Bring the twin's ``orders`` list in line with the order documents (states, reasons; an
    order that is shipped or failed leaves it), as one versioned change with its history entry
    (``kind: "order"``), so live clients see every state. True when the twin changed."""
    for _ in range(MAX_RETRIES):
        twin = fdb.twin.find_one({"_id": factory_id}, {"orders": 1, "version": 1, "delta": 1})
        entries = list((twin or {}).get("orders") or [])
        if not entries:
            return False
        docs = {d["_id"]: d for d in orders(fdb).find({"_id": {"$in": [e["id"] for e in entries]}},
                                                     {"state": 1, "reason": 1})}
        kept, changed = [], []
        for entry in entries:
            doc = docs.get(entry["id"])
            if doc is None:  # not stored yet (restore_orders writes it): keep as is
                kept.append(entry)
                continue
            state, reason = doc.get("state"), doc.get("reason")
            if state != entry.get("state") or reason != entry.get("reason"):
                changed.append({"id": entry["id"], "type": entry["type"], "state": state,
                                **({"reason": reason} if reason else {})})
            if state not in FINAL:
                kept.append({**entry, "state": state, **({"reason": reason} if reason else {})})
        if not changed:
            return False
        version = twin.get("version", 0)
        now = utcnow()
        res = fdb.twin.update_one({"_id": factory_id, "version": version},
                                  {"$set": {"orders": kept, "version": version + 1, "history_version": version + 1,
                                            "updated_at": now}})
        if res.modified_count != 1:
            continue
        fdb.twin_history.insert_one({"factory_id": factory_id, "version": version + 1, "at": now, "kind": "order",
                                     "changed": [c["id"] for c in changed], "orders": changed,
                                     "delta": twin.get("delta", {})})
        return True
    raise RuntimeError(f"twin {factory_id}: too much write contention to record order states")


# -- following the factory's messages -------------------------------------------------------------

def _aware(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def _snapshot(msg: dict) -> dict:
    payload = msg.get("payload") if isinstance(msg.get("payload"), dict) else {}
    out = {"received_at": _aware(msg.get("received_at")) or msg["_id"].generation_time, "ts": msg.get("ts"),
           "message_id": msg.get("message_id")}
    if msg.get("topic") == ORDER_STATE_TOPIC:
        out.update(state=payload.get("state"), type=payload.get("type"))
    else:
        out.update(code=payload.get("code"), description=payload.get("description"), active=payload.get("active"))
    return out


def _newest(fdb, factory_id: str, topic: str) -> dict | None:
    return fdb.mqtt.find_one({"factory_id": factory_id, "topic": topic}, sort=[("_id", -1)])


def dispatch_state(fdb, factory_id: str) -> dict:
    """The factory's dispatch document, created on first use at the newest stored messages
    (what happened before this platform's first order there is history, not news)."""
    doc = dispatch(fdb).find_one({"_id": factory_id})
    if doc is not None:
        return doc
    doc = {"_id": factory_id, "cursor": None, "factory_order": None, "hbw": None, "current": None,
           "owner": None, "lease_until": None, "created_at": utcnow()}
    doc.update(_fast_forward_fields(fdb, factory_id, None))
    try:
        dispatch(fdb).insert_one(doc)
    except DuplicateKeyError:
        pass
    return dispatch(fdb).find_one({"_id": factory_id})


def _fast_forward_fields(fdb, factory_id: str, cursor) -> dict:
    newest_order, newest_hbw = _newest(fdb, factory_id, ORDER_STATE_TOPIC), _newest(fdb, factory_id, HBW_STATE_TOPIC)
    ids = [m["_id"] for m in (newest_order, newest_hbw) if m is not None]
    if not ids or (cursor is not None and max(ids) <= cursor):
        return {}
    out: dict = {"cursor": max(ids)}
    if newest_order is not None:
        out["factory_order"] = _snapshot(newest_order)
    if newest_hbw is not None:
        out["hbw"] = _snapshot(newest_hbw)
    return out


def claim_factory(fdb, factory_id: str, owner: str, rules: OrderRules, now: datetime | None = None) -> bool:
    """Take (or renew) the right to dispatch ``factory_id``'s orders for ``rules.lease_s``: one
    API process follows a factory at a time; a dead one's lease expires."""
    now = now or utcnow()
    dispatch_state(fdb, factory_id)
    res = dispatch(fdb).update_one(
        {"_id": factory_id, "$or": [{"owner": owner}, {"owner": None}, {"lease_until": None},
                                    {"lease_until": {"$lte": now}}]},
        {"$set": {"owner": owner, "lease_until": now + timedelta(seconds=rules.lease_s)}})
    return res.matched_count == 1


def release_factory(fdb, factory_id: str, owner: str) -> None:
    dispatch(fdb).update_one({"_id": factory_id, "owner": owner}, {"$set": {"owner": None, "lease_until": None}})


def _move(fdb, order: dict, to: str, at: datetime, *, msg: dict | None = None, reason: str | None = None,
          note: str | None = None) -> dict:
    """A conditional state change (only from the state ``order`` is in): idempotent, and a
    second process applying the same message changes nothing."""
    sets: dict = {"state": to, f"{to}_at": at, "updated_at": utcnow()}
    if reason:
        sets["reason"] = reason
    event = {"state": to, "at": at}
    if msg is not None:
        event.update(ts=msg.get("ts"), message_id=msg.get("message_id"))
    if note:
        event["note"] = note
    res = orders(fdb).update_one({"_id": order["_id"], "state": order["state"]},
                                 {"$set": sets, "$push": {"events": event}})
    if res.modified_count:
        logger.info("order %s (%s): %s -> %s%s", order["_id"], order["type"], order["state"], to,
                    f" ({reason or note})" if (reason or note) else "")
    return orders(fdb).find_one({"_id": order["_id"]}) or order


def _station_fault(code, description) -> str:
    meaning = STATION_CODES.get(code, "error") if isinstance(code, int) else "error"
    said = f": {description}" if description else ""
    return f"the high-bay warehouse reported a fault (f/i/state/hbw code {code}, {meaning}{said})"


def _apply(fdb, order: dict, msg: dict, rules: OrderRules) -> dict:
    """What one stored controller message means for the order in work."""
    if order.get("state") not in ("sent", "ordered", "in_process"):
        return order
    received = _aware(msg.get("received_at")) or msg["_id"].generation_time
    first = _aware(order.get("first_sent_at"))
    if first is None or received < first - timedelta(seconds=rules.ack_slack_s):
        return order  # said before we sent this order: not about it
    payload = msg.get("payload") if isinstance(msg.get("payload"), dict) else {}
    state, kind = order["state"], order["type"]
    if msg.get("topic") == HBW_STATE_TOPIC:
        code = payload.get("code")
        if isinstance(code, int) and code in STATION_ERROR_CODES:
            return _move(fdb, order, "failed", received, msg=msg,
                         reason=_station_fault(code, payload.get("description")))
        return order
    said, said_type = payload.get("state"), payload.get("type")
    if said == "ORDERED" and said_type == kind and state == "sent":
        return _move(fdb, order, "ordered", received, msg=msg)
    if said == "IN_PROCESS" and (state == "ordered" or (state == "sent" and said_type == kind)):
        note = None if said_type == kind else f"the controller says IN_PROCESS {said_type}"
        return _move(fdb, order, "in_process", received, msg=msg, note=note or (
            "acknowledged by IN_PROCESS (no ORDERED stored)" if state == "sent" else None))
    if said == "SHIPPED" and (state in ("ordered", "in_process") or (state == "sent" and said_type == kind)):
        return _move(fdb, order, "shipped", received, msg=msg)
    if said == "WAITING_FOR_ORDER" and state == "in_process":
        return _move(fdb, order, "shipped", received, msg=msg,
                     note="no SHIPPED stored; the factory went back to WAITING_FOR_ORDER after IN_PROCESS")
    if said == "WAITING_FOR_ORDER" and state == "ordered":
        return _move(fdb, order, "failed", received, msg=msg,
                     reason="the factory went back to WAITING_FOR_ORDER without processing the order "
                            "(restarted, or the order was dropped)")
    return order


def follow(fdb, factory_id: str, rules: OrderRules | None = None, *, max_batches: int = 20) -> dict:
    """Read the factory's stored ``f/i/order`` and ``f/i/state/hbw`` messages after the cursor,
    move the order in work accordingly, and advance the cursor; the dispatch document after.

    With no order in work only the newest state matters: the cursor jumps to it."""
    rules = rules or OrderRules()
    state = dispatch_state(fdb, factory_id)
    current = orders(fdb).find_one({"_id": state["current"]}) if state.get("current") else None
    if current is None or current.get("state") in FINAL:
        fields = _fast_forward_fields(fdb, factory_id, state.get("cursor"))
        if state.get("current") is not None:
            fields["current"] = None
        if fields:
            dispatch(fdb).update_one({"_id": factory_id}, {"$set": fields})
            state.update(fields)
        return state
    for _ in range(max_batches):
        query: dict = {"factory_id": factory_id, "topic": {"$in": list(FOLLOWED_TOPICS)}}
        if state.get("cursor") is not None:
            query["_id"] = {"$gt": state["cursor"]}
        batch = list(fdb.mqtt.find(query).sort("_id", 1).limit(BATCH))
        if not batch:
            break
        fields: dict = {}
        for msg in batch:
            fields["factory_order" if msg.get("topic") == ORDER_STATE_TOPIC else "hbw"] = _snapshot(msg)
            if current is not None and current.get("state") not in FINAL:
                current = _apply(fdb, current, msg, rules)
        fields["cursor"] = batch[-1]["_id"]
        if current is not None and current.get("state") in FINAL:
            fields["current"] = None
        dispatch(fdb).update_one({"_id": factory_id}, {"$set": fields})
        state.update(fields)
        if len(batch) < BATCH:
            break
    return state


# -- sending ----------------------------------------------------------------------------------------

def controller_ts(dt: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.fffZ`` in UTC, as the controller writes and reads timestamps."""
    dt = _aware(dt).astimezone(timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def factory_ready(state: dict, rules: OrderRules, now: datetime) -> tuple[bool, str | None]:
    """May the factory take the next order? (False, why) while it works on one (ours or one
    placed elsewhere) or its warehouse is in a fault."""
    hbw = state.get("hbw") or {}
    if isinstance(hbw.get("code"), int) and hbw["code"] in STATION_ERROR_CODES:
        return False, (f"the high-bay warehouse is in a fault (code {hbw['code']}"
                       f"{': ' + str(hbw['description']) if hbw.get('description') else ''}); "
                       "a person clears it at the factory")
    last = state.get("factory_order") or {}
    said = last.get("state")
    if said in (None, "WAITING_FOR_ORDER"):
        return True, None
    received = _aware(last.get("received_at"))
    if said == "SHIPPED" and received is not None and now - received >= timedelta(seconds=rules.shipped_grace_s):
        return True, None
    kind = f" {last['type']}" if last.get("type") else ""
    return False, f"the factory is working on an order (f/i/order {said}{kind})"


def _fail_unacknowledged(fdb, order: dict, rules: OrderRules, now: datetime) -> dict:
    sends = [a for a in order.get("attempts") or [] if a.get("broker_ack")]
    first = _aware(order.get("first_sent_at")) or now
    reason = (f"the factory never acknowledged the order: {len(sends)} send(s) over "
              f"{(now - first).total_seconds():.0f} s, no f/i/order ORDERED {order['type']} stored after them "
              "(is the controller connected, its clock within 10 s of the estimate, the ingester running?)")
    return _move(fdb, order, "failed", now, reason=reason)


def _record_send(fdb, order: dict, now: datetime) -> Send | None:
    """Record the next send of ``order`` (store, then act); None when another process did."""
    n = int(order.get("attempt_count") or 0)
    stamped = factory_now(fdb, order["factory_id"], now)
    ts = controller_ts(stamped)
    attempt = {"n": n + 1, "ts": ts, "sent_at": now, "clock_offset_s": round((stamped - now).total_seconds(), 3),
               "broker_ack": None}
    sets: dict = {"state": "sent", "attempt_count": n + 1, "last_sent_at": now, "updated_at": now}
    if n == 0:
        sets.update(first_sent_at=now, sent_at=now)
    res = orders(fdb).update_one({"_id": order["_id"], "state": order["state"], "attempt_count": n},
                                 {"$set": sets, "$push": {"attempts": attempt,
                                                          "events": {"state": "sent", "at": now, "ts": ts,
                                                                     "attempt": n + 1}}})
    if res.modified_count != 1:
        return None
    return Send(order["_id"], order["factory_id"], n + 1, {"ts": ts, "type": order["type"]})


def record_broker_ack(fdb, send: Send, acknowledged: bool) -> None:
    orders(fdb).update_one({"_id": send.order_id, "attempt_count": {"$gte": send.attempt}},
                           {"$set": {f"attempts.{send.attempt - 1}.broker_ack": bool(acknowledged)}})


def next_send(fdb, factory_id: str, rules: OrderRules | None = None, *, now: datetime | None = None,
              connected: bool = True, heard_ack=None) -> Send | None:
    """Decide and record what to publish for ``factory_id`` now, if anything:

    * the order in work is ``sent`` and unacknowledged for ``ack_timeout_s``: again, with a
      fresh ts (or ``failed`` after ``max_attempts`` sends the broker took);
    * it is ``ordered`` or further: nothing, ever again (the controller has no order id);
    * no order in work and the factory is ready: the oldest queued order becomes the one in work.

    ``heard_ack(factory_id, type, since)`` (optional): the API heard ORDERED on MQTT itself, so
    a re-send waits for the ingester to store it instead. Nothing is recorded while the
    broker is not ``connected``."""
    rules = rules or OrderRules()
    now = now or utcnow()
    state = dispatch_state(fdb, factory_id)
    current = orders(fdb).find_one({"_id": state["current"]}) if state.get("current") else None
    if current is not None and current.get("state") in FINAL:
        dispatch(fdb).update_one({"_id": factory_id, "current": current["_id"]}, {"$set": {"current": None}})
        current = None
    if current is None:
        ready, why = factory_ready(state, rules, now)
        if state.get("waiting") != why:
            dispatch(fdb).update_one({"_id": factory_id}, {"$set": {"waiting": why}})
        if not ready or not connected:
            return None
        # the factory's own index (a planner may otherwise take state_factory, which leads with the state)
        nxt = orders(fdb).find_one({"factory_id": factory_id, "state": "queued"}, sort=[("seq", 1), ("idx", 1)],
                                   hint="factory_state_seq")
        if nxt is None:
            return None
        twin = fdb.twin.find_one({"_id": factory_id}, {"reported": 1})
        if reported_counts(twin).get(nxt["colour"], 0) == 0:
            # taken meanwhile (an order placed elsewhere): sending it would only fault the warehouse,
            # and a person would have to clear the fault at the factory
            _move(fdb, nxt, "failed", now, reason=f"no {nxt['colour']} piece left in the reported stock when its "
                                                   "turn came (taken since it was placed); not sent")
            return None
        if dispatch(fdb).update_one({"_id": factory_id, "current": None},
                                    {"$set": {"current": nxt["_id"]}}).modified_count != 1:
            return None  # another process started an order meanwhile
        logger.info("order %s (%s) is next for %s", nxt["_id"], nxt["type"], factory_id)
        current = nxt
    if current["state"] == "queued":
        return _record_send(fdb, current, now) if connected else None
    if current["state"] != "sent":
        return None  # acknowledged: never sent again
    attempts = current.get("attempts") or []
    last = _aware(attempts[-1]["sent_at"]) if attempts else None
    if last is not None and now - last < timedelta(seconds=rules.ack_timeout_s):
        return None
    first = _aware(current.get("first_sent_at"))
    if heard_ack is not None and first is not None and heard_ack(factory_id, current["type"],
                                                                 first - timedelta(seconds=rules.ack_slack_s)):
        logger.info("order %s: ORDERED heard on MQTT; waiting for the ingester to store it", current["_id"])
        return None
    taken = sum(1 for a in attempts if a.get("broker_ack"))
    if taken >= rules.max_attempts or len(attempts) >= 3 * rules.max_attempts:
        _fail_unacknowledged(fdb, current, rules, now)
        dispatch(fdb).update_one({"_id": factory_id, "current": current["_id"]}, {"$set": {"current": None}})
        return None
    if not connected:
        return None
    logger.info("order %s (%s): no ORDERED %.0f s after send %d; sending again with a fresh ts",
                current["_id"], current["type"], (now - last).total_seconds() if last else 0, len(attempts))
    return _record_send(fdb, current, now)


def factories_with_work(fdb) -> list[str]:
    """Factories with an order not yet shipped or failed, or a twin still showing one."""
    ids = set(orders(fdb).distinct("factory_id", {"state": {"$in": list(LIVE)}}))
    ids.update(d["_id"] for d in fdb.twin.find({"orders.0": {"$exists": True}}, {"_id": 1}))
    return sorted(ids)


def order_json_fields(doc: dict, *, events: bool = False) -> dict:
    """An order document as the API shows it (no internal bookkeeping; ``events``: its log)."""
    hidden = ("_id", "seq", "idx", "attempt_count") + (() if events else ("events",))
    out = {k: v for k, v in doc.items() if k not in hidden}
    out["id"] = doc["_id"]
    return out


__all__ = ["COLOUR_TO_TYPE", "FINAL", "LIVE", "ON_ORDER", "STATES", "IdempotencyConflict", "NoStock",
           "OrderRules", "Send", "UnknownFactory", "VersionConflict", "available_counts", "claim_factory",
           "controller_ts", "dispatch_state", "ensure_indexes", "factories_with_work", "factory_ready", "follow",
           "get_order", "key_order_id", "list_orders", "next_send", "on_order_counts", "place_orders",
           "record_broker_ack", "release_factory", "reported_counts", "restore_orders", "sync_twin"]
