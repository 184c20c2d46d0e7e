"""The digital twin's state model (pure: no MongoDB, no Dagster).

In the style of AWS IoT Device Shadow / Eclipse Ditto:
``observed`` comes from vision (per colour presence and probability, with the
frame and model it came from; with a per-slot model also ``slots``: per slot the
workpiece type seen and its probability), ``reported`` from the factory controller's
``f/i/stock`` (per slot A1..C3), and ``delta`` lists where they disagree (per colour, and per slot under
``delta.slots`` with a sentence such as "controller says A2 holds RED, camera sees it empty").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from factory_assets.vocabulary import COLOURS, SLOTS, TYPE_TO_COLOUR, reported_presence, stock_slots

__all__ = ["COLOURS", "SLOTS", "TYPE_TO_COLOUR", "Observation", "Reported", "compute_delta", "observed_slots",
           "reported_from_stock", "reported_presence", "slot_delta", "stock_slots"]


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
