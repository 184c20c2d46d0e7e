"""The digital twin's state model (pure: no MongoDB, no Dagster).

In the style of AWS IoT Device Shadow / Eclipse Ditto:
``observed`` comes from vision (per colour presence and probability, with the
frame and model it came from; with a per-slot model also ``slots``: per slot the
workpiece type seen and its probability), ``reported`` from the factory controller's
``f/i/stock`` (per slot A1..C3), and ``delta`` lists where they disagree (per colour, and per slot under
``delta.slots`` with a sentence such as "controller says A2 holds RED, camera sees it empty").

Two rules keep ``delta`` to what a person should act on (``assess``, ``TwinRules``):

- *settle*: the warehouse reports its new stock before the crane moves, so for ``settle_s``
  after a reported change (and for any frame older than the change) a disagreement is marked
  ``in_transit`` (``in_transit.slots`` / ``in_transit.colours``), not a discrepancy;
- *persistence*: outside that window a disagreement enters ``delta`` only once the same
  disagreement was seen on ``persist_frames`` consecutive frames spanning ``persist_s`` seconds;
  a one-frame flicker never does. The running count is kept in ``metadata.disagreement``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from factory_assets.vocabulary import (COLOURS, DEFAULT_SETTLE_S, SLOTS, TYPE_TO_COLOUR, parse_ts, reported_presence,
                                       stock_slots)

__all__ = ["COLOURS", "SLOTS", "TYPE_TO_COLOUR", "Assessment", "Observation", "Reported", "TwinRules", "assess",
           "compute_delta", "observed_slots", "reported_from_stock", "reported_presence", "slot_delta", "stock_slots"]

DEFAULT_PERSIST_FRAMES = 3   # a disagreement is flagged once seen on this many consecutive frames...
DEFAULT_PERSIST_S = 2.0      # ...spanning at least this many seconds


@dataclass(frozen=True)
class TwinRules:
    """When a vision/controller disagreement is held back (see the module's docstring)."""

    settle_s: float = DEFAULT_SETTLE_S
    persist_frames: int = DEFAULT_PERSIST_FRAMES
    persist_s: float = DEFAULT_PERSIST_S

    def __post_init__(self):
        for name in ("settle_s", "persist_frames", "persist_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TwinRules.{name} must be >= 0, not {getattr(self, name)!r}")

    @classmethod
    def from_env(cls, **overrides) -> "TwinRules":
        """``FACTORY_SETTLE_S``, ``FACTORY_DISAGREEMENT_FRAMES``, ``FACTORY_DISAGREEMENT_S``
        (read when called); ``overrides`` that are not None win."""
        from factory_assets.config import env_number as _env_number, settle_seconds

        values = {"settle_s": settle_seconds(),
                  "persist_frames": _env_number("FACTORY_DISAGREEMENT_FRAMES", DEFAULT_PERSIST_FRAMES, int),
                  "persist_s": _env_number("FACTORY_DISAGREEMENT_S", DEFAULT_PERSIST_S)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass(frozen=True)
class Observation:
    factory_id: str
    frame_id: object
    frame_ts: datetime
    model_version: str
    probabilities: dict
    present: dict
    thresholds: dict
    source: str = "live"  # live | batch | schedule
    frame_seq: int | None = None
    slots: dict | None = None  # per-slot model: slot -> {"state", "type", "probability"}

    def __post_init__(self):
        if self.slots is not None:  # stored in the shape the twin shows, whatever the source gave
            object.__setattr__(self, "slots", observed_slots(self.slots))

    @classmethod
    def from_inference(cls, doc: dict, source: str | None = None) -> "Observation":
        return cls(factory_id=doc.get("factory_id") or "factory-1", frame_id=doc["frame_id"],
                   frame_ts=doc["frame_ts"], model_version=doc["model_version"],
                   probabilities=doc["probabilities"], present=doc["present"], thresholds=doc["thresholds"],
                   source=source or doc.get("source", "batch"), frame_seq=doc.get("frame_seq"),
                   slots=doc.get("slots"))


@dataclass(frozen=True)
class Reported:
    factory_id: str
    ts: datetime
    slots: dict  # slot -> "BLUE" | "RED" | "WHITE" | None
    message_id: str | None = None

    @property
    def present(self) -> dict:
        return reported_presence(self.slots)




def reported_from_stock(payload: dict, ts: datetime, factory_id: str = "factory-1",
                        message_id: str | None = None) -> Reported:
    """A ``f/i/stock`` payload -> the controller's reported stock."""
    return Reported(factory_id, ts, stock_slots(payload), message_id)




def observed_slots(slots: dict | None) -> dict | None:
    """A per-slot model's answer (slot -> ``{"state": "empty"|"blue"|..., "probability": p}``,
    or slot -> ``"BLUE"``/None) -> slot -> ``{"type": "BLUE"|...|None, "probability": p}``."""
    if not slots:
        return None
    out = {}
    for slot in SLOTS:
        v = slots.get(slot)
        if isinstance(v, dict):
            kind = v.get("type")
            if kind is None and v.get("state") not in (None, "empty"):
                kind = str(v["state"]).upper()
            out[slot] = {"type": kind, "probability": float(v.get("probability", 1.0))}
        else:
            out[slot] = {"type": str(v).upper() if v else None, "probability": 1.0}
    return out


def _says(kind: str | None) -> str:
    return f"holds {kind}" if kind else "is empty"


def _sees(kind: str | None) -> str:
    return f"sees {kind} in it" if kind else "sees it empty"


def slot_delta(observed: dict | None, reported_slots: dict | None) -> dict:
    """Slots where the camera and the controller disagree, each with a sentence a warehouse
    person can act on: ``controller says A2 holds RED, camera sees it empty``."""
    if not observed or not reported_slots:
        return {}
    out = {}
    for slot in SLOTS:
        if slot not in observed or slot not in reported_slots:
            continue
        seen, said = observed[slot].get("type"), reported_slots.get(slot)
        if seen != said:
            out[slot] = {"observed": seen, "reported": said, "probability": observed[slot].get("probability"),
                         "message": f"controller says {slot} {_says(said)}, camera {_sees(seen)}"}
    return out


def compute_delta(observed_present: dict | None, reported_present: dict | None,
                  observed_slots: dict | None = None, reported_slots: dict | None = None) -> dict:
    """Colours where vision and the controller disagree; with a per-slot observation,
    ``slots`` lists the slots that disagree (see ``slot_delta``)."""
    if not observed_present or not reported_present:
        return {}
    out = {c: {"observed": observed_present[c], "reported": reported_present[c]}
           for c in COLOURS if observed_present.get(c) != reported_present.get(c)}
    slots = slot_delta(observed_slots, reported_slots)
    if slots:
        out["slots"] = slots
    return out


@dataclass(frozen=True)
class Assessment:
    delta: dict       # the disagreements to act on: persisting, outside the settle window
    in_transit: dict  # {"active", "changed_at", "until", "settle_s", "colours", "slots"}
    tracking: dict    # metadata.disagreement: {"colours": {c: entry}, "slots": {s: entry}}, entry =
    # {"observed", "reported", "since" (first frame's ts), "last" (latest frame's ts), "frames"}


def _ts(value):
    return None if value is None else parse_ts(value)


def assess(observed: dict | None, reported: dict | None, tracking: dict | None, *, new_frame: bool,
           rules: TwinRules) -> Assessment:
    """Sort the disagreements between the twin's ``observed`` and ``reported`` sections into the
    flagged ``delta``, the ``in_transit`` ones and the ones still being watched.

    ``new_frame``: ``observed`` comes from a frame not counted yet (a new observation); a stock
    report re-assesses the frame already counted without counting it again."""
    observed, reported = observed or {}, reported or {}
    changed_at = _ts(reported.get("changed_at"))
    until = changed_at + timedelta(seconds=rules.settle_s) if changed_at is not None else None
    transit = {"active": False, "changed_at": changed_at, "until": until, "settle_s": rules.settle_s,
               "colours": {}, "slots": {}}
    frame_ts = _ts(observed.get("frame_ts"))
    observed_present = {c: observed[c]["present"] for c in COLOURS if c in observed} if observed else None
    if frame_ts is None or not observed_present or len(observed_present) < len(COLOURS):
        return Assessment({}, transit, {})
    raw = compute_delta(observed_present, reported.get("present"), observed.get("slots"), reported.get("slots"))
    raw_slots = raw.pop("slots", {})
    if until is not None and frame_ts < until:
        # the crane may still be moving (or the frame predates the report): nothing is flagged,
        # and nothing counts towards persistence
        return Assessment({}, {**transit, "active": True, "colours": raw, "slots": raw_slots}, {})
    before = tracking or {}
    new_tracking: dict = {"colours": {}, "slots": {}}
    delta: dict = {}
    for group, items in (("colours", raw), ("slots", raw_slots)):
        seen = before.get(group) or {}
        for key, item in items.items():
            old = seen.get(key)
            if old and old.get("observed") == item["observed"] and old.get("reported") == item["reported"]:
                entry = dict(old)
                if new_frame and _ts(old.get("last")) != frame_ts:
                    entry["frames"] = int(old.get("frames", 1)) + 1
                    entry["last"] = frame_ts
            else:
                entry = {"observed": item["observed"], "reported": item["reported"], "since": frame_ts,
                         "last": frame_ts, "frames": 1}
            new_tracking[group][key] = entry
            lasted = (_ts(entry["last"]) - _ts(entry["since"])).total_seconds()
            if entry["frames"] >= rules.persist_frames and lasted >= rules.persist_s:
                flagged = {**item, "since": entry["since"], "frames": entry["frames"]}
                if group == "slots":
                    delta.setdefault("slots", {})[key] = flagged
                else:
                    delta[key] = flagged
    return Assessment(delta, transit, new_tracking)


@dataclass
class TwinView:
    """A read-only view of the twin document for rendering and metadata."""

    factory_id: str
    version: int
    observed: dict = field(default_factory=dict)
    reported: dict = field(default_factory=dict)
    delta: dict = field(default_factory=dict)

    @classmethod
    def from_doc(cls, doc: dict) -> "TwinView":
        return cls(doc["_id"], doc.get("version", 0), doc.get("observed") or {}, doc.get("reported") or {},
                   doc.get("delta") or {})
