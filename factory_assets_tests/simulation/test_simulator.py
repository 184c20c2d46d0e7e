"""The simulated factory: pictures that show the stock, the seeded factory model (its warehouse,
crane, arrivals and customer), and its MQTT stream over a real broker. The controller's rules
over MQTT (camera switch, QoS, orders, faults, prefixes, logins) are in test_controller.py."""
from __future__ import annotations

import collections
import re
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from factory_assets.simulation.factory import (SEARCH_ORDER, FactorySimulator, Timings, brightness_string)
from factory_assets.simulation.publisher import run_in_background, run_simulation
from factory_assets.simulation.render import SLOTS, TYPES, encode_jpeg, render_warehouse
from factory_assets.vocabulary import CRANE_TRAVEL_S, formats
from factory_assets_tests.fixtures.mqtt import MqttRecorder, mqtt_broker  # noqa: F401
from factory_assets_tests.simulation.pictures import decode, jpeg_of, read_stock, stock_of

TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
SENSOR_FIELDS = {"i/bme680": {"ts", "t", "rt", "h", "rh", "p", "iaq", "aq", "gr"}, "i/ldr": {"ts", "br", "ldr"}}
FAST = Timings(scale=0.01)  # every duration of the factory a hundred times shorter


def random_stock(rng: np.random.Generator) -> dict[str, str | None]:
    return {s: [None, *TYPES][int(rng.integers(4))] for s in SLOTS}


# -- the renderer -------------------------------------------------------------------------

def test_rendering_is_deterministic_with_a_seed():
    stock = {"A1": "BLUE", "B2": "RED", "C3": "WHITE"}
    a = render_warehouse(stock, rng=np.random.default_rng(7))
    b = render_warehouse(stock, rng=np.random.default_rng(7))
    c = render_warehouse(stock, rng=np.random.default_rng(8))
    assert a.shape == (240, 320, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_rendered_workpieces_are_in_the_slots_the_stock_names_under_any_lighting():
    rng = np.random.default_rng(2026)
    for i, lighting in enumerate([0.6, 0.75, 0.9, 1.0, 1.1] * 4):
        stock = random_stock(rng)
        img = decode(encode_jpeg(render_warehouse(stock, rng=np.random.default_rng(i), lighting=lighting)))
        assert read_stock(img) == stock, f"picture {i} at lighting {lighting}"


def test_an_empty_rack_shows_no_workpiece_and_a_full_rack_shows_all_nine():
    empty = render_warehouse({}, rng=np.random.default_rng(1))
    full = {s: TYPES[i % 3] for i, s in enumerate(SLOTS)}
    assert read_stock(empty) == dict.fromkeys(SLOTS)
    assert read_stock(render_warehouse(full, rng=np.random.default_rng(1))) == full


def test_frames_differ_from_one_another_by_lighting_noise_and_camera_jitter():
    stock = {"A1": "RED"}
    a = render_warehouse(stock, rng=np.random.default_rng(1)).astype(int)
    b = render_warehouse(stock, rng=np.random.default_rng(2)).astype(int)
    still = [render_warehouse(stock, rng=np.random.default_rng(s), jitter=False).astype(int) for s in (1, 2)]
    assert np.abs(a - b).mean() > np.abs(still[0] - still[1]).mean() > 1  # noise alone differs a little
    dim = render_warehouse(stock, rng=np.random.default_rng(1), lighting=0.5, jitter=False)
    assert dim.mean() < 0.6 * still[0].mean()


def test_the_renderer_refuses_unknown_slots_and_types():
    with pytest.raises(ValueError):
        render_warehouse({"D1": "BLUE"}, rng=np.random.default_rng(0))
    with pytest.raises(ValueError):
        render_warehouse({"A1": "GREEN"}, rng=np.random.default_rng(0))


# -- the factory model (no broker) --------------------------------------------------------

def test_the_same_seed_gives_the_same_stock_sequence_and_the_same_pictures():
    start = datetime(2026, 12, 6, 9, 0, tzinfo=timezone.utc)
    a, b, other = (FactorySimulator(seed, 0.5, timings=FAST, start=start) for seed in (5, 5, 6))
    for sim in (a, b, other):
        sim.advance(120.0)
    assert len(a.changes) > 20
    assert [(c.t, c.slot, c.before, c.after, c.visible_at) for c in a.changes] == \
           [(c.t, c.slot, c.before, c.after, c.visible_at) for c in b.changes]
    assert [(c.t, c.slot) for c in a.changes] != [(c.t, c.slot) for c in other.changes]
    assert list(a.outbox) == list(b.outbox)
    assert a.frame(121.5) == b.frame(121.5)


def test_the_reported_stock_changes_one_slot_at_a_time_both_ways_with_nobody_ordering():
    sim = FactorySimulator(seed=3, change_every_s=0.5, timings=FAST)
    before = sim.stock
    sim.advance(200.0)
    assert len(sim.changes) > 50
    stock = before
    for change in sim.changes:
        assert stock[change.slot] == (change.before["type"] if change.before else None)
        after = dict(stock, **{change.slot: change.after["type"] if change.after else None})
        assert sum(stock[s] != after[s] for s in SLOTS) == 1
        stock = after
    assert stock == sim.stock
    assert {c.kind for c in sim.changes} == {"store", "retrieve"}
    # the pieces leave on orders of the other customer, shipped like any order
    states = [m.payload["state"] for m in sim.outbox if m.topic == "f/i/order"]
    assert {"ORDERED", "IN_PROCESS", "SHIPPED", "WAITING_FOR_ORDER"} <= set(states)
    assert sim.accepted_orders == sum(c.kind == "retrieve" for c in sim.changes) and sim.faults == 0


def test_the_warehouse_stores_in_the_first_empty_slot_and_ships_the_first_piece_of_a_colour_in_its_search_order():
    sim = FactorySimulator(seed=8, change_every_s=0.5, timings=FAST)
    stock = sim.stock
    sim.advance(150.0)
    assert {c.kind for c in sim.changes} == {"store", "retrieve"}
    for change in sim.changes:
        if change.kind == "store":
            assert change.slot == next(s for s in SEARCH_ORDER if stock[s] is None)
        else:
            assert change.slot == next(s for s in SEARCH_ORDER if stock[s] == change.before["type"])
        stock = dict(stock, **{change.slot: change.after["type"] if change.after else None})


def test_the_fill_level_wanders_between_nearly_empty_and_nearly_full_so_every_mix_shows_up():
    sim = FactorySimulator(seed=0, change_every_s=2.0, timings=Timings(scale=0.1))
    fills, mixes = [], set()
    for t in np.arange(0.0, 3600.0, 2.0):
        sim.advance(float(t))
        fills.append(sum(v is not None for v in sim.shown_stock.values()))
        mixes.add(tuple(sorted(collections.Counter(v for v in sim.shown_stock.values() if v).items())))
    assert min(fills) <= 1 and max(fills) >= 8
    assert len(mixes) >= 60


def test_a_change_becomes_visible_after_a_crane_travel_that_depends_on_the_slot():
    timings = Timings(crane_travel_s=(5.0, 13.0))
    assert timings.crane("C1") == 5.0 and timings.crane("A3") == 13.0
    assert timings.crane("C1") < timings.crane("B2") < timings.crane("A3")
    assert Timings().crane_travel_s == CRANE_TRAVEL_S
    sim = FactorySimulator(seed=2, change_every_s=5.0, timings=timings)
    sim.advance(1800.0)
    assert len(sim.changes) > 10
    for change in sim.changes:
        assert change.visible_at - change.t == pytest.approx(timings.crane(change.slot))


def test_a_frame_shows_the_old_rack_while_the_crane_travels_and_the_new_one_after():
    start = datetime(2026, 12, 6, 9, 0, tzinfo=timezone.utc)
    history = FactorySimulator(seed=11, change_every_s=3.0, timings=Timings(scale=0.5), start=start)
    initial = history.shown_stock
    history.advance(200.0)
    changes = history.changes[:8]
    assert len(changes) == 8

    def rack_at(t):  # the initial rack with every change whose crane has arrived by t
        rack = dict(initial)
        for c in history.changes:
            if c.visible_at <= t:
                rack[c.slot] = c.after["type"] if c.after else None
        return rack

    sim = FactorySimulator(seed=11, change_every_s=3.0, timings=Timings(scale=0.5), start=start)
    for change in changes:
        new = change.after["type"] if change.after else None
        for t in (change.t, (change.t + change.visible_at) / 2, change.visible_at):
            jpeg, stock = sim.frame(t)
            assert stock == rack_at(t) and read_stock(decode(jpeg)) == stock, f"t={t:.2f}"
            assert stock[change.slot] == (new if t >= change.visible_at else rack_at(change.t)[change.slot])
        assert rack_at(change.t)[change.slot] != new  # the report ran ahead of the picture


def test_stock_messages_carry_all_nine_locations_with_workpiece_ids():
    sim = FactorySimulator(seed=1)
    msg = sim.stock_message(0.0)
    assert TS.match(msg["ts"])
    assert [it["location"] for it in msg["stockItems"]] == list(SLOTS)
    for it in msg["stockItems"]:
        wp = it["workpiece"]
        if wp is not None:
            assert re.fullmatch(r"04[0-9a-f]{12}", wp["id"]) and wp["type"] in TYPES and wp["state"] == "RAW"
    assert stock_of(msg) == sim.stock
    assert formats.problems("f/i/stock", msg) == []


def test_the_brightness_is_a_string_derived_from_the_photo_resistor_as_the_controller_prints_it():
    assert brightness_string(7000) == "53.3"
    assert brightness_string(7050) == "53"  # a whole value: no decimal, like the controller's ftos
    assert brightness_string(0) == "100" and brightness_string(15000) == "0"
    sim = FactorySimulator(seed=4)
    for t in range(0, 600, 37):
        msg = sim.ldr_message(float(t))
        assert isinstance(msg["ldr"], int) and 0 <= msg["ldr"] <= 15000
        assert msg["br"] == brightness_string(msg["ldr"]) and formats.problems("i/ldr", msg) == []


def test_every_timestamp_is_in_the_controllers_drifted_clock_and_orders_are_judged_by_it():
    start = datetime(2026, 12, 6, 9, 0, tzinfo=timezone.utc)
    sim = FactorySimulator(seed=1, timings=FAST, arrivals=False, demand=False, start=start, clock_offset_s=-42.5)
    assert sim.ts_string(10.0) == "2026-12-06T08:59:27.500Z"
    assert {m.payload["ts"] for m in sim.outbox} == {"2026-12-06T08:59:17.500Z"}
    kind = next(v for v in sim.stock.values() if v)
    true_time = (start + timedelta(seconds=10)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert sim.receive_order({"ts": true_time, "type": kind}, 10.0)[0] is False  # 42.5 s off its clock
    assert sim.receive_order({"ts": sim.ts_string(19.0), "type": kind}, 10.0)[0] is True  # 9 s ahead: taken


def test_a_warehouse_fault_clears_after_the_configured_time_and_gives_the_order_up():
    sim = FactorySimulator(seed=1, timings=Timings(fault_clear_s=30.0), arrivals=False, demand=False)
    missing = next(k for k in TYPES if k not in sim.stock.values())
    sim.outbox.clear()
    assert sim.receive_order({"ts": sim.ts_string(1.0), "type": missing}, 1.0) == (True, "ordered")
    hbw = [m.payload for m in sim.outbox if m.topic == "f/i/state/hbw"]
    assert hbw[-1]["code"] == 4 and missing in hbw[-1]["description"]
    sim.advance(30.9)
    assert sim.fault and sim.order_state == ("ORDERED", missing)
    sim.advance(31.0)
    assert sim.fault is None and sim.order_state == ("WAITING_FOR_ORDER", missing)
    assert [m.payload["code"] for m in sim.outbox if m.topic == "f/i/state/hbw"][-1] == 1


# -- over a real broker -------------------------------------------------------------------

def test_frames_arrive_over_mqtt_as_320x240_jpegs_with_millisecond_utc_timestamps(mqtt_broker):
    with MqttRecorder(mqtt_broker.url) as rec:
        result = run_simulation(mqtt_broker.url, fps=10, max_frames=10, seed=1, camera_on=True)
        assert rec.wait_until(lambda: rec.count("i/cam") == 10, 10)
    assert result.frames == 10
    frames = rec.payloads("i/cam")
    for msg in frames:
        assert TS.match(msg["ts"])
        assert decode(jpeg_of(msg)).shape == (240, 320, 3)
    stamps = [m["ts"] for m in frames]
    assert stamps == sorted(stamps) and len(set(stamps)) == 10


def test_stock_reports_and_frames_over_mqtt_match_the_ground_truth(mqtt_broker):
    truth: list[tuple[str, dict, dict]] = []
    with MqttRecorder(mqtt_broker.url) as rec:
        result = run_simulation(mqtt_broker.url, fps=20, max_frames=60, seed=4, change_every_s=0.2, timings=FAST,
                                camera_on=True, on_publish=lambda tp, p, s: truth.append((tp, p, s)))
        sent = sum(1 for tp, _, _ in truth if tp in ("i/cam", "f/i/stock"))
        assert rec.wait_until(lambda: rec.count("i/cam") + rec.count("f/i/stock") == sent, 10)
    assert result.stock_changes >= 3 and {c.kind for c in result.changes} == {"store", "retrieve"}

    reports = rec.payloads("f/i/stock")
    assert reports == [p for tp, p, _ in truth if tp == "f/i/stock"]  # nothing lost, nothing reordered
    for report, (_, _, stock) in zip(reports, [t for t in truth if t[0] == "f/i/stock"]):
        assert len(report["stockItems"]) == 9
        assert stock_of(report) == stock
    # every frame shows the rack the ground truth says it shows
    frames = {p["ts"]: s for tp, p, s in truth if tp == "i/cam"}
    for frame in rec.payloads("i/cam"):
        assert read_stock(decode(jpeg_of(frame))) == frames[frame["ts"]], frame["ts"]
    assert len({tuple(s.values()) for s in frames.values()}) >= 3  # the rack does change over the run


def test_sensor_topics_carry_the_txt_controller_fields(mqtt_broker):
    with MqttRecorder(mqtt_broker.url) as rec:
        run_simulation(mqtt_broker.url, fps=10, max_frames=12, sensor_interval_s=0.5, camera_on=True)
        assert rec.wait_until(lambda: rec.count("i/bme680") >= 2 and rec.count("i/ldr") >= 2, 5)
    for topic, fields in SENSOR_FIELDS.items():
        for msg in rec.payloads(topic):
            assert set(msg) == fields and TS.match(msg["ts"]) and formats.problems(topic, msg) == []
    assert all(0 <= float(m["br"]) <= 100 for m in rec.payloads("i/ldr"))
    assert all(15 < m["t"] < 30 and 900 < m["p"] < 1100 for m in rec.payloads("i/bme680"))


def test_two_runs_with_the_same_seed_publish_the_same_stock_sequence(mqtt_broker):
    start = datetime(2026, 12, 6, 9, 0, tzinfo=timezone.utc)

    def run(seed):
        seen = collections.defaultdict(list)
        result = run_simulation(mqtt_broker.url, fps=20, duration_s=2.0, seed=seed, change_every_s=0.1,
                                timings=FAST, camera_on=True, start=start,
                                on_publish=lambda tp, p, s: seen[tp].append(p if tp != "i/cam" else (p["ts"], s)))
        return seen, result

    first, result = run(9)
    assert result.customer_orders >= 2 and len(first["f/i/stock"]) >= 5  # orders went through the broker
    again, _ = run(9)
    for topic in ("f/i/stock", "f/i/order", "f/i/state/hbw"):
        assert first[topic] == again[topic], topic
    frames = dict(again["i/cam"])
    assert all(frames[ts] == stock for ts, stock in first["i/cam"] if ts in frames)
    assert first["f/i/stock"] != run(10)[0]["f/i/stock"]


def test_the_simulator_reconnects_after_a_broker_restart_and_frames_arrive_again(mqtt_broker):
    with MqttRecorder(mqtt_broker.url) as rec:
        stop, thread, out = run_in_background(mqtt_broker.url, fps=10, seed=2, change_every_s=60, camera_on=True)
        try:
            assert rec.wait_until(lambda: rec.count("i/cam") >= 5, 10)
            mqtt_broker.restart(downtime_s=0.5)
            restarted = time.monotonic()
            assert rec.wait_until(lambda: any(t > restarted for _, t in rec.on("i/cam")), 12), \
                "no frame after the broker restart"
            n = len([t for _, t in rec.on("i/cam") if t > restarted])
            assert rec.wait_until(lambda: len([t for _, t in rec.on("i/cam") if t > restarted]) >= n + 5, 5)
        finally:
            stop.set()
            thread.join(10)
    assert "error" not in out, out.get("error")
    assert out["result"].connects >= 2


def test_the_simulate_command_runs_standalone_and_prints_progress(mqtt_broker):
    with MqttRecorder(mqtt_broker.url) as rec:
        proc = subprocess.run([sys.executable, "-m", "factory_assets.cli.simulate", "simulate",
                               "--mqtt", mqtt_broker.url, "--frames", "6", "--fps", "10", "--seed", "3",
                               "--camera-on", "--progress-every", "0.2"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert rec.wait_until(lambda: rec.count("i/cam") == 6, 5)
    assert "done: 6 frames" in proc.stdout
    # progress lines are log records (stderr), the result is the command's output (stdout)
    assert "t=" in proc.stderr and "stock=" in proc.stderr
    assert rec.count("f/i/stock") >= 1


def test_the_simulate_subcommand_registers_on_another_parser():
    import argparse

    from factory_assets.cli.simulate import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["simulate", "--mqtt", "mqtts://txt@127.0.0.1:1", "--fps", "4", "--seed", "2",
                              "--duration", "3", "--camera-id", "cam-9", "--change-every", "5",
                              "--prefix", "/j1/txt/1/", "--ca-file", "ca.pem", "--clock-offset", "-3.5",
                              "--time-scale", "0.5", "--crane-travel", "4", "9"])
    assert (args.mqtt, args.fps, args.seed, args.duration, args.camera_id, args.change_every) == \
           ("mqtts://txt@127.0.0.1:1", 4.0, 2, 3.0, "cam-9", 5.0)
    assert (args.prefix, args.ca_file, args.clock_offset, args.time_scale, args.crane_travel) == \
           ("/j1/txt/1/", "ca.pem", -3.5, 0.5, [4.0, 9.0])
    defaults = parser.parse_args(["simulate", "--mqtt", "mqtt://127.0.0.1:1"])
    assert defaults.fps is None and defaults.sensor_interval == 60.0 and not defaults.camera_on
    assert callable(args.func)
