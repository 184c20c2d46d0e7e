"""Drift of a per-slot model is measured slot by slot against the controller's stock reports,
on stable frames only; a presence model keeps the colour-presence comparison. Real MongoDB
(the ``fdb`` fixture), inferences and reports stored as the platform stores them."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from factory_assets.twin.drift import DRIFT_WINDOW, controller_disagreement
from factory_assets.vocabulary import SLOTS, STOCK_TOPIC, reported_presence

T0 = datetime(2026, 11, 24, 8, 0, tzinfo=timezone.utc)
BEFORE = {s: None for s in SLOTS} | {"A1": "BLUE", "A2": "RED", "C3": "RED"}
AFTER = BEFORE | {"B2": "WHITE"}  # a white piece stored at T0 + 60 s


def report(fdb, ts: datetime, slots: dict, n: int) -> None:
    items = [{"location": s, "workpiece": {"type": t, "id": f"wp-{s}"} if t else None} for s, t in slots.items()]
    fdb.mqtt.insert_one({"topic": STOCK_TOPIC, "ts": ts, "factory_id": "factory-1", "message_id": f"stock-{n}",
                         "payload": {"ts": ts.isoformat(), "stockItems": items}})


def slot_answer(stock: dict) -> dict:
    """What the per-slot model answers for a rack holding ``stock`` (slot -> state)."""
    return {s: {"state": (t or "empty").lower(), "type": t, "probability": 0.95} for s, t in stock.items()}


def infer(fdb, i: int, ts: datetime, seen: dict, *, version: str = "slots-v1", with_slots: bool = True) -> None:
    doc = {"frame_id": f"frame-{i}", "frame_seq": i + 1, "frame_ts": ts, "camera_id": "cam-1",
           "factory_id": "factory-1", "model_version": version, "present": reported_presence(seen),
           "probabilities": {}, "thresholds": {}, "latency_ms": 1.0, "source": "live"}
    if with_slots:
        doc |= {"slots": slot_answer(seen), "model_kind": "slots"}
    fdb.inferences.insert_one(doc)


def test_a_per_slot_model_that_reads_the_rack_right_has_no_drift_and_skips_frames_around_a_change(fdb):
    report(fdb, T0, BEFORE, 1)
    report(fdb, T0 + timedelta(seconds=60), AFTER, 2)
    for i in range(1, 101):
        ts = T0 + timedelta(seconds=i)
        # around the change the camera may see either rack: here it still sees the old one
        infer(fdb, i, ts, AFTER if i > 62 else BEFORE)
    d = controller_disagreement(fdb, "slots-v1")
    assert d.basis == "slots"
    assert d.share == 0.0
    assert d.compared == 100 - 5  # frames at 58..62 s are within 2 s of the reported change


def test_a_wrong_slot_counts_per_slot_even_when_the_colours_agree(fdb):
    # the controller says A2 and C3 hold red; the camera sees red in C3 only: presence agrees
    report(fdb, T0, BEFORE, 1)
    seen = BEFORE | {"A2": None}
    for i in range(1, 41):
        infer(fdb, i, T0 + timedelta(seconds=i), seen)
    d = controller_disagreement(fdb, "slots-v1")
    assert d.basis == "slots" and d.compared == 40
    assert d.share == 1 / 9
    assert reported_presence(seen) == reported_presence(BEFORE)


def test_a_per_slot_model_wrong_on_three_slots_of_every_frame_has_drifted(fdb):
    report(fdb, T0, BEFORE, 1)
    seen = BEFORE | {"A1": None, "B1": "WHITE", "C3": "BLUE"}
    for i in range(1, DRIFT_WINDOW + 11):
        infer(fdb, i, T0 + timedelta(seconds=i), seen)
    d = controller_disagreement(fdb, "slots-v1")
    assert d.basis == "slots" and d.compared == DRIFT_WINDOW
    assert d.share == 3 / 9
    assert d.drifted


def test_a_presence_model_is_still_compared_on_colour_presence(fdb):
    report(fdb, T0, BEFORE, 1)
    report(fdb, T0 + timedelta(seconds=60), AFTER, 2)
    for i in range(1, 101):
        # a presence model that never notices the white piece
        infer(fdb, i, T0 + timedelta(seconds=i), BEFORE, version="presence-v1", with_slots=False)
    d = controller_disagreement(fdb, "presence-v1")
    assert d.basis == "presence"
    assert d.compared == 100
    assert d.share == 41 / 100  # frames at 60..100 s: white reported, not seen
