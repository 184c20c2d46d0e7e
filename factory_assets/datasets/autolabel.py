"""Automatic labels from the factory controller's own stock reports (``f/i/stock``).

A frame is labelled with the stock reported at or before its ``ts`` only when
- that report is at most ``window_s`` older than the frame,
- no stock change was reported within ``margin_s`` before or after the frame
  (the robot is moving a workpiece: the picture may show either state), and
- the controller has reported again at least ``margin_s`` after the frame, so a
  change right after it cannot be missed (newest frames are labelled next time).
The simulated factory, like the TXT controller, reports on every change and
periodically in between.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from datetime import datetime, timedelta

from factory_assets.datasets.labels import label_doc, upsert_labels
from factory_assets.vocabulary import reported_presence, stock_slots
from factory_assets.vocabulary import STOCK_TOPIC


@dataclass
class AutoLabelSummary:
    frames: int = 0
    labelled: int = 0
    unstable: int = 0       # taken while the stock changed
    no_report: int = 0      # no report close enough before the frame
    unconfirmed: int = 0    # too new: no report after it yet
    withdrawn: int = 0      # auto labels removed: reports that arrived since show the stock was not stable


def _confirming_report_ts(fdb, start: datetime, end: datetime, window: timedelta, margin: timedelta):
    """The newest stock report's time as far as the day's frames can tell (a frame is confirmed
    when a report came at least ``margin`` after it), read from bounded index ranges: the
    newest report overall was a read of every report ever stored."""
    bound = end + margin
    stock = STOCK_TOPIC
    for rng in ({"$gte": bound, "$lt": bound + window}, {"$gte": bound + window}):
        hit = fdb.mqtt.find_one({"topic": stock, "ts": rng}, {"ts": 1})
        if hit:  # at or after every frame of the day plus margin: confirms them all, like the newest would
            return hit["ts"]
    newest = fdb.mqtt.find_one({"topic": stock, "ts": {"$gte": start - window - margin, "$lt": bound}}, {"ts": 1},
                               sort=[("ts", -1)])
    return newest["ts"] if newest else None  # older reports leave every frame without a report anyway


def auto_label(fdb, start: datetime, end: datetime, *, window_s: float = 30.0, margin_s: float = 2.0,
               factory_id: str | None = None) -> AutoLabelSummary:
    from factory_assets.storage.frames import frame_ts, iter_day_frames

    window, margin = timedelta(seconds=window_s), timedelta(seconds=margin_s)
    query: dict = {"topic": STOCK_TOPIC, "ts": {"$gte": start - window - margin, "$lt": end + window + margin}}
    reports = []
    for msg in fdb.mqtt.find(query, {"ts": 1, "payload": 1, "message_id": 1, "factory_id": 1}).sort("ts", 1):
        if factory_id and msg.get("factory_id") not in (None, factory_id):
            continue
        if not isinstance(msg.get("payload"), dict) or not isinstance(msg.get("ts"), datetime):
            continue
        reports.append((msg["ts"], stock_slots(msg["payload"]), msg.get("message_id") or str(msg["_id"])))
    latest_ts = _confirming_report_ts(fdb, start, end, window, margin)
    # A change point: a report whose stock differs from the one before (the first is one too: unknown before).
    changes = [ts for i, (ts, slots, _) in enumerate(reports) if i == 0 or slots != reports[i - 1][1]]
    times = [r[0] for r in reports]
    summary = AutoLabelSummary()
    docs, rejected = [], []
    for frame in iter_day_frames(fdb, start, end, {"image": 0, "data": 0}):  # index-served; $or is not
        if frame.get("camera_id") == "import":
            continue
        summary.frames += 1
        ts = frame_ts(frame)
        i = bisect_right(times, ts) - 1
        if i < 0 or ts - times[i] > window:
            summary.no_report += 1
            rejected.append(frame["_id"])
            continue
        if latest_ts is None or latest_ts < ts + margin:
            summary.unconfirmed += 1
            continue
        if any(abs(c - ts) <= margin for c in changes[max(0, bisect_right(changes, ts - margin) - 1):]
               if c <= ts + margin):
            summary.unstable += 1
            rejected.append(frame["_id"])
            continue
        report_ts, slots, message_id = reports[i]
        docs.append(label_doc(frame, reported_presence(slots), "auto", slots=slots,
                              provenance={"report_message_id": message_id, "report_ts": report_ts,
                                          "window_s": window_s, "margin_s": margin_s}))
    if docs:
        upsert_labels(fdb, docs)
    for lo in range(0, len(rejected), 5000):
        # by frame_id alone (index prefix), then by _id: $in plus a second field scanned every label
        stale = [d["_id"] for d in fdb.labels.find({"frame_id": {"$in": rejected[lo:lo + 5000]}}, {"source": 1})
                 if d.get("source") == "auto"]
        if stale:
            summary.withdrawn += fdb.labels.delete_many({"_id": {"$in": stale}}).deleted_count
    summary.labelled = len(docs)
    return summary
