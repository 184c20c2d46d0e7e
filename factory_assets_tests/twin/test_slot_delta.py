"""Per-slot observations in the twin: the delta names the slot that disagrees, in words a
warehouse person can act on, and the twin picture shows both racks; stored through the
real twin store (MongoDB fixture)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from factory_assets.twin.render import render_twin_png
from factory_assets.twin.state import Observation, Reported, compute_delta, observed_slots

T = datetime(2026, 11, 22, 10, 0, tzinfo=timezone.utc)
SEEN = {s: {"state": "empty", "type": None, "probability": 0.97} for s in
        ("A1", "A2", "A3", "B1", "B2", "B3", "C1", "C2", "C3")}
SEEN["A1"] = {"state": "blue", "type": "BLUE", "probability": 0.99}
REPORTED = {s: None for s in SEEN} | {"A1": "BLUE", "A2": "RED"}


def test_the_delta_says_which_slot_disagrees_and_how():
    delta = compute_delta({"blue": True, "red": False, "white": False}, {"blue": True, "red": True, "white": False},
                          observed_slots(SEEN), REPORTED)
    assert delta["red"] == {"observed": False, "reported": True}
    assert list(delta["slots"]) == ["A2"]
    assert delta["slots"]["A2"]["message"] == "controller says A2 holds RED, camera sees it empty"
    assert delta["slots"]["A2"]["probability"] == 0.97


def test_a_presence_only_observation_keeps_the_colour_delta_alone():
    delta = compute_delta({"blue": True, "red": False, "white": False}, {"blue": True, "red": True, "white": False})
    assert set(delta) == {"red"}


def test_the_twin_picture_grows_a_camera_rack_when_slots_are_observed():
    import cv2
    import numpy as np

    doc = {"version": 1, "observed": {"slots": observed_slots(SEEN), "blue": {"present": True, "probability": 0.99}},
           "reported": {"slots": REPORTED}, "delta": compute_delta({"blue": True, "red": False, "white": False},
                                                                  {"blue": True, "red": True, "white": False},
                                                                  observed_slots(SEEN), REPORTED)}
    with_slots = cv2.imdecode(np.frombuffer(render_twin_png(doc), np.uint8), cv2.IMREAD_COLOR)
    without = cv2.imdecode(np.frombuffer(render_twin_png({"version": 1}), np.uint8), cv2.IMREAD_COLOR)
    assert with_slots.shape[1] > without.shape[1] and with_slots.shape[0] > without.shape[0]


def test_the_stored_twin_carries_observed_slots_and_the_slot_delta(fdb):
    from factory_assets.twin.store import apply_observation, apply_reported

    apply_reported(fdb, Reported("factory-1", T - timedelta(seconds=60), REPORTED, "m1"))
    for i in range(3):  # a disagreement seen on three frames over two seconds
        obs = Observation("factory-1", f"frame-{i}", T + timedelta(seconds=i), "v1",
                          {"blue": 0.99, "red": 0.03, "white": 0.01}, {"blue": True, "red": False, "white": False},
                          {"blue": 0.5, "red": 0.5, "white": 0.5}, slots=SEEN)
        assert apply_observation(fdb, obs)
    doc = fdb.twin.find_one({"_id": "factory-1"})
    assert doc["observed"]["slots"]["A1"] == {"type": "BLUE", "probability": 0.99}
    assert doc["delta"]["slots"]["A2"]["message"] == "controller says A2 holds RED, camera sees it empty"
