"""When the deployed model should be (re)trained: the drift metric and the bootstrap readiness.

Drift compares the deployed model's latest inferences with the stock the factory's
controller reported (``f/i/stock``) at each frame's time: the controller is the
ground truth the auto-labels come from, so a model that disagrees with it on many
recent frames has met stock situations it never saw. Only *stable* frames are compared: the
warehouse reports a change before its crane moves, so a frame from ``STABLE_MARGIN_S`` before
a reported change to the settle time after it (``FACTORY_SETTLE_S``, default 25 s) may show
the old rack, and counting it would call the crane's travel drift. A per-slot model is
compared slot by slot (the share of slot readings that differ), a presence model on colour
presence; each frame with its own factory's reports.

Bootstrap readiness asks whether the frames a first training run would label now can train a
model worth deploying: it replays the auto-label rule (``datasets.autolabel.stable_spans``:
outside every change's settle time, up to where the factory was heard) and the dataset's
split (``datasets.manifests``: whole stock situations, the 2nd, 7th... to validation), and
waits until the *train* situations show slots both empty and occupied in two rows and two
columns, or one of them holds pieces in two rows and two columns (the per-slot model places the
rack from either: ``vision.slots.SlotGeometry.fit``), or every colour both in stock and
absent (a presence model), with validation frames to check it on. Judging the reports alone
trained presence models on a handful of frames whose changes lay in the settle time or only
in validation, and drift replaced them minutes later. Each camera of a factory gets its own first
model, so readiness is counted on that camera's frames (a camera added to a factory that has its
models included); the stock reports are its factory's.
"""
from __future__ import annotations

import logging
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from datetime import datetime, timedelta

from factory_assets.twin.state import COLOURS, SLOTS, observed_slots, reported_presence, stock_slots
from factory_assets.vocabulary import DEFAULT_CAMERA_ID, DEFAULT_FACTORY_ID, STOCK_TOPIC

logger = logging.getLogger(__name__)

DRIFT_WINDOW = 100            # latest inferences compared with the controller's stock reports
DRIFT_MAX_DISAGREEMENT = 0.2  # above this share, retrain on the newer labelled frames
BOOTSTRAP_MIN_TRAIN_FRAMES = 24  # labelled train frames the first model needs (12 s at 2 frames/s)
BOOTSTRAP_MIN_SITUATION_FRAMES = 4  # a situation counts with this many labelled frames (2 s at 2 fps)
BOOTSTRAP_REPORTS_SCANNED = 500  # the newest stock reports read
BOOTSTRAP_FRAMES_COUNTED = 1000  # frames read per stretch when counting them (enough to decide)
STABLE_MARGIN_S = 2.0         # a frame this close before a reported stock change is not compared
LOOKBACK_FACTOR = 4           # inferences read to find the latest DRIFT_WINDOW stable ones
FACTORY_TS = [("factory_id", 1), ("ts", 1)]  # the frames index of a factory's time range (storage.indexes)


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
                            settle_s: float | None = None, factory_id: str | None = None) -> Disagreement:
    """How often the latest ``n`` inferences of ``model_version`` differ from the stock
    *their own factory's* controller reported at that frame's time, on stable frames (none
    from ``STABLE_MARGIN_S`` before a reported change of that factory to ``settle_s`` after
    it): slot by slot when the inferences and the reports carry slots, colour presence otherwise.
    ``factory_id``: that factory's inferences only (a model deployed for it; read by the
    ``factory_frame_ts`` index, factory first)."""
    from factory_assets.config import settle_seconds

    settle = timedelta(seconds=settle_seconds() if settle_s is None else settle_s)
    margin = timedelta(seconds=STABLE_MARGIN_S)
    # the newest n *stable* ones, from a bounded look back (frames in transit are passed over)
    query: dict = {"model_version": model_version}
    if factory_id is not None:
        query = {"factory_id": factory_id, **query}
    recent = list(fdb.inferences.find(query, {"frame_ts": 1, "present": 1, "slots": 1, "factory_id": 1})
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
class Situation:
    """A stock situation the first dataset will hold: a factory's reported rack, how many of its
    frames are labelled (stable and heard, as ``auto_label`` labels them) and the split
    ``training_manifests`` puts it in."""
    slots: dict
    frames: int
    split: str


@dataclass(frozen=True)
class Readiness:
    train_frames: int
    valid_frames: int
    situations: int        # situations with at least BOOTSTRAP_MIN_SITUATION_FRAMES labelled frames
    colours_varied: int    # colours both in stock and absent among the train situations
    slots_varied: tuple = ()  # slots both empty and occupied among the train situations
    slots_held: tuple = ()  # the occupied slots of the train situation whose pieces span the most rows x columns

    @property
    def frames(self) -> int:
        return self.train_frames + self.valid_frames

    @property
    def placed(self) -> bool:
        """The per-slot model can place the rack (``vision.slots.SlotGeometry.fit``): the slots that
        changed state span two rows and two columns, or the pieces of one train situation do (the
        rack placed from where each reported colour shows) and some train slot is empty."""
        return _spans(self.slots_varied) or (_spans(self.slots_held) and len(self.slots_held) < len(SLOTS))

    @property
    def model(self) -> str | None:
        """The model the first training run can make: ``slots`` (preferred), ``presence`` (every
        colour came and went, the rack cannot be placed yet), or None."""
        if self.placed:
            return "slots"
        return "presence" if self.colours_varied == len(COLOURS) else None

    @property
    def ready(self) -> bool:
        # The per-slot model (trained whenever reports carry slots) recognises a colour it never
        # saw stored and places the rack from the slots that changed; a first presence model only
        # when every colour came and went. Both need frames of train and of validation situations.
        return (self.train_frames >= BOOTSTRAP_MIN_TRAIN_FRAMES and self.valid_frames > 0
                and self.model is not None)

    def describe(self) -> str:
        varied = ", ".join(self.slots_varied) or "none"
        held = ", ".join(self.slots_held) or "none"
        return (f"{self.train_frames} labelled train frames (need {BOOTSTRAP_MIN_TRAIN_FRAMES}) and "
                f"{self.valid_frames} validation frames in {self.situations} stock situations; slots seen "
                f"both empty and occupied: {varied}; pieces of one situation: {held} (the per-slot model "
                f"needs either in two rows and two columns); "
                f"{self.colours_varied} of {len(COLOURS)} colours seen both in stock and absent")


def _spans(slots) -> bool:
    """Slots (``'B3'``...) in at least two rows and two columns."""
    return len({s[0] for s in slots}) >= 2 and len({s[1] for s in slots}) >= 2


def readiness_of(situations: list) -> Readiness:
    """What a first dataset of these :class:`Situation` s can train (pure: the benchmark uses it too)."""
    counted = [s for s in situations if s.frames >= BOOTSTRAP_MIN_SITUATION_FRAMES]
    train = [s for s in counted if s.split == "train"]
    filled: dict = {}
    seen = {c: set() for c in COLOURS}
    for s in train:
        for slot in SLOTS:
            filled.setdefault(slot, set()).add(s.slots.get(slot) is not None)
        for c, v in reported_presence(s.slots).items():
            seen[c].add(v)
    held = [tuple(slot for slot in SLOTS if s.slots.get(slot) is not None) for s in train]
    return Readiness(sum(s.frames for s in train), sum(s.frames for s in counted if s.split == "valid"),
                     len(counted), sum(len(v) == 2 for v in seen.values()),
                     tuple(slot for slot in SLOTS if len(filled.get(slot, ())) == 2),
                     max(held, key=lambda h: (_spans(h), len({x[0] for x in h}) * len({x[1] for x in h})),
                         default=()))


def planned_splits(keys: list, known: dict, counter: int) -> dict:
    """situation key -> split as ``datasets.manifests`` will assign it: a known one keeps its
    split, a new one (in order of first appearance) takes the next number, and the 2nd, 7th...
    goes to validation. Pure."""
    from factory_assets.datasets.manifests import VALID_EVERY

    out = {}
    for key in keys:
        if key in known:
            out[key] = known[key]
            continue
        counter += 1
        out[key] = "valid" if counter % VALID_EVERY == 2 % VALID_EVERY else "train"
    return out


def situation_key(slots: dict) -> str:
    from factory_assets.datasets.manifests import situation_of

    return situation_of({"slots": slots, "present": reported_presence(slots)})


def _camera_filter(camera_id: str | None) -> dict:
    """The frames of one camera (the default camera's stored without an id too); all cameras when None."""
    if camera_id is None:
        return {}
    return {"camera_id": {"$in": [camera_id, None]} if camera_id == DEFAULT_CAMERA_ID else camera_id}


def _frames_between(fdb, factory_id, lo, hi, camera_id: str | None = None) -> int:
    """Frames of the factory (of its camera ``camera_id`` when given) with lo < ts < hi: an index
    range of that factory (``factory_ts``, hinted: SecantusDB plans a collection scan once the camera
    is a filter beside it; the default factory's frames stored without an id too), at most
    ``BOOTSTRAP_FRAMES_COUNTED``. With a camera it examines the factory's frames of the range, every
    camera's (no frames index leads with factory and camera; a factory has a few cameras)."""
    owners = [factory_id, None] if factory_id == DEFAULT_FACTORY_ID else [factory_id]
    n = 0
    for owner in owners:
        query = {"factory_id": owner, "ts": {"$gt": lo, "$lt": hi}, **_camera_filter(camera_id)}
        n += len(list(fdb.frames.find(query, {"_id": 1}).hint(FACTORY_TS).limit(BOOTSTRAP_FRAMES_COUNTED - n)))
        if n >= BOOTSTRAP_FRAMES_COUNTED:
            break
    return n


def bootstrap_situations(fdb, settle_s: float | None = None, factory_id: str | None = None,
                         camera_id: str | None = None) -> list:
    """The stock situations a first dataset would hold now, in order of first appearance: per
    factory (``factory_id``: that one only, its reports read by ``factory_topic_ts``), the
    stretches ``auto_label`` labels (``datasets.autolabel.stable_spans``: outside every change's
    settle time, up to where the factory was heard) with the frames stored in them (``camera_id``:
    that camera's only, as its own dataset would hold them), and the split each goes to
    (``dataset_situations`` as stored, new ones numbered on)."""
    from factory_assets.config import settle_seconds
    from factory_assets.datasets.autolabel import heard_until, stable_spans
    from factory_assets.datasets.manifests import SITUATIONS_COLLECTION, _situation_id
    from factory_assets.storage.frames import frame_ts, latest_frame
    from factory_assets.storage.ranges import newest_by_time

    settle_s = settle_seconds() if settle_s is None else settle_s
    margin = timedelta(seconds=STABLE_MARGIN_S)
    projection = {"ts": 1, "payload": 1, "factory_id": 1}
    # the newest reports as time ranges back from now (storage.ranges), not "sorted, limit n" over every one
    if factory_id is None:
        newest = newest_by_time(fdb.mqtt, {"topic": STOCK_TOPIC}, BOOTSTRAP_REPORTS_SCANNED, projection=projection)
    else:  # this factory's and those of no factory (another tool's), each an index range (factory_topic_ts)
        newest = sorted((m for fid in (factory_id, None) for m in newest_by_time(
            fdb.mqtt, {"factory_id": fid, "topic": STOCK_TOPIC}, BOOTSTRAP_REPORTS_SCANNED, projection=projection)),
            key=lambda m: m["ts"], reverse=True)[:BOOTSTRAP_REPORTS_SCANNED]
    by_factory: dict = {}
    for msg in newest:
        if isinstance(msg.get("payload"), dict) and isinstance(msg.get("ts"), datetime):
            by_factory.setdefault(msg.get("factory_id"), []).append((msg["ts"], stock_slots(msg["payload"])))
    shared = by_factory.pop(None, [])  # reports of no factory (another tool) count for every factory
    spans = []
    if factory_id is not None:
        factories = [factory_id] if by_factory or shared else []
    else:
        factories = sorted(by_factory) or ([DEFAULT_FACTORY_ID] if shared else [])
    for factory_id in factories:
        reports = sorted(by_factory.get(factory_id, []) + shared, key=lambda r: r[0])
        newest = latest_frame(fdb, {"ts": 1}, factory_id=factory_id)
        if newest is None:
            continue
        until = heard_until(fdb, factory_id, reports[0][0], frame_ts(newest) + margin, frame_ts(newest))
        for lo, hi, slots in stable_spans(reports, until, settle_s=settle_s, margin_s=STABLE_MARGIN_S):
            n = _frames_between(fdb, factory_id, lo, hi, camera_id)
            if n:
                spans.append((lo, slots, n))
    spans.sort(key=lambda sp: sp[0])
    keys = list(dict.fromkeys(situation_key(slots) for _, slots, _ in spans))
    coll = fdb.db[SITUATIONS_COLLECTION]
    ids = {_situation_id(k): k for k in keys}
    known = {ids[d["_id"]]: d["split"] for d in coll.find({"_id": {"$in": list(ids)}}, {"split": 1})}
    counter = (coll.find_one({"_id": "__counter__"}) or {}).get("n", 0)
    splits = planned_splits(keys, known, counter)
    merged: dict = {}
    for _, slots, n in spans:
        key = situation_key(slots)
        merged[key] = Situation(slots, merged[key].frames + n if key in merged else n, splits[key])
    return list(merged.values())


def bootstrap_readiness(fdb, settle_s: float | None = None, factory_id: str | None = None,
                        camera_id: str | None = None) -> Readiness:
    """Whether the labelled frames a first training run would have now can train a model worth
    deploying (see :class:`Readiness`): judged on the stretches auto-labels will label and the
    splits the dataset will use, not on the reports alone (a slot whose change lies in the
    settle time, or only in validation, places nothing). ``factory_id``: that factory's first
    model (every factory has its own); ``camera_id``: that camera's first model, counted on its
    own frames (every camera has its own dataset and model)."""
    return readiness_of(bootstrap_situations(fdb, settle_s, factory_id, camera_id))
