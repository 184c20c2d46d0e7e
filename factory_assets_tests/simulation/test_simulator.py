"""The simulated factory: pictures that show the stock, seeded stock evolution, and the
TXT-controller-like MQTT stream over a real amqtt broker."""
from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from factory_assets.simulation.render import SLOTS, TYPES, encode_jpeg, render_warehouse, slot_box
from factory_assets.simulation.factory import FactorySimulator
from factory_assets.simulation.publisher import run_in_background, run_simulation
from factory_assets_tests.fixtures.mqtt import MqttRecorder, mqtt_broker  # noqa: F401

TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
SENSOR_FIELDS = {"i/bme680": {"ts", "t", "rt", "h", "rh", "p", "iaq", "aq", "gr"}, "i/ldr": {"ts", "br", "ldr"}}


# -- helpers ------------------------------------------------------------------------------

def read_slot(img: np.ndarray, slot: str) -> str | None:
    """What a slot of a picture holds, from the colour where a disc would lie (mean hue,
    saturation, and brightness against the empty space above it in the same slot)."""
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV).astype(np.float32)
    x0, y0, x1, y1 = slot_box(slot)
    cx = (x0 + x1) // 2
    disc = hsv[y1 - 14:y1 - 4, cx - 12:cx + 12].reshape(-1, 3)
    above = hsv[y0 + 4:y0 + 16, cx - 12:cx + 12].reshape(-1, 3)
    h = np.radians(disc[:, 0] * 2)
    hue = (np.degrees(np.arctan2(np.sin(h).mean(), np.cos(h).mean())) % 360) / 2  # OpenCV hue, 0..180
    sat = disc[:, 1].mean()
    brighter = disc[:, 2].mean() / max(above[:, 2].mean(), 1.0)
    if sat > 120 and 90 <= hue <= 130:
        return "BLUE"
    if sat > 120 and (hue >= 165 or hue <= 10):
        return "RED"
    if sat < 60 and brighter > 1.4:
        return "WHITE"
    return None


def read_stock(img: np.ndarray) -> dict[str, str | None]:
    return {slot: read_slot(img, slot) for slot in SLOTS}


def decode(jpeg: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, "not a decodable JPEG"
    return img


def jpeg_of(camera_message: dict) -> bytes:
    prefix = "data:image/jpeg;base64,"
    assert camera_message["data"].startswith(prefix)
    return base64.b64decode(camera_message["data"][len(prefix):])


def stock_of(stock_message: dict) -> dict[str, str | None]:
    return {it["location"]: (it["workpiece"]["type"] if it["workpiece"] else None)
            for it in stock_message["stockItems"]}


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
    a, b, other = FactorySimulator(5, 2.0), FactorySimulator(5, 2.0), FactorySimulator(6, 2.0)
    for sim in (a, b, other):
        sim.advance(120.0)
    assert [(c.t, c.slot, c.before, c.after) for c in a.changes] == \
           [(c.t, c.slot, c.before, c.after) for c in b.changes]
    assert [(c.t, c.slot) for c in a.changes] != [(c.t, c.slot) for c in other.changes]
    assert a.frame(121.5) == b.frame(121.5)


def test_the_stock_changes_one_slot_at_a_time_about_every_change_interval():
    sim = FactorySimulator(seed=3, change_every_s=2.0)
    before = sim.stock
    sim.advance(200.0)
    assert 60 <= len(sim.changes) <= 140  # ~100 changes expected
    stock = before
    for change in sim.changes:
        assert stock[change.slot] == (change.before["type"] if change.before else None)
        after = dict(stock, **{change.slot: change.after["type"] if change.after else None})
        assert sum(stock[s] != after[s] for s in SLOTS) == 1
        stock = after
    assert stock == sim.stock
    assert {c.kind for c in sim.changes} == {"store", "retrieve"}


def test_a_frame_shows_the_stock_in_force_at_its_timestamp():
    sim = FactorySimulator(seed=11, change_every_s=1.0)
    for t in np.arange(0.0, 30.0, 0.7):
        jpeg, stock = sim.frame(float(t))
        assert stock == sim.stock
        assert read_stock(decode(jpeg)) == stock, f"frame at t={t:.1f}"


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


# -- over a real broker -------------------------------------------------------------------

def test_frames_arrive_over_mqtt_as_320x240_jpegs_with_millisecond_utc_timestamps(mqtt_broker):
    with MqttRecorder(mqtt_broker.url) as rec:
        result = run_simulation(mqtt_broker.url, fps=10, max_frames=10, seed=1)
        assert rec.wait_until(lambda: rec.count("i/cam") == 10, 10)
    assert result.frames == 10
    frames = rec.payloads("i/cam")
    for msg in frames:
        assert TS.match(msg["ts"])
        assert decode(jpeg_of(msg)).shape == (240, 320, 3)
    stamps = [m["ts"] for m in frames]
    assert stamps == sorted(stamps) and len(set(stamps)) == 10


def test_stock_reports_over_mqtt_match_the_ground_truth_and_the_pictures(mqtt_broker):
    truth: list[tuple[str, dict, dict]] = []
    with MqttRecorder(mqtt_broker.url) as rec:
        result = run_simulation(mqtt_broker.url, fps=10, max_frames=40, seed=4, change_every_s=0.4,
                                stock_interval_s=1.0, on_publish=lambda tp, p, s: truth.append((tp, p, s)))
        sent = sum(1 for tp, _, _ in truth if tp in ("i/cam", "f/i/stock"))
        assert rec.wait_until(lambda: rec.count("i/cam") + rec.count("f/i/stock") == sent, 10)
    assert result.stock_changes >= 3

    reports = rec.payloads("f/i/stock")
    assert reports == [p for tp, p, _ in truth if tp == "f/i/stock"]  # nothing lost, nothing reordered
    for report, (_, _, stock) in zip(reports, [t for t in truth if t[0] == "f/i/stock"]):
        assert len(report["stockItems"]) == 9
        assert stock_of(report) == stock

    # every frame shows the stock of the last report at or before its ts
    timeline = sorted((r["ts"], i, stock_of(r)) for i, r in enumerate(reports))
    for frame in rec.payloads("i/cam"):
        in_force = [s for ts, _, s in timeline if ts <= frame["ts"]][-1]
        assert read_stock(decode(jpeg_of(frame))) == in_force, frame["ts"]
    # and the stock seen in the pictures does change over the run
    assert len({tuple(read_stock(decode(jpeg_of(f))).values()) for f in rec.payloads("i/cam")}) >= 3


def test_sensor_topics_carry_the_txt_controller_fields(mqtt_broker):
    with MqttRecorder(mqtt_broker.url) as rec:
        run_simulation(mqtt_broker.url, fps=10, max_frames=12, sensor_interval_s=0.5)
        assert rec.wait_until(lambda: rec.count("i/bme680") >= 2 and rec.count("i/ldr") >= 2, 5)
    for topic, fields in SENSOR_FIELDS.items():
        for msg in rec.payloads(topic):
            assert set(msg) == fields and TS.match(msg["ts"])
    assert all(0 <= m["br"] <= 100 for m in rec.payloads("i/ldr"))
    assert all(15 < m["t"] < 30 and 900 < m["p"] < 1100 for m in rec.payloads("i/bme680"))


def test_two_runs_with_the_same_seed_publish_the_same_stock_sequence(mqtt_broker):
    def stocks(seed):
        seen = []
        run_simulation(mqtt_broker.url, fps=10, max_frames=15, seed=seed, change_every_s=0.3,
                       stock_interval_s=100, on_publish=lambda tp, p, s: tp == "f/i/stock" and seen.append(s))
        return seen

    first = stocks(9)
    assert len(first) >= 3
    assert first == stocks(9)
    assert first != stocks(10)


def test_the_simulator_reconnects_after_a_broker_restart_and_frames_arrive_again(mqtt_broker):
    with MqttRecorder(mqtt_broker.url) as rec:
        stop, thread, out = run_in_background(mqtt_broker.url, fps=10, seed=2, change_every_s=60)
        try:
            assert rec.wait_until(lambda: rec.count("i/cam") >= 5, 10)
            mqtt_broker.restart(downtime_s=0.5)
            restarted = time.monotonic()
            assert rec.wait_until(lambda: any(t > restarted for _, t in rec.on("i/cam")), 12), \
                "no frame after the broker restart"
            n = len([t for _, t in rec.on("i/cam") if t > restarted])
            assert rec.wait_until(lambda: len([t for _, t in rec.on("i/cam") if t > restarted]) >= n + 5, 5)
            # the stock is announced again on the new broker
            assert rec.wait_until(lambda: any(t > restarted for _, t in rec.on("f/i/stock")), 5)
        finally:
            stop.set()
            thread.join(10)
    assert "error" not in out, out.get("error")
    assert out["result"].connects >= 2


def test_the_simulate_command_runs_standalone_and_prints_progress(mqtt_broker):
    with MqttRecorder(mqtt_broker.url) as rec:
        proc = subprocess.run([sys.executable, "-m", "factory_assets.cli.simulate", "simulate",
                               "--mqtt", mqtt_broker.url, "--frames", "6", "--fps", "10", "--seed", "3",
                               "--progress-every", "0.2"],
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
    args = parser.parse_args(["simulate", "--mqtt", "mqtt://127.0.0.1:1", "--fps", "4", "--seed", "2",
                              "--duration", "3", "--camera-id", "cam-9", "--change-every", "5"])
    assert (args.mqtt, args.fps, args.seed, args.duration, args.camera_id, args.change_every) == \
           ("mqtt://127.0.0.1:1", 4.0, 2, 3.0, "cam-9", 5.0)
    assert callable(args.func)
