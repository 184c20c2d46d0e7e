"""Drift of a per-slot model is measured slot by slot against the controller's stock reports,
on stable frames only (none while the crane may still move after a reported change); a
presence model keeps the colour-presence comparison, on stable frames too. Real MongoDB
(the ``fdb`` fixture), inferences and reports stored as the platform stores them."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from factory_assets.twin.drift import DRIFT_WINDOW, controller_disagreement
from factory_assets.vocabulary import DEFAULT_SETTLE_S, SLOTS, STOCK_TOPIC, reported_presence

T0 = datetime(2026, 11, 24, 8, 0, tzinfo=timezone.utc)
BEFORE = {s: None for s in SLOTS} | {"A1": "BLUE", "A2": "RED", "C3": "RED"}
AFTER = BEFORE | {"B2": "WHITE"}  # a white piece stored at T0 + 60 s


def report(fdb, ts: datetime, slots: dict, n: int, factory_id: str = "factory-1") -> None:
    items = [{"location": s, "workpiece": {"type": t, "id": f"wp-{s}"} if t else None} for s, t in slots.items()]
    fdb.mqtt.insert_one({"topic": STOCK_TOPIC, "ts": ts, "factory_id": factory_id,
                         "message_id": f"stock-{factory_id}-{n}", "payload": {"ts": ts.isoformat(), "stockItems": items}})


def slot_answer(stock: dict) -> dict:
    """What the per-slot model answers for a rack holding ``stock`` (slot -> state)."""
    return {s: {"state": (t or "empty").lower(), "type": t, "probability": 0.95} for s, t in stock.items()}


def infer(fdb, i: int, ts: datetime, seen: dict, *, version: str = "slots-v1", with_slots: bool = True,
          factory_id: str = "factory-1") -> None:
    doc = {"frame_id": f"frame-{i}", "frame_seq": i + 1, "frame_ts": ts, "camera_id": "cam-1",
           "factory_id": factory_id, "model_version": version, "present": reported_presence(seen),
           "probabilities": {}, "thresholds": {}, "latency_ms": 1.0, "source": "live"}
    if with_slots:
        doc |= {"slots": slot_answer(seen), "model_kind": "slots"}
    fdb.inferences.insert_one(doc)


def test_a_per_slot_model_that_reads_the_rack_right_has_no_drift_and_skips_frames_while_the_crane_travels(fdb):
    report(fdb, T0, BEFORE, 1)
    report(fdb, T0 + timedelta(seconds=60), AFTER, 2)  # reported before the crane moves
    report(fdb, T0 + timedelta(seconds=75), AFTER, 3)  # the crane is back: the same stock again
    for i in range(1, 101):
        ts = T0 + timedelta(seconds=i)
        # the crane carries the piece in for 15 s after the report: the camera sees the old rack
        infer(fdb, i, ts, AFTER if i >= 75 else BEFORE)
    d = controller_disagreement(fdb, "slots-v1")
    assert d.basis == "slots"
    assert d.share == 0.0
    # frames from 58 s (2 s before the change) to 85 s (the settle time after it) are not compared
    assert DEFAULT_SETTLE_S == 25 and d.compared == 100 - len(range(58, 86))
    # with the 2 s that auto-labels and drift used to trust, the crane's travel looked like drift
    assert controller_disagreement(fdb, "slots-v1", settle_s=2).share > 0


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
    assert d.compared == 100 - len(range(58, 86))  # not while the crane may still move
    assert d.share == 15 / d.compared  # frames at 86..100 s: white reported, not seen


def test_a_drifted_model_is_still_noticed_when_a_change_lies_among_its_latest_frames(fdb):
    report(fdb, T0, BEFORE, 1)
    report(fdb, T0 + timedelta(seconds=150), AFTER, 2)
    wrong = {"A1": None, "B1": "WHITE", "C3": "BLUE"}
    for i in range(1, 201):
        infer(fdb, i, T0 + timedelta(seconds=i), (AFTER if i > 150 else BEFORE) | wrong)
    d = controller_disagreement(fdb, "slots-v1")
    # the newest DRIFT_WINDOW stable frames are compared, reaching back past the crane's travel
    assert d.compared == DRIFT_WINDOW and d.share == 3 / 9
    assert d.drifted


def test_each_frame_is_compared_with_its_own_factorys_reports(fdb):
    # two factories on one model: each rack read right. Mixed together, the other factory's
    # reports (a change every 40 s, interleaved) would look like a wrong model and unstable frames.
    other = {s: None for s in SLOTS} | {"C1": "WHITE"}
    report(fdb, T0, BEFORE, 1)
    for k in range(8):
        report(fdb, T0 + timedelta(seconds=40 * k + 5), other if k % 2 else other | {"C2": "RED"}, k,
               factory_id="factory-2")
    for i in range(1, 301):
        ts = T0 + timedelta(seconds=i)
        infer(fdb, i, ts, BEFORE)
        infer(fdb, 1000 + i, ts, other if ((i - 5) // 40) % 2 else other | {"C2": "RED"}, factory_id="factory-2")
    d = controller_disagreement(fdb, "slots-v1")
    assert d.basis == "slots" and d.compared == DRIFT_WINDOW
    assert d.share == 0.0
