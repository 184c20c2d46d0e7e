"""The simulated factory obeys the TXT controller's rules over a real Mosquitto: the camera
switch (c/cam), QoS and formats of every topic, orders that ship a piece out (and the ones the
controller ignores), the warehouse fault, the crane's travel in the pictures, topic prefixes
and logins. The facts come from the controller's public programs (docs/simulator.md)."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from factory_assets.simulation.broker import mosquitto_binary, port_accepts
from factory_assets.simulation.factory import FactorySimulator, Timings, iso_ms
from factory_assets.simulation.publisher import run_in_background, run_simulation
from factory_assets.vocabulary import STATIONS, TYPES, formats, parse_ts
from factory_assets_tests.fixtures.mqtt import MqttRecorder, mqtt_broker  # noqa: F401
from factory_assets_tests.simulation.pictures import shows, stock_of

FAST = Timings(scale=0.01)
CONTROLLER_TOPICS = {"i/cam", "i/bme680", "i/ldr", "f/i/stock", "f/i/order"} | {f"f/i/state/{s}" for s in STATIONS}


class QosRecorder(MqttRecorder):
    """Also keeps each message's QoS and retain flag as delivered (subscribed at QoS 1, the
    broker delivers min(published QoS, 1))."""

    def __init__(self, url: str, **kwargs):
        super().__init__(url, **kwargs)
        self.delivered: list[tuple[str, int, bool, bytes]] = []

    def _on_message(self, client, userdata, msg):
        with self._cond:
            self.delivered.append((msg.topic, msg.qos, bool(msg.retain), bytes(msg.payload)))
        super()._on_message(client, userdata, msg)


def send(url: str, topic: str, *payloads, username: str | None = None, password: str | None = None) -> None:
    """Publish each payload (dict -> JSON, bytes as they are) at QoS 1, in order, from one client."""
    import paho.mqtt.client as mqtt

    from factory_assets.vocabulary.mqtt import MqttTarget

    target = MqttTarget.parse(url)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    if username:
        client.username_pw_set(username, password)
    client.connect(target.host, target.port)
    client.loop_start()
    try:
        for payload in payloads:
            body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            client.publish(topic, body, qos=1).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def now_ts(offset_s: float = 0.0) -> str:
    return iso_ms(datetime.now(timezone.utc) + timedelta(seconds=offset_s))


def states(rec: MqttRecorder, topic: str = "f/i/order") -> list[tuple[str, str]]:
    """f/i/order (state, type) in the order received, repeats of the same state folded."""
    out: list[tuple[str, str]] = []
    for p in rec.payloads(topic):
        if not out or out[-1] != (p["state"], p["type"]):
            out.append((p["state"], p["type"]))
    return out


def on_grid(frames: list[dict], period: float) -> bool:
    """The frames' ts are 1/fps apart (or a multiple of it, where a busy machine skipped frames)."""
    gaps = [(parse_ts(b["ts"]) - parse_ts(a["ts"])).total_seconds() for a, b in zip(frames, frames[1:])]
    steps = [gap / period for gap in gaps]
    return bool(steps) and min(steps) == pytest.approx(1, abs=0.02) and \
        all(s >= 0.98 and abs(s - round(s)) < 0.02 for s in steps)


def seed_missing_a_colour() -> tuple[int, str]:
    for seed in range(100):
        stock = FactorySimulator(seed).stock.values()
        missing = [k for k in TYPES if k not in stock]
        if missing and any(stock):
            return seed, missing[0]
    raise AssertionError("no seed with a colour missing")


# -- the camera ---------------------------------------------------------------------------

def test_the_camera_publishes_no_frame_before_c_cam_switches_it_on_and_none_after_it_switches_off(mqtt_broker):
    with MqttRecorder(mqtt_broker.url) as rec:
        stop, thread, out = run_in_background(mqtt_broker.url, fps=20, sensor_interval_s=0.05, customer=False,
                                              arrivals=False, broadcast_retry_s=0.1)
        try:
            # 10 sensor rounds = 0.5 s of the factory, 10 frames had the camera been on
            assert rec.wait_until(lambda: rec.count("i/ldr") >= 10, 10)
            assert rec.count("i/cam") == 0
            assert rec.count("i/broadcast") >= 3  # the controller announces itself until it hears from us
            send(mqtt_broker.url, "c/cam", {"on": True, "fps": 2})
            assert rec.wait_until(lambda: rec.count("i/cam") >= 5, 10)
            announced = rec.count("i/broadcast")
            send(mqtt_broker.url, "c/cam", {"on": False})
            n = rec.count("i/ldr")
            assert rec.wait_until(lambda: rec.count("i/ldr") >= n + 5, 10)
            frames = rec.count("i/cam")
            assert rec.wait_until(lambda: rec.count("i/ldr") >= n + 15, 10)
            assert rec.count("i/cam") == frames  # switched off: no frame over 0.5 s of the factory
            assert rec.count("i/broadcast") == announced
        finally:
            stop.set()
            thread.join(10)
    assert "error" not in out, out.get("error")
    assert out["result"].camera_switches == 2
    # run_simulation's fps is the rate asked for (a fixed schedule), whatever c/cam asks
    assert on_grid(rec.payloads("i/cam"), 0.05)


def test_a_retained_c_cam_sent_before_the_controller_connected_switches_the_camera_on(mqtt_broker):
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", mqtt_broker.port)
    client.loop_start()
    client.publish("c/cam", json.dumps({"on": True, "fps": 2}), qos=1, retain=True).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()
    with MqttRecorder(mqtt_broker.url, topics=("i/#",)) as rec:
        result = run_simulation(mqtt_broker.url, fps=20, max_frames=5, customer=False, arrivals=False)
        assert rec.wait_until(lambda: rec.count("i/cam") == 5, 5)
    assert result.frames == 5 and result.camera_switches == 1


def test_the_simulate_command_without_fps_follows_the_rate_c_cam_asks_for(mqtt_broker):
    with MqttRecorder(mqtt_broker.url) as rec:
        proc = subprocess.Popen([sys.executable, "-m", "factory_assets.cli.simulate", "simulate", "--mqtt",
                                 mqtt_broker.url, "--frames", "5", "--no-customer", "--progress-every", "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert rec.wait_until(lambda: rec.count("f/i/order") >= 1, 30)  # up and subscribed
            assert rec.count("i/cam") == 0
            send(mqtt_broker.url, "c/cam", {"on": True, "fps": 8})
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 0, stderr
        assert rec.wait_until(lambda: rec.count("i/cam") == 5, 5)
    assert "done: 5 frames" in stdout
    assert on_grid(rec.payloads("i/cam"), 0.125)


# -- a lively factory: every message as the controller sends it ------------------------------

@pytest.fixture(scope="module")
def lively():
    """4 s of a busy factory (a hundred times faster): pieces arriving, the other customer's
    orders, sensors, frames; every message recorded as delivered."""
    from factory_assets.simulation.broker import start_broker

    broker = start_broker(port=0)
    try:
        with QosRecorder(broker.url) as rec:
            result = run_simulation(broker.url, fps=20, duration_s=4.0, seed=5, change_every_s=0.15, timings=FAST,
                                    sensor_interval_s=0.25, camera_on=True)
            published = sum(result.published.values()) + result.customer_orders
            assert rec.wait_until(lambda: len(rec.delivered) >= published, 10)
        yield rec, result
    finally:
        broker.close()


def test_each_topic_arrives_at_the_controllers_qos_unretained_and_in_the_controllers_format(lively):
    rec, result = lively
    topics = {topic for topic, *_ in rec.delivered}
    assert topics == CONTROLLER_TOPICS | {"i/broadcast", "f/o/order"}  # f/o/order: the other customer's
    for topic, qos, retained, body in rec.delivered:
        assert qos == (0 if topic == "i/cam" else 1), topic
        assert not retained, topic
        assert formats.problems(topic, json.loads(body)) == [], (topic, body[:300])
    assert result.frames + result.dropped_frames == 80
    assert sum(result.published.values()) == len(rec.delivered) - result.customer_orders


def test_stock_rises_and_falls_and_order_states_move_with_nobody_but_the_factory_ordering(lively):
    rec, result = lively
    assert {c.kind for c in result.changes} >= {"store", "retrieve"}
    assert result.customer_orders >= 2 and result.orders == result.customer_orders and result.faults == 0
    assert [p["type"] for p in rec.payloads("f/o/order")] == \
           [p["type"] for p in rec.payloads("f/i/order") if p["state"] == "ORDERED"][:result.customer_orders]
    seen = {state for state, _ in states(rec)}
    assert seen == {"WAITING_FOR_ORDER", "ORDERED", "IN_PROCESS", "SHIPPED"}
    counts = [sum(v is not None for v in stock_of(p).values()) for p in rec.payloads("f/i/stock")]
    assert any(b > a for a, b in zip(counts, counts[1:])) and any(b < a for a, b in zip(counts, counts[1:]))
    for station in STATIONS:  # every station announced at start, then only when its state changes
        seen = [(p["code"], p["active"], p.get("target"), p["description"])
                for p in rec.payloads(f"f/i/state/{station}")]
        assert seen and seen[0][:2] in ((1, 0),) and all(a != b for a, b in zip(seen, seen[1:])), station
    busy = {p["code"] for s in ("hbw", "vgr", "mpo", "sld") for p in rec.payloads(f"f/i/state/{s}")}
    assert busy == {1, 2}


# -- an order ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    """One order through a real broker, with a slow crane (0.5-0.9 s) and the camera at 20 fps."""
    from factory_assets.simulation.broker import start_broker

    broker = start_broker(port=0)
    timings = Timings(crane_travel_s=(10.0, 18.0), intake_s=1, handover_s=1, process_s=2, deliver_s=1, scale=0.05)
    start = datetime.now(timezone.utc)
    truth: dict[str, dict] = {}
    try:
        with MqttRecorder(broker.url) as rec:
            stop, thread, out = run_in_background(
                broker.url, fps=20, seed=3, camera_on=True, customer=False, arrivals=False, timings=timings,
                start=start, on_publish=lambda tp, p, s: tp == "i/cam" and truth.__setitem__(p["ts"], s))
            try:
                assert rec.wait_until(lambda: rec.count("f/i/stock") >= 1, 10)
                before = stock_of(rec.payloads("f/i/stock")[-1])
                kind = next(v for v in before.values() if v)
                send(broker.url, "f/o/order", {"ts": now_ts(), "type": kind})
                assert rec.wait_until(lambda: ("SHIPPED", kind) in states(rec)
                                      and states(rec)[-1] == ("WAITING_FOR_ORDER", kind), 20)
                n = rec.count("i/cam")
                assert rec.wait_until(lambda: rec.count("i/cam") >= n + 5, 10)
            finally:
                stop.set()
                thread.join(10)
        assert "error" not in out, out.get("error")
        yield rec, out["result"], kind, before, start, truth
    finally:
        broker.close()


def test_an_order_ships_one_piece_out_with_the_stock_reported_before_the_crane_moves(shipped):
    rec, result, kind, before, _, _ = shipped
    assert states(rec) == [("WAITING_FOR_ORDER", "NONE"), ("ORDERED", kind), ("IN_PROCESS", kind),
                           ("SHIPPED", kind), ("WAITING_FOR_ORDER", kind)]
    reports = [stock_of(p) for p in rec.payloads("f/i/stock")]
    assert sum(v == kind for v in reports[-1].values()) == sum(v == kind for v in before.values()) - 1
    assert sum(a != b for a, b in zip(before.values(), reports[-1].values())) == 1
    (change,) = result.changes
    assert change.kind == "retrieve" and change.before["type"] == kind and change.visible_at > change.t
    # the report with the piece gone comes before IN_PROCESS (the crane has fetched it by then)
    order_of = [(tp, json.loads(p)) for tp, p, _ in rec.messages if tp in ("f/i/stock", "f/i/order")]
    first_fall = next(i for i, (tp, p) in enumerate(order_of) if tp == "f/i/stock" and stock_of(p) == reports[-1])
    in_process = next(i for i, (tp, p) in enumerate(order_of) if tp == "f/i/order" and p["state"] == "IN_PROCESS")
    assert first_fall < in_process
    assert result.orders == 1 and result.ignored_orders == 0


def test_the_camera_shows_the_old_rack_while_the_crane_travels_and_the_new_one_after(shipped):
    rec, result, kind, before, start, truth = shipped
    (change,) = result.changes
    in_transit, after = [], []
    for frame in rec.payloads("i/cam"):
        t = (parse_ts(frame["ts"]) - start).total_seconds()
        rack = shows(frame)
        assert rack == truth[frame["ts"]]  # the ground truth is the rack the frame shows
        if change.t <= t < change.visible_at:
            in_transit.append(rack)
        elif t >= change.visible_at:
            after.append(rack)
    assert len(in_transit) >= 5 and len(after) >= 5
    assert all(r[change.slot] == kind for r in in_transit)  # reported gone, still in the rack
    assert all(r[change.slot] is None for r in after)


def test_stale_and_malformed_orders_are_ignored_by_the_controllers_drifted_clock(mqtt_broker):
    with MqttRecorder(mqtt_broker.url) as rec:
        stop, thread, out = run_in_background(mqtt_broker.url, fps=20, seed=3, customer=False, arrivals=False,
                                              timings=FAST, clock_offset_s=30.0)
        try:
            assert rec.wait_until(lambda: rec.count("f/i/stock") >= 1, 10)
            # every ts in the controller's clock, 30 s ahead of ours
            ahead = (parse_ts(rec.payloads("f/i/stock")[0]["ts"]) - datetime.now(timezone.utc)).total_seconds()
            assert 25 < ahead < 31
            kind = next(v for v in stock_of(rec.payloads("f/i/stock")[0]).values() if v)
            send(mqtt_broker.url, "f/o/order",
                 {"ts": now_ts(), "type": kind},  # our clock: 30 s off the controller's
                 b"RED please", [{"ts": now_ts(30), "type": kind}], {"ts": now_ts(30), "type": kind.lower()},
                 {"type": kind},
                 {"ts": now_ts(30), "type": kind})  # the one the controller takes
            assert rec.wait_until(lambda: states(rec)[-1] == ("WAITING_FOR_ORDER", kind), 10)
        finally:
            stop.set()
            thread.join(10)
    assert "error" not in out, out.get("error")
    result = out["result"]
    assert (result.ignored_orders, result.orders, len(result.changes)) == (5, 1, 1)
    assert [s for s, _ in states(rec)].count("ORDERED") == 1


def test_an_order_for_a_missing_colour_faults_the_warehouse_until_the_quit_button(mqtt_broker):
    seed, missing = seed_missing_a_colour()
    with MqttRecorder(mqtt_broker.url) as rec:
        stop, thread, out = run_in_background(mqtt_broker.url, fps=20, seed=seed, customer=False, arrivals=False,
                                              timings=Timings(scale=0.01, fault_clear_s=None))
        try:
            assert rec.wait_until(lambda: rec.count("f/i/stock") >= 1, 10)
            send(mqtt_broker.url, "f/o/order", {"ts": now_ts(), "type": missing})
            assert rec.wait_until(lambda: any(p["code"] == 4 for p in rec.payloads("f/i/state/hbw")), 10)
            fault = next(p for p in rec.payloads("f/i/state/hbw") if p["code"] == 4)
            assert missing in fault["description"] and fault["active"] == 0
            assert states(rec)[-1] == ("ORDERED", missing)
            send(mqtt_broker.url, "f/o/state/ack", {"ts": now_ts()})
            assert rec.wait_until(lambda: rec.payloads("f/i/state/hbw")[-1]["code"] == 1
                                  and states(rec)[-1] == ("WAITING_FOR_ORDER", missing), 10)
        finally:
            stop.set()
            thread.join(10)
    assert "error" not in out, out.get("error")
    assert out["result"].faults == 1 and out["result"].changes == []
    assert len({json.dumps(p["stockItems"]) for p in rec.payloads("f/i/stock")}) == 1  # nothing left the rack


# -- prefixes and logins ----------------------------------------------------------------------

def test_a_prefixed_simulator_publishes_and_listens_only_under_its_prefix(mqtt_broker):
    prefix = "/j1/txt/1/"
    with MqttRecorder(mqtt_broker.url) as rec:
        stop, thread, out = run_in_background(mqtt_broker.url, fps=20, seed=4, prefix=prefix, change_every_s=0.15,
                                              timings=FAST, sensor_interval_s=0.05)
        try:
            assert rec.wait_until(lambda: rec.count(prefix + "i/ldr") >= 1, 10)
            send(mqtt_broker.url, "c/cam", {"on": True, "fps": 20})  # not under its prefix: not for it
            n = rec.count(prefix + "i/ldr")
            assert rec.wait_until(lambda: rec.count(prefix + "i/ldr") >= n + 10, 10)
            assert rec.count(prefix + "i/cam") == 0
            send(mqtt_broker.url, prefix + "c/cam", {"on": True, "fps": 20})
            assert rec.wait_until(lambda: rec.count(prefix + "i/cam") >= 10, 10)
            assert rec.wait_until(lambda: rec.count(prefix + "f/o/order") >= 1, 10)  # the customer too
        finally:
            stop.set()
            thread.join(10)
    assert "error" not in out, out.get("error")
    ours = {"c/cam", prefix + "c/cam"}
    published = {topic for topic, _, _ in rec.messages} - ours
    assert published and all(topic.startswith(prefix) for topic in published)
    assert {topic[len(prefix):] for topic in published} >= CONTROLLER_TOPICS


@pytest.fixture
def login_broker(tmp_path: Path):
    """A Mosquitto that refuses anonymous clients: user txt, password xtx (the TXT's own)."""
    if not mosquitto_binary():
        pytest.skip("mosquitto is not installed")
    import os
    import socket

    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "txt", "xtx"], check=True,
                   capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous false", f"password_file {passwords}",
             "persistence false", "log_dest stderr"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not port_accepts(port):
            assert proc.poll() is None and time.monotonic() < deadline, "mosquitto did not start"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_simulator_logs_in_with_the_password_from_the_environment_and_never_logs_it(
        login_broker, monkeypatch, caplog):
    import paho.mqtt.client as mqtt

    got = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.username_pw_set("txt", "xtx")
    client.on_connect = lambda c, u, f, rc, p=None: c.subscribe("#", qos=1)
    client.on_message = lambda c, u, msg: msg.topic == "i/cam" and got.set()
    client.connect("127.0.0.1", login_broker)
    client.loop_start()
    caplog.set_level(logging.INFO, logger="factory_assets.simulation")
    try:
        monkeypatch.setenv("FACTORY_MQTT_PASSWORD", "wrong")
        refused = run_simulation(f"mqtt://txt@127.0.0.1:{login_broker}", fps=20, duration_s=0.3, camera_on=True,
                                 connect_timeout_s=1, customer=False)
        assert refused.connects == 0 and not got.is_set()
        monkeypatch.setenv("FACTORY_MQTT_PASSWORD", "xtx")
        result = run_simulation(f"mqtt://txt@127.0.0.1:{login_broker}", fps=20, max_frames=5, camera_on=True,
                                customer=False)
        assert result.connects == 1 and got.wait(5)
    finally:
        client.disconnect()
        client.loop_stop()
    assert f"mqtt://txt:***@127.0.0.1:{login_broker}" in caplog.text
    assert "xtx" not in caplog.text and "wrong" not in caplog.text
