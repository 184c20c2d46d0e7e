"""When the deployed model should be (re)trained: the drift metric and the bootstrap readiness.

Drift compares the deployed model's latest inferences with the stock the factory's
controller reported (``f/i/stock``) at each frame's time: the controller is the
ground truth the auto-labels come from, so a model that disagrees with it on many
recent frames has met stock situations it never saw. Only *stable* frames are compared: the
warehouse reports a change before its crane moves, so a frame from ``STABLE_MARGIN_S`` before
a reported change to the settle time after it (``FACTORY_SETTLE_S``, default 25 s) may show
the old rack, and counting it would call the crane's travel drift. A per-slot model is
compared slot by slot (the share of slot readings that differ), a presence model on colour
presence. Bootstrap readiness asks whether the factory has shown enough to train a first model.
"""
from __future__ import annotations

import logging
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from datetime import timedelta

from factory_assets.twin.state import COLOURS, SLOTS, observed_slots, reported_presence, stock_slots
from factory_assets.vocabulary import DEFAULT_FACTORY_ID, STOCK_TOPIC

logger = logging.getLogger(__name__)

DRIFT_WINDOW = 100            # latest inferences compared with the controller's stock reports
DRIFT_MAX_DISAGREEMENT = 0.2  # above this share, retrain on the newer labelled frames
BOOTSTRAP_MIN_FRAMES = 120
BOOTSTRAP_MIN_SITUATIONS = 4  # distinct (per-slot) stock situations reported
BOOTSTRAP_MIN_SLOTS_VARIED = 3  # slots seen both empty and occupied, enough to place the rack
BOOTSTRAP_REPORTS_SCANNED = 500
STABLE_MARGIN_S = 2.0         # a frame this close before a reported stock change is not compared
LOOKBACK_FACTOR = 4           # inferences read to find the latest DRIFT_WINDOW stable ones


@dataclass(frozen=True)
class Disagreement:
    share: float    # presence: share of compared frames that differ; slots: share of compared slot readings
    compared: int   # stable inferences that had a stock report at or before their frame
    basis: str = "presence"  # "slots" when every compared inference and its report carry slots

    @property
    def drifted(self) -> bool:
        return self.compared >= DRIFT_WINDOW and self.share > DRIFT_MAX_DISAGREEMENT


def _report_has_slots(payload: dict | None) -> bool:
    return any((item or {}).get("location") in SLOTS for item in (payload or {}).get("stockItems") or [])


def _seen_slots(inference: dict) -> dict | None:
    seen = observed_slots(inference.get("slots"))
    return {s: v["type"] for s, v in seen.items()} if seen else None


def _reports_of(fdb, factory_id, lo, hi) -> list:
    """The factory's stock reports with ``lo < ts <= hi`` and the one in force at ``lo`` (its
    own and those of no factory, written by another tool), in time order: index ranges."""
    reports = []
    for fid in ([factory_id, None] if factory_id is not None else [None]):
        first = fdb.mqtt.find_one({"factory_id": fid, "topic": STOCK_TOPIC, "ts": {"$lte": lo}}, sort=[("ts", -1)])
        reports += ([first] if first else []) + list(
            fdb.mqtt.find({"factory_id": fid, "topic": STOCK_TOPIC, "ts": {"$gt": lo, "$lte": hi}}))
    reports.sort(key=lambda r: r["ts"])
    # the one in force at lo, then those after it (a None-factory report before the own one drops out)
    k = max([i for i, r in enumerate(reports) if r["ts"] <= lo], default=0)
    return reports[k:]


def controller_disagreement(fdb, model_version: str, n: int = DRIFT_WINDOW,
                            settle_s: float | None = None) -> Disagreement:
    """How often the latest ``n`` inferences of ``model_version`` differ from the stock
    *their own factory's* controller reported at that frame's time, on stable frames (none
    from ``STABLE_MARGIN_S`` before a reported change of that factory to ``settle_s`` after
    it): slot by slot when the inferences and the reports carry slots, colour presence otherwise."""
    from factory_assets.config import settle_seconds

    settle = timedelta(seconds=settle_seconds() if settle_s is None else settle_s)
    margin = timedelta(seconds=STABLE_MARGIN_S)
    # the newest n *stable* ones, from a bounded look back (frames in transit are passed over)
    recent = list(fdb.inferences.find({"model_version": model_version},
                                      {"frame_ts": 1, "present": 1, "slots": 1, "factory_id": 1})
                  .sort("frame_ts", -1).limit(n * LOOKBACK_FACTOR))
    if not recent:
        return Disagreement(0.0, 0)
    by_factory: dict = {}
    for inf in recent:
        by_factory.setdefault(inf.get("factory_id") or DEFAULT_FACTORY_ID, []).append(inf)
    matched = []  # (inference, the report in force at its frame)
    for factory_id, infs in by_factory.items():
        lo, hi = infs[-1]["frame_ts"], infs[0]["frame_ts"]
        # from a little before the oldest frame: a change reported up to ``settle`` before it makes
        # it unstable; a little past the newest too: a change reported just after a frame does
        reports = _reports_of(fdb, factory_id, lo - settle, hi + margin)
        times = [r["ts"] for r in reports]
        slots = [stock_slots(r["payload"]) for r in reports]
        changes = [times[k] for k in range(1, len(slots)) if slots[k] != slots[k - 1]]

        def stable(ts) -> bool:  # no change reported from margin after the frame back to settle before it
            k = bisect_left(changes, ts - max(settle, margin))
            return not (k < len(changes) and changes[k] <= ts + margin)

        for inf in infs:
            i = bisect_right(times, inf["frame_ts"]) - 1
            if i >= 0 and stable(inf["frame_ts"]):
                matched.append((inf, reports[i], slots[i]))
    matched.sort(key=lambda m: m[0]["frame_ts"], reverse=True)
    matched = matched[:n]
    if not matched:
        return Disagreement(0.0, 0)
    if all(inf.get("slots") and _report_has_slots(report.get("payload")) for inf, report, _ in matched):
        return _slot_disagreement(matched)
    differing = sum(reported_presence(reported) != inf["present"] for inf, _, reported in matched)
    return Disagreement(differing / len(matched), len(matched))


def _slot_disagreement(matched: list) -> Disagreement:
    compared = differing = 0
    for inf, _, reported in matched:
        seen = _seen_slots(inf)
        compared += 1
        differing += sum(seen.get(s) != reported.get(s) for s in SLOTS)
    share = differing / (compared * len(SLOTS)) if compared else 0.0
    return Disagreement(share, compared, "slots")


@dataclass(frozen=True)
class Readiness:
    frames: int
    situations: int      # distinct stock combinations among the latest reports
    colours_varied: int  # colours seen both in stock and absent
    slots_varied: int = 0  # slots seen both empty and occupied (the per-slot model places the rack from them)

    @property
    def ready(self) -> bool:
        # The per-slot model (trained whenever reports carry slots) recognises a colour it never
        # saw stored and places the rack from the slots that changed, so it need not wait for
        # every colour to come and go (the simulator may take 6 minutes to store a red piece).
        return (self.frames >= BOOTSTRAP_MIN_FRAMES and self.situations >= BOOTSTRAP_MIN_SITUATIONS
                and (self.colours_varied == len(COLOURS) or self.slots_varied >= BOOTSTRAP_MIN_SLOTS_VARIED))

    def describe(self) -> str:
        return (f"{self.frames} frames, {self.situations} distinct stock situations, {self.colours_varied} of "
                f"{len(COLOURS)} colours seen both in stock and absent (need {BOOTSTRAP_MIN_FRAMES}, "
                f"{BOOTSTRAP_MIN_SITUATIONS} and {len(COLOURS)}), {self.slots_varied} slots seen both empty "
                f"and occupied (or {BOOTSTRAP_MIN_SLOTS_VARIED})")


def bootstrap_readiness(fdb) -> Readiness:
    """Whether the factory has shown enough frames and stock situations for a first model."""
    situations, seen, filled = set(), {c: set() for c in COLOURS}, {}
    for msg in (fdb.mqtt.find({"topic": STOCK_TOPIC}, {"payload.stockItems": 1}).sort("ts", -1)
                .limit(BOOTSTRAP_REPORTS_SCANNED)):
        slots = stock_slots(msg.get("payload"))
        present = reported_presence(slots)
        situations.add(tuple(sorted(slots.items(), key=lambda kv: kv[0])))  # per-slot stock situations
        for c, v in present.items():
            seen[c].add(v)
        for s, t in slots.items():
            filled.setdefault(s, set()).add(t is not None)
    return Readiness(fdb.frames.estimated_document_count(), len(situations),
                     sum(len(v) == 2 for v in seen.values()), sum(len(v) == 2 for v in filled.values()))
