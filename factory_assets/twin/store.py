"""Writing the twin to MongoDB in both shapes, never regressing to an older frame.

``digital_twin`` (one document per factory) is updated with optimistic
concurrency: read, decide, then ``update_one({_id, version: v}, ...)``; a
concurrent writer makes the update match nothing and we retry on fresh state.
An observation from a frame older than the one the twin already shows is
rejected, whatever order runs finish in. The original shape
(``sagemaker_stock_inference``, ``_partition: "DTPartition"``) is written with
the same guard on ``ts``. Every change of state is appended to ``twin_history``.

Which disagreements reach ``delta`` (persisting ones, outside the crane's settle window after a
reported change) is decided by ``state.assess`` under ``TwinRules`` (``FACTORY_SETTLE_S`` etc.);
the others are ``in_transit`` or still watched in ``metadata.disagreement``.
"""
from __future__ import annotations

from datetime import datetime

from pymongo.errors import DuplicateKeyError

from factory_assets.storage.frames import parse_ts
from factory_assets.twin.state import COLOURS, Observation, Reported, TwinRules, assess
from factory_assets.vocabulary import utcnow

LEGACY_PARTITION = "DTPartition"
MAX_RETRIES = 50


def _is_newer_observation(current: dict | None, obs: Observation) -> bool:
    if not current or "frame_ts" not in current:
        return True
    cur_ts = parse_ts(current["frame_ts"])
    if obs.frame_ts != cur_ts:
        return obs.frame_ts > cur_ts
    # Same frame time: only a re-inference of that frame by another model may replace it.
    return current.get("frame_id") == obs.frame_id and current.get("model_version") != obs.model_version


def _cas(fdb, factory_id: str, build) -> tuple[bool, dict | None]:
    """Apply ``build(doc) -> (new_fields | None)`` with a version compare-and-swap."""
    for _ in range(MAX_RETRIES):
        doc = fdb.twin.find_one({"_id": factory_id})
        fields = build(doc)
        if fields is None:
            return False, doc
        version = (doc or {}).get("version", 0)
        fields["updated_at"] = utcnow()
        fields["version"] = version + 1
        # Written in the same atomic update as the version: readers (the API's event stream)
        # know for certain whether a twin_history entry for this version is on its way.
        fields["history_version"] = version + 1 if fields.pop("_history", False) else (doc or {}).get(
            "history_version", 0)
        if doc is None:
            try:
                fdb.twin.insert_one({"_id": factory_id, "factory_id": factory_id, **_nest(fields)})
            except DuplicateKeyError:
                continue
        else:
            if fdb.twin.update_one({"_id": factory_id, "version": version}, {"$set": fields}).modified_count != 1:
                continue
        return True, {**(doc or {"_id": factory_id}), **_nest(fields)}
    raise RuntimeError(f"twin {factory_id}: too much write contention")


def _nest(fields: dict) -> dict:
    """{"metadata.observed": x} -> {"metadata": {"observed": x}} for inserts."""
    out: dict = {}
    for key, value in fields.items():
        head, _, tail = key.partition(".")
        if tail:
            out.setdefault(head, {})[tail] = value
        else:
            out[key] = value
    return out


def flagged_keys(delta: dict | None) -> list[str]:
    """The colours and slots a ``delta`` flags, e.g. ``["red", "A2"]``."""
    delta = delta or {}
    return [k for k in delta if k != "slots"] + list(delta.get("slots") or {})


def _assessed(doc: dict | None, observed: dict, reported: dict, *, new_frame: bool, rules: TwinRules) -> dict:
    tracking = (((doc or {}).get("metadata") or {}).get("disagreement")) or {}
    a = assess(observed, reported, tracking, new_frame=new_frame, rules=rules)
    return {"delta": a.delta, "in_transit": a.in_transit, "metadata.disagreement": a.tracking}


def apply_observation(fdb, obs: Observation, rules: TwinRules | None = None) -> bool:
    """Update the twin from one inference; False when the twin already shows a newer frame."""
    now = utcnow()
    rules = rules or TwinRules.from_env()
    changed_colours: list[str] = []
    flags: dict = {}

    def build(doc):
        current = (doc or {}).get("observed")
        if not _is_newer_observation(current, obs):
            return None
        observed = {"frame_id": obs.frame_id, "frame_ts": obs.frame_ts, "frame_seq": obs.frame_seq,
                    "model_version": obs.model_version, "source": obs.source, "updated_at": now}
        meta = dict(((doc or {}).get("metadata") or {}).get("observed") or {})
        changed_colours.clear()
        for c in COLOURS:
            observed[c] = {"present": bool(obs.present[c]), "probability": float(obs.probabilities[c]),
                           "threshold": float(obs.thresholds.get(c, 0.5))}
            if not current or (current.get(c) or {}).get("present") != observed[c]["present"]:
                changed_colours.append(c)
                meta[c] = {"ts": obs.frame_ts, "changed_at": now}
            elif c in meta:
                meta[c] = {**meta[c], "ts": obs.frame_ts}
            else:
                meta[c] = {"ts": obs.frame_ts, "changed_at": now}
        reported = (doc or {}).get("reported") or {}
        if obs.slots:  # a per-slot model: the slots seen, and delta.slots where they disagree
            observed["slots"] = obs.slots
        fields = _assessed(doc, observed, reported, new_frame=True, rules=rules)
        before, after = flagged_keys((doc or {}).get("delta")), flagged_keys(fields["delta"])
        flags.clear()
        flags.update(flagged=[k for k in after if k not in before], cleared=[k for k in before if k not in after])
        return {"observed": observed, "metadata.observed": meta, **fields,
                "_history": bool(changed_colours or flags["flagged"] or flags["cleared"])}

    applied, new_doc = _cas(fdb, obs.factory_id, build)
    if not applied:
        return False
    if changed_colours or flags["flagged"] or flags["cleared"]:
        # first: readers wait for this entry once they see the new version. A persisting
        # disagreement being flagged (or clearing) is news even when no colour changed.
        fdb.twin_history.insert_one({
            "factory_id": obs.factory_id, "version": new_doc["version"], "at": now,
            "kind": "observed" if changed_colours else "discrepancy",
            "changed": changed_colours, "present": {c: bool(obs.present[c]) for c in COLOURS},
            "frame_id": obs.frame_id, "frame_ts": obs.frame_ts, "model_version": obs.model_version,
            "source": obs.source, "delta": new_doc.get("delta", {}), **flags})
    _write_legacy(fdb, obs)
    return True


def apply_reported(fdb, rep: Reported, rules: TwinRules | None = None) -> bool:
    """Update the twin from a stock report; False when a newer report is already applied.

    A report whose slots differ from the ones the twin shows is a *change*: ``reported.changed_at``
    becomes its time, and for ``rules.settle_s`` after it disagreements are ``in_transit``
    (the controller reports before the crane moves). A report repeating the stock is no change."""
    now = utcnow()
    rules = rules or TwinRules.from_env()
    changed_slots: list[str] = []

    def build(doc):
        current = (doc or {}).get("reported") or {}
        if current.get("ts") and parse_ts(current["ts"]) >= rep.ts:
            return None
        old_slots = current.get("slots") or {}
        changed_slots[:] = [s for s, t in rep.slots.items() if old_slots.get(s) != t or not current.get("slots")]
        meta = dict(((doc or {}).get("metadata") or {}).get("reported") or {})
        for s in rep.slots:
            meta[s] = {"ts": rep.ts, "changed_at": now if s in changed_slots else (meta.get(s) or {}).get("changed_at", now)}
        changed_at = rep.ts if changed_slots or current.get("changed_at") is None else current["changed_at"]
        # the stations' and the order's states (apply_controller_state) stay as they are
        reported = {**current, "slots": rep.slots, "present": rep.present, "ts": rep.ts,
                    "message_id": rep.message_id, "updated_at": now, "changed_at": changed_at}
        observed = (doc or {}).get("observed") or {}
        return {"_history": bool(changed_slots), "reported": reported, "metadata.reported": meta,
                **_assessed(doc, observed, reported, new_frame=False, rules=rules)}

    applied, new_doc = _cas(fdb, rep.factory_id, build)
    if applied and changed_slots:
        fdb.twin_history.insert_one({"factory_id": rep.factory_id, "version": new_doc["version"], "at": now,
                                     "kind": "reported", "changed": changed_slots, "slots": rep.slots,
                                     "ts": rep.ts, "delta": new_doc.get("delta", {})})
    return applied


CLOCK_SHOWN_TOLERANCE_S = 0.5  # the twin's clock is rewritten when the estimate moved this much


def _station_key(state: dict | None) -> tuple:
    state = state or {}
    return state.get("code"), state.get("active"), state.get("description"), state.get("target")


def apply_controller_state(fdb, factory_id: str, *, stations: dict | None = None, order: dict | None = None,
                           clock: dict | None = None) -> bool:
    """Show the stations' latest states (``reported.stations``: per station code, meaning,
    description, active, ts and ``fault``), the controller's latest order state
    (``reported.order``) and the factory's clock offset (``clock``) on the twin.

    Writes only when something a person would see changed: a station's code, activity,
    description or target, the order's state or type, or the clock offset by at least
    ``CLOCK_SHOWN_TOLERANCE_S``. A station or order change is appended to ``twin_history``
    (kind ``controller``); a clock change is not. False when nothing changed."""
    now = utcnow()
    changes: dict = {}

    def build(doc):
        current = (doc or {}).get("reported") or {}
        shown_stations = current.get("stations") or {}
        fields: dict = {}
        changed = [name for name, state in (stations or {}).items()
                   if _station_key(state) != _station_key(shown_stations.get(name))]
        new_order = order if order is not None else current.get("order")
        order_changed = order is not None and (
            (order.get("state"), order.get("type")) != ((current.get("order") or {}).get("state"),
                                                        (current.get("order") or {}).get("type")))
        if changed or order_changed:
            # unchanged stations keep the state (and ts) they were shown with: a republished
            # state is not news
            merged = {**shown_stations, **{name: stations[name] for name in changed}}
            fields["reported"] = {**current, "stations": merged, "order": new_order}
        shown_clock = (doc or {}).get("clock") or {}
        if clock and clock.get("offset_s") is not None and (
                shown_clock.get("offset_s") is None
                or abs(float(clock["offset_s"]) - float(shown_clock["offset_s"])) >= CLOCK_SHOWN_TOLERANCE_S):
            fields["clock"] = {k: clock.get(k) for k in ("offset_s", "samples", "spread_s", "updated_at")}
        if not fields:
            return None
        changes.clear()
        changes.update(stations=changed, order=order_changed)
        fields["_history"] = bool(changed or order_changed)
        return fields

    applied, new_doc = _cas(fdb, factory_id, build)
    if applied and (changes["stations"] or changes["order"]):
        reported = new_doc.get("reported") or {}
        fdb.twin_history.insert_one({
            "factory_id": factory_id, "version": new_doc["version"], "at": now, "kind": "controller",
            "changed": changes["stations"] + (["order"] if changes["order"] else []),
            "stations": {name: reported["stations"][name] for name in changes["stations"]},
            "order": reported.get("order"), "delta": new_doc.get("delta", {}),
            "faults": sorted(n for n, st in (reported.get("stations") or {}).items() if (st or {}).get("fault"))})
    return applied


def _write_legacy(fdb, obs: Observation) -> None:
    """The original shape the Unity twin's Realm schema reads, guarded on ``ts``.

    ``_partition`` is unique (storage.indexes): of two first writers one inserts and the other
    gets DuplicateKeyError, then retries its guarded update, so the newer frame always wins.
    """
    fields = {"ts": obs.frame_ts, "is_present": {c: bool(obs.present[c]) for c in COLOURS}}
    coll = fdb.twin_legacy
    for _ in range(MAX_RETRIES):
        # A document whose ts is missing or not a date (written by another tool) is older than any frame.
        older = {"$or": [{"ts": {"$lte": obs.frame_ts}}, {"ts": {"$not": {"$type": "date"}}}]}
        if coll.update_one({"_partition": LEGACY_PARTITION, **older}, {"$set": fields}).matched_count:
            return
        current = coll.find_one({"_partition": LEGACY_PARTITION}, projection={"ts": 1})
        if current is not None:
            if isinstance(current.get("ts"), datetime) and parse_ts(current["ts"]) > obs.frame_ts:
                return  # the document shows a newer frame, and ts only grows
            continue  # an older frame was inserted after our update looked: look again
        try:
            coll.insert_one({"_partition": LEGACY_PARTITION, **fields})
            return
        except DuplicateKeyError:
            continue  # another writer inserted first: compare against its ts
    raise RuntimeError(f"legacy twin {LEGACY_PARTITION}: too much write contention")


def get_twin(fdb, factory_id: str = "factory-1") -> dict | None:
    return fdb.twin.find_one({"_id": factory_id})
