"""What the twin flags: a vision/controller disagreement while the crane may still be moving
is ``in_transit`` (the warehouse reports before its crane moves), a one-frame flicker is never
flagged, a persisting disagreement is; the stations' states (a warehouse fault), the
controller's order state and the factory's clock offset reach the twin. Real MongoDB (the
``fdb`` fixture), the real twin store and live updater."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from factory_assets.twin.state import Observation, Reported, TwinRules
from factory_assets.twin.store import apply_observation, apply_reported, get_twin
from factory_assets.vocabulary import DEFAULT_SETTLE_S, SLOTS, STOCK_TOPIC
from factory_assets.vocabulary.formats import problems
from factory_assets_tests.storage.test_hot_paths import assert_index_served, recorded_fdb  # noqa: F401

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=timezone.utc)
SAID = {s: None for s in SLOTS} | {"C1": "RED", "B1": "BLUE"}
SHOWN = SAID | {"B1": None}  # the camera does not see the blue piece in B1


def seen(stock: dict) -> dict:
    return {s: {"state": (t or "empty").lower(), "type": t, "probability": 0.95} for s, t in stock.items()}


def observe(fdb, t: float, stock: dict = SHOWN, rules: TwinRules | None = None) -> bool:
    present = {c: any(v == c.upper() for v in stock.values()) for c in ("blue", "red", "white")}
    return apply_observation(fdb, Observation("factory-1", f"frame-{t}", T0 + timedelta(seconds=t), "v1",
                                              {c: 0.9 if v else 0.1 for c, v in present.items()}, present,
                                              {"blue": 0.5, "red": 0.5, "white": 0.5}, slots=seen(stock)), rules)


def report(fdb, t: float, stock: dict = SAID, rules: TwinRules | None = None) -> bool:
    return apply_reported(fdb, Reported("factory-1", T0 + timedelta(seconds=t), stock, f"m{t}"), rules)


def flagged(twin: dict) -> set:
    delta = twin.get("delta") or {}
    return {k for k in delta if k != "slots"} | set(delta.get("slots") or {})


def test_a_disagreement_while_the_crane_may_move_is_in_transit_and_after_the_settle_time_a_discrepancy(fdb):
    report(fdb, 0, SHOWN)
    report(fdb, 100, SAID)  # a blue piece stored in B1: reported before the crane carries it in
    for t in range(101, 101 + int(DEFAULT_SETTLE_S) - 1):  # the camera still sees B1 empty
        observe(fdb, t)
        twin = get_twin(fdb)
        assert twin["in_transit"]["active"] is True and flagged(twin) == set()
    assert set(twin["in_transit"]["slots"]) == {"B1"} and set(twin["in_transit"]["colours"]) == {"blue"}
    assert twin["in_transit"]["slots"]["B1"]["message"] == "controller says B1 holds BLUE, camera sees it empty"
    assert twin["in_transit"]["until"] == T0 + timedelta(seconds=100 + DEFAULT_SETTLE_S)
    assert twin["reported"]["changed_at"] == T0 + timedelta(seconds=100)
    # the settle time is over and the piece still is not seen: after it persisted, a discrepancy
    for t in range(125, 128):
        observe(fdb, t)
    twin = get_twin(fdb)
    assert twin["in_transit"]["active"] is False and twin["in_transit"]["slots"] == {}
    assert flagged(twin) == {"blue", "B1"}
    assert twin["delta"]["slots"]["B1"]["since"] == T0 + timedelta(seconds=125)
    assert twin["delta"]["slots"]["B1"]["frames"] == 3
    entry = fdb.twin_history.find_one({"kind": "discrepancy"})
    assert entry["flagged"] == ["blue", "B1"] and entry["version"] == twin["version"]


def test_a_report_repeating_the_stock_does_not_start_a_new_settle_window(fdb):
    report(fdb, 0, SAID)
    report(fdb, 60, SAID)  # the controller reports the same stock again (the crane is back)
    for t in range(61, 64):
        observe(fdb, t)
    twin = get_twin(fdb)
    assert twin["reported"]["changed_at"] == T0 and twin["in_transit"]["active"] is False
    assert flagged(twin) == {"blue", "B1"}
    report(fdb, 64, SAID)  # and again: the discrepancy stays flagged
    assert flagged(get_twin(fdb)) == {"blue", "B1"}


def test_a_one_frame_disagreement_is_never_flagged_and_a_persisting_one_is(fdb):
    report(fdb, 0, SAID)
    for t in range(30, 50):
        observe(fdb, t, SHOWN if t in (33, 40) else SAID)  # two single-frame flickers
        assert flagged(get_twin(fdb)) == set()
    assert fdb.twin_history.count_documents({"delta": {"$ne": {}}}) == 0  # no "⚠" on the timeline
    observe(fdb, 50)
    observe(fdb, 51)
    assert flagged(get_twin(fdb)) == set()  # two frames over one second: not yet
    observe(fdb, 52)
    assert flagged(get_twin(fdb)) == {"blue", "B1"}
    observe(fdb, 53, SAID)  # the camera sees the piece again: cleared at once
    assert flagged(get_twin(fdb)) == set()
    assert fdb.twin_history.find_one(sort=[("version", -1)])["cleared"] == ["blue", "B1"]


def test_a_disagreement_that_changes_its_kind_starts_counting_again(fdb):
    report(fdb, 0, SAID)
    observe(fdb, 30)
    observe(fdb, 31, SAID | {"B1": "WHITE"})  # now the camera sees white in B1: another disagreement
    observe(fdb, 32, SAID | {"B1": "WHITE"})
    twin = get_twin(fdb)
    # the blue piece has been missing for three frames; what B1 holds is another story since 31 s
    assert flagged(twin) == {"blue"} and twin["metadata"]["disagreement"]["slots"]["B1"]["frames"] == 2


def test_the_rules_come_from_the_environment_or_the_caller(fdb, monkeypatch):
    monkeypatch.setenv("FACTORY_SETTLE_S", "5")
    monkeypatch.setenv("FACTORY_DISAGREEMENT_FRAMES", "1")
    monkeypatch.setenv("FACTORY_DISAGREEMENT_S", "0")
    assert TwinRules.from_env() == TwinRules(settle_s=5.0, persist_frames=1, persist_s=0.0)
    report(fdb, 0, SHOWN)
    report(fdb, 10, SAID)
    observe(fdb, 14)
    assert get_twin(fdb)["in_transit"]["active"] is True
    observe(fdb, 15)
    assert flagged(get_twin(fdb)) == {"blue", "B1"}  # one frame is enough, right after 5 s
    assert TwinRules.from_env(settle_s=40).settle_s == 40
    monkeypatch.setenv("FACTORY_DISAGREEMENT_FRAMES", "three")
    with pytest.raises(ValueError, match="FACTORY_DISAGREEMENT_FRAMES must be a whole number"):
        TwinRules.from_env()
    with pytest.raises(ValueError, match="settle_s must be >= 0"):
        TwinRules(settle_s=-1)


# -- the controller's side: stations, order state, clock ---------------------------------------

def store_message(fdb, topic: str, payload: dict, factory_id: str = "factory-1") -> None:
    """A controller message stored as the ingester stores it (topic without prefix, ts parsed)."""
    from factory_assets.vocabulary import parse_ts

    assert problems(topic, payload) == []  # exactly what the controller sends
    ts = parse_ts(payload["ts"])
    fdb.mqtt.insert_one({"topic": topic, "ts": ts, "received_at": ts, "factory_id": factory_id,
                         "payload": payload, "message_id": f"{factory_id}:{topic}:{payload['ts']}"})


def ts(t: float) -> str:
    return (T0 + timedelta(seconds=t)).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(t * 1000) % 1000:03d}Z"


def station(name: str, t: float, code: int, description: str = "", active: int = 0) -> dict:
    payload = {"ts": ts(t), "station": name, "code": code, "description": description, "active": active}
    return payload | ({"target": ""} if name == "vgr" else {})


def test_a_warehouse_fault_the_order_state_and_the_clock_offset_reach_the_twin(fdb):
    from factory_assets.storage.clocks import record_offset
    from factory_assets.twin.live import LiveTwinUpdater

    for name in ("hbw", "vgr", "mpo", "sld", "dsi", "dso"):
        store_message(fdb, f"f/i/state/{name}", station(name, 0, 1))
    store_message(fdb, "f/i/order", {"ts": ts(1), "state": "ORDERED", "type": "RED"})
    # an order for a colour the warehouse does not hold: it faults
    store_message(fdb, "f/i/state/hbw", station("hbw", 2, 4, "no RED workpiece in stock"))
    record_offset(fdb, "factory-1", 3.25, samples=40, spread_s=0.004)
    updater = LiveTwinUpdater(fdb, predictor=None, change_stream=False)
    updater.step()
    twin = get_twin(fdb)
    hbw = twin["reported"]["stations"]["hbw"]
    assert hbw["fault"] is True and hbw["code"] == 4 and hbw["description"] == "no RED workpiece in stock"
    assert hbw["meaning"] == "error" and hbw["ts"] == T0 + timedelta(seconds=2) and hbw["active"] is False
    assert set(twin["reported"]["stations"]) == {"hbw", "vgr", "mpo", "sld", "dsi", "dso"}
    assert not any(s["fault"] for n, s in twin["reported"]["stations"].items() if n != "hbw")
    assert twin["reported"]["order"] == {"state": "ORDERED", "type": "RED", "ts": T0 + timedelta(seconds=1)}
    assert twin["clock"]["offset_s"] == 3.25 and twin["clock"]["samples"] == 40
    entry = fdb.twin_history.find_one({"kind": "controller"}, sort=[("version", -1)])
    assert entry["faults"] == ["hbw"] and entry["version"] == twin["version"]

    # the same states again: no new version; the fault quit: a new one, fault false
    version = twin["version"]
    updater.step()
    assert get_twin(fdb)["version"] == version
    store_message(fdb, "f/i/state/hbw", station("hbw", 60, 1))
    record_offset(fdb, "factory-1", 3.3, samples=41, spread_s=0.004)  # moved less than shown again
    updater.step()
    twin = get_twin(fdb)
    assert twin["reported"]["stations"]["hbw"]["fault"] is False and twin["version"] == version + 1
    assert twin["clock"]["offset_s"] == 3.25
    # a stock report keeps the stations
    store_message(fdb, STOCK_TOPIC, {"ts": ts(61), "stockItems": [
        {"location": s, "workpiece": None} for s in SLOTS]})
    updater.step()
    twin = get_twin(fdb)
    assert twin["reported"]["ts"] == T0 + timedelta(seconds=61) and "hbw" in twin["reported"]["stations"]


def test_each_factory_gets_its_own_reports_whatever_its_clock(fdb):
    from factory_assets.twin.live import LiveTwinUpdater

    updater = LiveTwinUpdater(fdb, predictor=None, change_stream=False)
    empty = [{"location": s, "workpiece": None} for s in SLOTS]
    store_message(fdb, STOCK_TOPIC, {"ts": ts(100), "stockItems": empty}, "factory-1")
    # factory-2's controller clock runs a minute behind: its newer report carries an older ts
    store_message(fdb, STOCK_TOPIC, {"ts": ts(40), "stockItems": empty[:-1] + [
        {"location": "C3", "workpiece": {"id": "", "type": "RED", "state": "RAW"}}]}, "factory-2")
    updater.step()
    assert get_twin(fdb, "factory-1")["reported"]["ts"] == T0 + timedelta(seconds=100)
    assert get_twin(fdb, "factory-2")["reported"]["slots"]["C3"] == "RED"


def test_the_controller_state_reads_are_served_by_indexes(recorded_fdb):  # noqa: F811
    from factory_assets.twin.live import LiveTwinUpdater

    fdb, recorder = recorded_fdb
    for k in range(30):
        for fid in ("factory-1", "factory-2"):
            store_message(fdb, "f/i/state/hbw", station("hbw", k, 2 if k % 2 else 1), fid)
            store_message(fdb, "f/i/order", {"ts": ts(k), "state": "IN_PROCESS", "type": "BLUE"}, fid)
            store_message(fdb, STOCK_TOPIC, {"ts": ts(k), "stockItems": [
                {"location": s, "workpiece": None} for s in SLOTS]}, fid)
    updater = LiveTwinUpdater(fdb, predictor=None, change_stream=False)
    recorder.recording.set()
    updater.step()
    recorder.recording.clear()
    assert get_twin(fdb, "factory-2")["reported"]["stations"]["hbw"]["code"] == 2
    assert_index_served(fdb, recorder.commands)


def test_the_twin_picture_shows_a_station_fault_and_the_slots_in_transit():
    import cv2
    import numpy as np

    from factory_assets.twin.render import render_twin_png

    plain = {"version": 3, "reported": {"slots": SAID}, "observed": {"slots": seen(SHOWN)}}
    moving = {**plain, "in_transit": {"active": True, "slots": {"B1": {
        "observed": None, "reported": "BLUE", "message": "controller says B1 holds BLUE, camera sees it empty"}}},
        "reported": {"slots": SAID, "stations": {"hbw": {"code": 4, "fault": True, "description": "no RED piece"}}}}

    def image(doc):
        return cv2.imdecode(np.frombuffer(render_twin_png(doc), np.uint8), cv2.IMREAD_COLOR)

    a, b = image(plain), image(moving)
    assert b.shape[0] == a.shape[0] + 2 * 16  # two more lines: the fault and the slot in transit
    orange = np.all(np.abs(b[:, :200].astype(int) - (36, 165, 245)) < 40, axis=-1)
    assert orange[28 + 62:28 + 62 + 57, 10:67].any()  # B1's outline in the reported rack
    assert not np.all(np.abs(a[:, :200].astype(int) - (36, 165, 245)) < 40, axis=-1).any()


def test_a_station_message_wakes_the_running_live_updater(fdb, monkeypatch):
    import threading
    import time

    from factory_assets.twin import live
    from factory_assets.twin.live import LiveTwinUpdater

    monkeypatch.setattr(live, "CONTROLLER_REFRESH_S", 3600.0)  # no periodic look: only the wake-up
    store_message(fdb, "f/i/state/hbw", station("hbw", 0, 1))
    updater = LiveTwinUpdater(fdb, predictor=None, max_idle_seconds=2.0)
    stop = threading.Event()
    runner = threading.Thread(target=updater.run, kwargs={"stop": stop}, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 20
        while (get_twin(fdb) or {}).get("reported", {}).get("stations", {}).get("hbw") is None:
            assert time.monotonic() < deadline, "the first station state never reached the twin"
            stop.wait(0.05)
        store_message(fdb, "f/i/state/hbw", station("hbw", 5, 4, "no BLUE workpiece in stock"))
        while not get_twin(fdb)["reported"]["stations"]["hbw"]["fault"]:
            assert time.monotonic() < deadline, "the fault never reached the twin"
            stop.wait(0.05)
    finally:
        stop.set()
        runner.join(timeout=10)
    assert updater.waiter.mode == "change_stream"
