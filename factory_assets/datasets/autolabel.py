"""Automatic labels from the factory controller's own stock reports (``f/i/stock``).

The controller publishes ``f/i/stock`` only when something happens (a piece stored or
fetched, a container moved, the crane back at its reference), never periodically, and the
warehouse reports its new stock *before* the crane moves: the piece is in (or out of) its
slot some seconds later. A frame is labelled with the stock its factory reported at or
before its ``ts`` (the report in force, however old: between events nothing changes) when

- **stable**: no stock *change* was reported from ``margin_s`` after the frame back to
  ``settle_s`` before it (the crane may still be moving: the picture may show either rack);
- **heard**: the platform has stored a message its controller sent at least ``margin_s``
  after the frame, so a change reported right after it (or before it, still on its way)
  cannot be missing. Evidence, per factory (:func:`heard_until`):

  * any ``f/i/...`` message (stock, order state, station states, NFC): the controller sends
    them at QoS 1 through one connection, the broker keeps them for the ingester's
    persistent session and delivers them in order, so a stored one stamped after the frame
    means every stock report sent before it is stored too;
  * or a frame of that factory taken ``FRAME_EVIDENCE_LAG_S`` (10 s) later still: the
    camera's QoS 0 frames come through the same connection, so the ingester was receiving
    the factory then; the lag covers a QoS 1 report trailing a later frame through the
    broker and the ingester's batch. Between events (the factory idle for an hour) frames
    are what shows the platform was listening.

  Frames not yet heard after are left for the next run (``unconfirmed``), not rejected.

A change is a report whose slots differ from the previous report of the same factory
(reports repeating the stock are no change); the first report the platform has of a
factory counts as one (what came before is unknown). ``settle_s`` defaults to
``FACTORY_SETTLE_S`` (``vocabulary.DEFAULT_SETTLE_S``, 25 s: the simulator's crane takes
6-18 s, plus a margin). ``window_s`` (default None: any age) optionally refuses reports
older than that. Each factory's frames are labelled from that factory's reports (a report
without a ``factory_id``, written by another tool, counts for every factory).

Idempotent: the same stored messages give the same labels; a label given earlier that a
report stored since makes unstable (or a frame no report precedes) is withdrawn. A report
lost for good (a broker that dropped the ingester's session while a change was reported)
cannot be seen by any rule: the labels after it are wrong until the next change.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from datetime import datetime, timedelta

from factory_assets.datasets.labels import label_doc, upsert_labels
from factory_assets.vocabulary import (DEFAULT_FACTORY_ID, NFC_TOPIC, ORDER_STATE_TOPIC, STATION_STATE_PREFIX,
                                       STATIONS, STOCK_TOPIC, reported_presence, stock_slots)

# The controller's own messages (QoS 1, one connection, in order): a stored one tells what was heard.
CONTROLLER_TOPICS: tuple[str, ...] = (STOCK_TOPIC, ORDER_STATE_TOPIC, NFC_TOPIC,
                                      *(STATION_STATE_PREFIX + s for s in STATIONS))
FRAME_EVIDENCE_LAG_S = 10.0  # a frame this much later than frame + margin shows the factory was heard
FRAME_EVIDENCE_LOOK_S = 60.0  # how far past the range a frame or a message is looked for (an index range)
NEWEST_LOOK_S = 60.0  # the first time range looked back through for a factory's newest message


@dataclass
class AutoLabelSummary:
    frames: int = 0
    labelled: int = 0
    unstable: int = 0       # taken while the stock changed or the crane may still have been moving
    no_report: int = 0      # no report at or before the frame (or older than window_s)
    unconfirmed: int = 0    # too new: nothing heard from the factory after it yet
    withdrawn: int = 0      # auto labels removed: reports that arrived since show the stock was not stable


@dataclass
class _FactoryReports:
    times: list
    reports: list   # (ts, slots, message id)
    changes: list   # times of the reports that changed the stock


def _stock_reports(fdb, lo: datetime, hi: datetime, factory_id: str | None = None) -> dict:
    """The readable reports with lo <= ts < hi, by factory (None: reports without one); with
    ``factory_id``, that factory's and those without one (index ranges of ``factory_topic_ts``)."""
    groups: dict = {}
    window = {"ts": {"$gte": lo, "$lt": hi}}
    queries = [{"topic": STOCK_TOPIC, **window}] if factory_id is None else \
        [{"factory_id": owner, "topic": STOCK_TOPIC, **window} for owner in (factory_id, None)]
    projection = {"ts": 1, "payload": 1, "message_id": 1, "factory_id": 1}
    for msg in sorted((m for q in queries for m in fdb.mqtt.find(q, projection)),
                      key=lambda m: (m["ts"], str(m["_id"])) if isinstance(m.get("ts"), datetime) else (lo, "")):
        if not isinstance(msg.get("payload"), dict) or not isinstance(msg.get("ts"), datetime):
            continue
        groups.setdefault(msg.get("factory_id"), []).append(
            (msg["ts"], stock_slots(msg["payload"]), msg.get("message_id") or str(msg["_id"])))
    return groups


def _day_frames(fdb, start: datetime, end: datetime, factory_id: str | None, projection: dict):
    """The frames captured in [start, end): the fleet's (the ``frame_ts`` index), or with
    ``factory_id`` that factory's (``factory_ts``; the default factory also owns frames stored
    without an id). ``ts`` stored as ISO text in original documents is a second range."""
    from factory_assets.storage.frames import day_queries, iter_day_frames

    if factory_id is None:
        yield from iter_day_frames(fdb, start, end, projection)
        return
    owners = [factory_id, None] if factory_id == DEFAULT_FACTORY_ID else [factory_id]
    for owner in owners:
        for query in day_queries(start, end):
            yield from fdb.frames.find({"factory_id": owner, **query}, projection)


def _heard_after(fdb, factory_id, bound: datetime) -> bool:
    """Whether the factory's controller sent something stamped at or after ``bound``: per topic a
    range of ``factory_topic_ts``, in time ranges from ``bound`` on that double while empty (an
    empty range reads no key), so what is read is the first non-empty range, not all since."""
    from factory_assets.vocabulary import utcnow

    last = utcnow() + timedelta(days=1)  # a controller's clock may run ahead of ours
    span, lo = timedelta(seconds=FRAME_EVIDENCE_LOOK_S), bound
    while lo <= last:
        hi = lo + span
        for topic in CONTROLLER_TOPICS:  # one equality per topic: a tight range of factory_topic_ts
            if fdb.mqtt.find_one({"factory_id": factory_id, "topic": topic, "ts": {"$gte": lo, "$lt": hi}},
                                 {"_id": 1}) is not None:
                return True
        lo, span = hi, span * 2
    return False


def _newest_before(coll, query: dict, lo: datetime, bound: datetime):
    """The newest ``ts`` of ``query`` in [lo, bound): time ranges back from ``bound``, doubling
    while empty (an empty range reads no key), so what is read is the newest non-empty range,
    not everything since ``lo``. None if none."""
    span = timedelta(seconds=NEWEST_LOOK_S)
    hi = bound
    while hi > lo:
        start = max(lo, hi - span)
        times = [d["ts"] for d in coll.find({**query, "ts": {"$gte": start, "$lt": hi}}, {"ts": 1})
                 if isinstance(d.get("ts"), datetime)]
        if times:
            return max(times)
        hi, span = start, span * 2
    return None


def _report_before(fdb, factory_id, before: datetime):
    """The factory's last readable report before ``before`` (the report in force then, however
    old), as ``(ts, slots, message id)``; None if none."""
    msg = fdb.mqtt.find_one({"factory_id": factory_id, "topic": STOCK_TOPIC, "ts": {"$lt": before}},
                            {"ts": 1, "payload": 1, "message_id": 1}, sort=[("ts", -1)])
    if not msg or not isinstance(msg.get("payload"), dict) or not isinstance(msg.get("ts"), datetime):
        return None
    return msg["ts"], stock_slots(msg["payload"]), msg.get("message_id") or str(msg["_id"])


def heard_until(fdb, factory_id, lo: datetime, bound: datetime, newest_frame: datetime | None = None):
    """Up to when the platform has heard the factory, as far as ``bound`` matters: every stock
    report the controller sent before the returned time is stored (see the module). ``bound``
    or later when something after it is stored; else the newest evidence from ``lo`` on
    (``newest_frame``: the newest frame of the factory the caller saw there); None if none.
    Index ranges of this factory only (``factory_topic_ts``, ``factory_ts``), each next to
    ``bound``, never the whole history nor the fleet's frames."""
    lag = timedelta(seconds=FRAME_EVIDENCE_LAG_S)
    best = None
    if _heard_after(fdb, factory_id, bound):
        return bound
    # the factory's frames a little past the range (factory_ts; the default factory's without an id too)
    look = {"$gte": bound + lag, "$lt": bound + lag + timedelta(seconds=FRAME_EVIDENCE_LOOK_S)}
    owners = [factory_id, None] if factory_id in (DEFAULT_FACTORY_ID, None) else [factory_id]
    if any(fdb.frames.find_one({"factory_id": owner, "ts": look}, {"_id": 1}) is not None for owner in owners):
        return bound
    for topic in CONTROLLER_TOPICS:
        hit = _newest_before(fdb.mqtt, {"factory_id": factory_id, "topic": topic}, lo, bound)
        if hit is not None:
            best = hit if best is None else max(best, hit)
    if newest_frame is not None:
        best = newest_frame - lag if best is None else max(best, newest_frame - lag)
    return best


def _factory_reports(fdb, factory_id, groups: dict, lo: datetime) -> _FactoryReports:
    reports = sorted(groups.get(factory_id, []) + (groups.get(None, []) if factory_id is not None else []),
                     key=lambda r: r[0])
    earlier = _report_before(fdb, factory_id, lo)
    changes = []
    for i, (ts, slots, _) in enumerate(reports):
        before = reports[i - 1][1] if i else (earlier[1] if earlier else None)
        if before is None or slots != before:  # unknown before the first report: a change too
            changes.append(ts)
    if earlier is not None:
        # in force before the range; whether it was a change no longer matters (before lo)
        reports.insert(0, earlier)
    return _FactoryReports([r[0] for r in reports], reports, changes)


def stable_spans(reports: list, until: datetime | None, *, settle_s: float, margin_s: float = 2.0,
                 earlier: dict | None = None) -> list[tuple[datetime, datetime, dict]]:
    """The stretches in which :func:`auto_label` labels a factory's frames, from its reports
    ``[(ts, slots), ...]`` in time order: ``(after, before, slots)``, a frame at ``t`` with
    ``after < t < before`` (and ``t <= until - margin``, ``until`` from :func:`heard_until`)
    is labelled ``slots``. ``earlier``: the slots reported before the first (None: unknown, so
    the first report is a change). The same rules as :func:`auto_label`, for readiness checks."""
    after = timedelta(seconds=max(settle_s, margin_s))
    margin = timedelta(seconds=margin_s)
    changes, previous = [], earlier
    for ts, slots in reports:
        if previous is None or slots != previous:
            changes.append((ts, slots))
        previous = slots
    last = until - margin + timedelta(microseconds=1) if until is not None else None
    spans = []
    for k, (ts, slots) in enumerate(changes):
        lo = ts + after
        hi = changes[k + 1][0] - margin if k + 1 < len(changes) else last
        if hi is not None and last is not None:
            hi = min(hi, last)
        if hi is not None and hi > lo:
            spans.append((lo, hi, slots))
    return spans


def auto_label(fdb, start: datetime, end: datetime, *, window_s: float | None = None, margin_s: float = 2.0,
               settle_s: float | None = None, factory_id: str | None = None) -> AutoLabelSummary:
    """Label the frames with ``start <= ts < end`` from the stock reports (see the module).
    ``factory_id``: only that factory's frames."""
    from factory_assets.config import settle_seconds
    from factory_assets.storage.frames import frame_ts

    settle_s = settle_seconds() if settle_s is None else float(settle_s)
    if not (margin_s >= 0 and settle_s >= 0 and (window_s is None or window_s >= 0)):
        raise ValueError(f"window_s, margin_s and settle_s must be >= 0 (got {window_s}, {margin_s}, {settle_s})")
    window = None if window_s is None else timedelta(seconds=window_s)
    margin = timedelta(seconds=margin_s)
    after = timedelta(seconds=max(settle_s, margin_s))  # a change this long before a frame makes it unstable
    lo = start - after - margin
    bound = end + margin
    groups = _stock_reports(fdb, lo, bound, factory_id)
    per_factory: dict = {}
    newest: dict = {}  # factory -> its newest frame seen in the range (evidence it was heard)
    summary = AutoLabelSummary()
    candidates, rejected = [], []  # (factory, ts, label) waiting for what was heard after them
    # index-served ($or is not): the factory's own frames when one is given, not the fleet's
    for frame in _day_frames(fdb, start, end, factory_id, {"image": 0, "data": 0}):
        if frame.get("camera_id") == "import":
            continue
        fid = frame.get("factory_id") or DEFAULT_FACTORY_ID
        if factory_id is not None and fid != factory_id:
            continue
        if fid not in per_factory:
            per_factory[fid] = _factory_reports(fdb, fid, groups, lo)
        fr = per_factory[fid]
        summary.frames += 1
        ts = frame_ts(frame)
        newest[fid] = ts if fid not in newest else max(newest[fid], ts)
        i = bisect_right(fr.times, ts) - 1
        if i < 0 or (window is not None and ts - fr.times[i] > window):
            summary.no_report += 1
            rejected.append(frame["_id"])
            continue
        k = bisect_left(fr.changes, ts - after)
        if k < len(fr.changes) and fr.changes[k] <= ts + margin:
            summary.unstable += 1
            rejected.append(frame["_id"])
            continue
        report_ts, slots, message_id = fr.reports[i]
        candidates.append((fid, ts, label_doc(frame, reported_presence(slots), "auto", slots=slots, provenance={
            "report_message_id": message_id, "report_ts": report_ts, "window_s": window_s,
            "margin_s": margin_s, "settle_s": settle_s})))
    heard = {fid: heard_until(fdb, fid, lo, bound, newest.get(fid)) for fid in per_factory}
    docs = []
    for fid, ts, doc in candidates:
        if heard[fid] is None or heard[fid] < ts + margin:
            summary.unconfirmed += 1  # left as it is: the next run decides, when more was heard
            continue
        docs.append(doc)
    if docs:
        upsert_labels(fdb, docs)
    for chunk in range(0, len(rejected), 5000):
        # by frame_id alone (index prefix), then by _id: $in plus a second field scanned every label
        stale = [d["_id"] for d in fdb.labels.find({"frame_id": {"$in": rejected[chunk:chunk + 5000]}}, {"source": 1})
                 if d.get("source") == "auto"]
        if stale:
            summary.withdrawn += fdb.labels.delete_many({"_id": {"$in": stale}}).deleted_count
    summary.labelled = len(docs)
    return summary
