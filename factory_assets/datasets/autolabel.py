"""Automatic labels from the factory controller's own stock reports (``f/i/stock``).

The warehouse reports its new stock *before* the crane moves; the piece is in (or out of)
its slot some seconds later. A frame is labelled with the stock its factory reported at or
before its ``ts`` only when
- that report is at most ``window_s`` older than the frame,
- no stock *change* was reported from ``margin_s`` after the frame back to ``settle_s``
  before it (the crane may still be moving: the picture may show either rack), and
- the controller has reported again at least ``margin_s`` after the frame, so a change
  right after it cannot be missed (newest frames are labelled next time).
A change is a report whose slots differ from the previous report of the same factory
(reports repeating the stock are no change). ``settle_s`` defaults to ``FACTORY_SETTLE_S``
(``vocabulary.DEFAULT_SETTLE_S``, 25 s: the simulator's crane takes 6-18 s, plus a margin).
Each factory's frames are labelled from that factory's reports (a report without a
``factory_id``, written by another tool, counts for every factory).
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from datetime import datetime, timedelta

from factory_assets.datasets.labels import label_doc, upsert_labels
from factory_assets.vocabulary import DEFAULT_FACTORY_ID, STOCK_TOPIC, reported_presence, stock_slots


@dataclass
class AutoLabelSummary:
    frames: int = 0
    labelled: int = 0
    unstable: int = 0       # taken while the stock changed or the crane may still have been moving
    no_report: int = 0      # no report close enough before the frame
    unconfirmed: int = 0    # too new: no report after it yet
    withdrawn: int = 0      # auto labels removed: reports that arrived since show the stock was not stable


@dataclass
class _FactoryReports:
    times: list
    reports: list   # (ts, slots, message id)
    changes: list   # times of the reports that changed the stock
    confirmed_until: datetime | None  # the newest report time known (a frame needs one after it)


def _stock_reports(fdb, lo: datetime, hi: datetime) -> dict:
    """The readable reports with lo <= ts < hi, by factory (None: reports without one)."""
    groups: dict = {}
    query = {"topic": STOCK_TOPIC, "ts": {"$gte": lo, "$lt": hi}}
    for msg in fdb.mqtt.find(query, {"ts": 1, "payload": 1, "message_id": 1, "factory_id": 1}).sort("ts", 1):
        if not isinstance(msg.get("payload"), dict) or not isinstance(msg.get("ts"), datetime):
            continue
        groups.setdefault(msg.get("factory_id"), []).append(
            (msg["ts"], stock_slots(msg["payload"]), msg.get("message_id") or str(msg["_id"])))
    return groups


def _previous_slots(fdb, factory_id, before: datetime):
    """The stock the factory reported last before ``before`` (an index range), None if none."""
    msg = fdb.mqtt.find_one({"factory_id": factory_id, "topic": STOCK_TOPIC, "ts": {"$lt": before}},
                            {"payload": 1}, sort=[("ts", -1)])
    return stock_slots(msg["payload"]) if msg and isinstance(msg.get("payload"), dict) else None


def _confirmed_until(fdb, factory_id, newest: datetime | None, bound: datetime):
    """The newest report time as far as the frames can tell: a report at or after ``bound``
    (the last frame plus the margin) confirms them all, like the newest would; read from a
    bounded index range, never every report ever stored."""
    if newest is not None and newest >= bound:
        return newest
    hit = fdb.mqtt.find_one({"factory_id": factory_id, "topic": STOCK_TOPIC, "ts": {"$gte": bound}}, {"ts": 1})
    return hit["ts"] if hit else newest


def _factory_reports(fdb, factory_id, groups: dict, lo: datetime, bound: datetime) -> _FactoryReports:
    reports = sorted(groups.get(factory_id, []) + (groups.get(None, []) if factory_id is not None else []),
                     key=lambda r: r[0])
    previous = _previous_slots(fdb, factory_id, lo) if reports else None
    changes = []
    for i, (ts, slots, _) in enumerate(reports):
        before = reports[i - 1][1] if i else previous
        if before is None or slots != before:  # unknown before the first report: a change too
            changes.append(ts)
    newest = reports[-1][0] if reports else None
    return _FactoryReports([r[0] for r in reports], reports, changes, _confirmed_until(fdb, factory_id, newest, bound))


def auto_label(fdb, start: datetime, end: datetime, *, window_s: float = 30.0, margin_s: float = 2.0,
               settle_s: float | None = None, factory_id: str | None = None) -> AutoLabelSummary:
    """Label the frames with ``start <= ts < end`` from the stock reports (see the module).
    ``factory_id``: only that factory's frames."""
    from factory_assets.config import settle_seconds
    from factory_assets.storage.frames import frame_ts, iter_day_frames

    settle_s = settle_seconds() if settle_s is None else float(settle_s)
    if not (window_s >= 0 and margin_s >= 0 and settle_s >= 0):
        raise ValueError(f"window_s, margin_s and settle_s must be >= 0 (got {window_s}, {margin_s}, {settle_s})")
    window, margin = timedelta(seconds=window_s), timedelta(seconds=margin_s)
    after = timedelta(seconds=max(settle_s, margin_s))  # a change this long before a frame makes it unstable
    lo = start - max(window, after) - margin
    bound = end + margin
    groups = _stock_reports(fdb, lo, end + window + margin)
    per_factory: dict = {}
    summary = AutoLabelSummary()
    docs, rejected = [], []
    for frame in iter_day_frames(fdb, start, end, {"image": 0, "data": 0}):  # index-served; $or is not
        if frame.get("camera_id") == "import":
            continue
        fid = frame.get("factory_id") or DEFAULT_FACTORY_ID
        if factory_id is not None and fid != factory_id:
            continue
        if fid not in per_factory:
            per_factory[fid] = _factory_reports(fdb, fid, groups, lo, bound)
        fr = per_factory[fid]
        summary.frames += 1
        ts = frame_ts(frame)
        i = bisect_right(fr.times, ts) - 1
        if i < 0 or ts - fr.times[i] > window:
            summary.no_report += 1
            rejected.append(frame["_id"])
            continue
        if fr.confirmed_until is None or fr.confirmed_until < ts + margin:
            summary.unconfirmed += 1
            continue
        k = bisect_left(fr.changes, ts - after)
        if k < len(fr.changes) and fr.changes[k] <= ts + margin:
            summary.unstable += 1
            rejected.append(frame["_id"])
            continue
        report_ts, slots, message_id = fr.reports[i]
        docs.append(label_doc(frame, reported_presence(slots), "auto", slots=slots,
                              provenance={"report_message_id": message_id, "report_ts": report_ts,
                                          "window_s": window_s, "margin_s": margin_s, "settle_s": settle_s}))
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
