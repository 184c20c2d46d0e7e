"""The fleet at a glance: what ``GET /api/fleet`` answers and the page ``/fleet`` shows.

For every factory (each twin document, each factory of ``storage.factories``, and the API's
default factories):

* ``twin``: its version, when it last changed and how long ago;
* ``model``: the model version behind the twin's camera view (``observed``);
* ``agreement``: vision/controller agreement over the last hour (:data:`WINDOW_S`): the share
  of the time the twin had a camera view during which it flagged **no** disagreement between
  the camera and the controller (its ``delta`` was empty). Disagreements held back while the
  crane moves (``in_transit``) and flickers shorter than the twin's persistence rule never
  enter ``delta`` (docs/twin.md), so they do not count against it. ``flags``: how many
  disagreements were flagged in the hour. ``null`` before the factory's first camera
  observation;
* ``frame``: its newest camera frame and its age (by ``received_at``, our clock);
* ``faults``: the stations whose reported state is an error code (``reported.stations``);
* ``orders``: our orders in progress (the twin's ``orders``) and the controller's own order
  state (``reported.order``); ``clock``: the controller's clock offset.

What it reads, per refresh (at most every :data:`REFRESH_S`, whatever the number of viewers),
all of it index ranges that start with ``factory_id`` and are bounded by what arrived, never
by the history (proved by the explain tests in ``storage/test_hot_paths.py``):

* the twin documents and the ``factories`` documents: one small document per factory each
  (``_id`` is the factory id);
* ``twin_history`` ``{factory_id, at >= t}`` (index ``factory_at``): the first time the last
  hour and :data:`LOOKBACK_S` before it, then only what was appended since (a little overlap:
  a writer stamps ``at`` a moment before it appends);
* ``factory_camera`` ``{factory_id, seq in (a, b]}`` (index ``factory_seq``): the frames that
  arrived since the last look; the first time, slabs of the newest seqs (:data:`FRAME_SLABS`),
  newest first, until one holds a frame of that factory;
* ``inferences`` ``{factory_id, frame_ts in [t - 30 s, t]}`` (index ``factory_frame_ts``), once
  per factory: whether the camera was being read at the start of the window.

The state between refreshes (the hour's history entries, the newest frame) is kept in memory
per factory: a few hundred small tuples each.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from factory_assets.vocabulary import utcnow

logger = logging.getLogger(__name__)

WINDOW_S = 3600.0  # agreement over the last hour
LOOKBACK_S = 600.0  # history read before the window, for the state the window starts in
LATE_S = 30.0  # re-read this much history before the last read: entries appended late
VISION_PROBE_S = 30.0  # an inference this close before the window's start: the camera was being read
REFRESH_S = 2.0  # the summary is recomputed at most this often
FRAME_SLABS = (64, 512, 4096, 32768)  # newest seqs looked through for a factory's first known frame
FRAME_RECHECK_S = 60.0  # after this long without a look, search the slabs again (not every frame since)
VISION_KINDS = ("observed", "discrepancy")
LIVE_ORDER_STATES = ("queued", "sent", "ordered", "in_process")
CONTROLLER_IDLE = ("WAITING_FOR_ORDER", "")

TWIN_PROJECTION = {"version": 1, "updated_at": 1, "observed.model_version": 1, "observed.frame_ts": 1,
                   "observed.updated_at": 1, "observed.source": 1, "reported.stations": 1, "reported.order": 1,
                   "reported.ts": 1, "orders": 1, "delta": 1, "clock.offset_s": 1, "in_transit.active": 1}
HISTORY_PROJECTION = {"_id": 0, "version": 1, "at": 1, "kind": 1, "delta": 1, "flagged": 1, "cleared": 1}
FRAME_PROJECTION = {"_id": 1, "seq": 1, "ts": 1, "received_at": 1, "camera_id": 1}


@dataclass(frozen=True)
class Entry:
    """One ``twin_history`` entry as the agreement needs it."""

    at: datetime
    version: int
    disagree: bool  # the twin flagged a disagreement after this entry (``delta`` not empty)
    flagged: bool  # this entry flagged a new disagreement
    vision: bool  # written by a camera observation
    disagree_before: bool  # the state just before it (from its flagged/cleared lists)


@dataclass(frozen=True)
class Agreement:
    share: float  # 0..1 of ``covered_s`` without a flagged disagreement
    covered_s: float  # the part of the window the twin had a camera view
    disagreeing_s: float
    flags: int  # disagreements flagged in the window

    def to_json(self) -> dict:
        return {"share": round(self.share, 4), "covered_s": round(self.covered_s, 1),
                "disagreeing_s": round(self.disagreeing_s, 1), "flags": self.flags}


def flagged_keys(delta) -> list[str]:
    delta = delta if isinstance(delta, dict) else {}
    return [k for k in delta if k != "slots"] + list((delta.get("slots") or {}) if isinstance(delta.get("slots"),
                                                                                                dict) else [])


def entry_from(doc: dict) -> Entry | None:
    at, version = doc.get("at"), doc.get("version")
    if not isinstance(at, datetime) or not isinstance(version, int) or isinstance(version, bool):
        return None
    after = set(flagged_keys(doc.get("delta")))
    flagged = [k for k in doc.get("flagged") or [] if isinstance(k, str)]
    cleared = [k for k in doc.get("cleared") or [] if isinstance(k, str)]
    before = (after - set(flagged)) | set(cleared)
    return Entry(at, version, bool(after), bool(flagged), doc.get("kind") in VISION_KINDS, bool(before))


def agreement(entries: list[Entry], *, start: datetime, end: datetime, vision_since: datetime | None,
              current_disagree: bool = False) -> Agreement | None:
    """Vision/controller agreement over ``[start, end]`` from the twin's history ``entries``
    (any order; those before ``start`` give the state it starts in). Only the time since
    ``vision_since`` (the camera's first observation) counts; None when there is none in the
    window. Without any entry the twin's ``current_disagree`` held throughout."""
    if vision_since is None:
        return None
    lo = max(start, vision_since)
    if lo >= end:
        return None
    entries = sorted(entries, key=lambda e: (e.at, e.version))
    before = [e for e in entries if e.at <= lo]
    inside = [e for e in entries if lo < e.at <= end]
    if before:
        state = before[-1].disagree
    elif inside:
        state = inside[0].disagree_before
    else:
        state = current_disagree
    t, disagreeing = lo, 0.0
    for e in inside:
        if state:
            disagreeing += (e.at - t).total_seconds()
        t, state = e.at, e.disagree
    if state:
        disagreeing += (end - t).total_seconds()
    covered = (end - lo).total_seconds()
    flags = sum(1 for e in entries if e.flagged and start <= e.at <= end)
    return Agreement(max(0.0, 1.0 - disagreeing / covered), covered, disagreeing, flags)


@dataclass
class _Factory:
    entries: list[Entry] = field(default_factory=list)
    versions: set = field(default_factory=set)
    read_until: datetime | None = None
    vision_since: datetime | None = None
    vision_probed: bool = False
    frame: dict | None = None
    frame_looked: float | None = None  # monotonic time of the last look at its frames


def natural_key(factory_id: str):
    """``factory-2`` before ``factory-10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", factory_id)]


class FleetView:
    """The fleet summary, kept current incrementally (see the module's docstring). Thread-safe."""

    def __init__(self, fdb, *, default_factories=(), window_s: float = WINDOW_S, lookback_s: float = LOOKBACK_S,
                 refresh_s: float = REFRESH_S):
        self.fdb = fdb
        self.default_factories = tuple(default_factories)
        self.window = timedelta(seconds=window_s)
        self.lookback = timedelta(seconds=lookback_s)
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._factories: dict[str, _Factory] = {}
        self._cached: dict | None = None
        self._cached_at = -float("inf")

    def summary(self, now: datetime | None = None) -> dict:
        """``{"now", "window_s", "factories": [...]}`` (cached for ``refresh_s``; ``now`` forces a refresh)."""
        from factory_assets.storage.frames import FrameSequence

        with self._lock:
            mono = time.monotonic()
            if now is None and self._cached is not None and mono - self._cached_at < self.refresh_s:
                return self._cached
            now = now or utcnow()
            from factory_assets.storage.factories import known_factories

            twins = {d["_id"]: d for d in self.fdb.twin.find({}, TWIN_PROJECTION) if isinstance(d.get("_id"), str)}
            # the factories heard of (one small document each), also those without a twin yet
            ids = sorted(set(twins) | set(known_factories(self.fdb)) | set(self.default_factories), key=natural_key)
            horizon = FrameSequence(self.fdb).horizon()
            rows = [self._row(fid, twins.get(fid), now, horizon, mono) for fid in ids]
            self._cached = {"now": now.isoformat().replace("+00:00", "Z"), "window_s": self.window.total_seconds(),
                            "factories": rows}
            self._cached_at = mono
            return self._cached

    # -- one factory -----------------------------------------------------------------------------
    def _row(self, fid: str, twin: dict | None, now: datetime, horizon: int, mono: float) -> dict:
        from factory_assets.api.hub import to_json

        st = self._factories.setdefault(fid, _Factory())
        twin = twin or {}
        observed = twin.get("observed") or {}
        reported = twin.get("reported") or {}
        offset = ((twin.get("clock") or {}).get("offset_s")) or 0.0
        start = now - self.window
        self._read_history(fid, st, start, now)
        self._find_vision(fid, st, twin, start, float(offset))
        self._look_at_frames(fid, st, horizon, mono)
        agreed = agreement(st.entries, start=start, end=now, vision_since=st.vision_since,
                           current_disagree=bool(flagged_keys(twin.get("delta")))) if observed else None
        updated = twin.get("updated_at")
        frame = None
        if st.frame is not None:
            seen = st.frame.get("received_at")
            if not isinstance(seen, datetime) and isinstance(st.frame.get("ts"), datetime):
                seen = st.frame["ts"] - timedelta(seconds=float(offset))
            frame = to_json({**{k: v for k, v in st.frame.items() if k != "_id"}, "id": st.frame["_id"],
                             "url": f"/api/frames/{st.frame['_id']}.jpg",
                             "age_s": _age(now, seen)})
        stations = reported.get("stations") or {}
        faults = [{"station": name, "code": s.get("code"), "meaning": s.get("meaning"),
                   "description": s.get("description") or "",  # since: the controller's ts, in our clock
                   "since": s["ts"] - timedelta(seconds=float(offset)) if isinstance(s.get("ts"), datetime) else None}
                  for name, s in sorted(stations.items()) if isinstance(s, dict) and s.get("fault")]
        ours = [{"id": e.get("id"), "type": e.get("type"), "state": e.get("state")}
                for e in twin.get("orders") or [] if isinstance(e, dict) and e.get("state") in LIVE_ORDER_STATES]
        controller = reported.get("order") if isinstance(reported.get("order"), dict) else None
        busy = bool(controller and (controller.get("state") or "") not in CONTROLLER_IDLE)
        in_work = any(o["state"] in ("ordered", "in_process") for o in ours)
        return to_json({
            "id": fid, "link": f"/?factory={fid}",
            "twin": {"version": twin.get("version"), "updated_at": updated, "age_s": _age(now, updated)}
            if twin else None,
            "model": {"version": observed.get("model_version"), "source": observed.get("source"),
                      "frame_ts": observed.get("frame_ts")} if observed.get("model_version") else None,
            "agreement": agreed.to_json() if agreed else None,
            "disagreeing_now": bool(flagged_keys(twin.get("delta"))),
            "crane_moving": bool((twin.get("in_transit") or {}).get("active")),
            "frame": frame,
            "faults": faults,
            "orders": {"in_progress": len(ours) + (1 if busy and not in_work else 0), "ours": ours,
                       "controller": controller if busy else None},
            "clock": {"offset_s": (twin.get("clock") or {}).get("offset_s")} if twin.get("clock") else None,
        })

    def _read_history(self, fid: str, st: _Factory, start: datetime, now: datetime) -> None:
        keep_from = start - self.lookback
        since = keep_from if st.read_until is None else max(keep_from, st.read_until - timedelta(seconds=LATE_S))
        for doc in self.fdb.twin_history.find({"factory_id": fid, "at": {"$gte": since, "$lte": now}},
                                              HISTORY_PROJECTION):
            entry = entry_from(doc)
            if entry is not None and entry.version not in st.versions:
                st.entries.append(entry)
                st.versions.add(entry.version)
        st.read_until = now
        st.entries.sort(key=lambda e: (e.at, e.version))
        older = [e for e in st.entries if e.at < keep_from]
        if older:  # keep the newest entry before the kept span: the state the span starts in
            st.entries = older[-1:] + [e for e in st.entries if e.at >= keep_from]
            st.versions = {e.version for e in st.entries}

    def _find_vision(self, fid: str, st: _Factory, twin: dict, start: datetime, offset_s: float) -> None:
        if st.vision_since is not None or not twin.get("observed"):
            return
        if not st.vision_probed:
            st.vision_probed = True
            at = start + timedelta(seconds=offset_s)  # frame_ts is in the controller's clock
            if self.fdb.inferences.find_one({"factory_id": fid, "frame_ts": {
                    "$gte": at - timedelta(seconds=VISION_PROBE_S), "$lte": at}}, {"_id": 1}) is not None:
                st.vision_since = start
                return
        first = next((e.at for e in st.entries if e.vision), None)
        st.vision_since = first or utcnow()

    def _look_at_frames(self, fid: str, st: _Factory, horizon: int, mono: float) -> None:
        if horizon <= 0:
            return
        frames = self.fdb.frames
        known = st.frame is not None and isinstance(st.frame.get("seq"), int)
        if known and st.frame_looked is not None and mono - st.frame_looked < FRAME_RECHECK_S:
            docs = list(frames.find({"factory_id": fid, "seq": {"$gt": st.frame["seq"], "$lte": horizon}},
                                    FRAME_PROJECTION)) if horizon > st.frame["seq"] else []
        else:
            docs, hi = [], horizon
            for span in FRAME_SLABS:
                lo = max(0, horizon - span)
                if known:
                    lo = max(lo, st.frame["seq"])
                if lo >= hi:
                    break
                docs = list(frames.find({"factory_id": fid, "seq": {"$gt": lo, "$lte": hi}}, FRAME_PROJECTION))
                if docs:
                    break
                hi = lo
        st.frame_looked = mono
        newest = max(docs, key=lambda d: d["seq"], default=None)
        if newest is not None and (st.frame is None or newest["seq"] > st.frame.get("seq", -1)):
            st.frame = newest


def _age(now: datetime, then) -> float | None:
    if not isinstance(then, datetime):
        return None
    return round(max(0.0, (now - then).total_seconds()), 1)
