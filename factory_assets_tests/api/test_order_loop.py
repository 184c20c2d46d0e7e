"""The order loop on real parts: POST -> the API's dispatcher -> f/o/order on a real Mosquitto ->
the factory's controller (the simulated factory, or the test speaking its f/i/order messages)
-> the real ingester stores them -> the order's state follows -> the next order goes out."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from datetime import timedelta

import httpx
import pytest

from factory_assets.storage.frames import wait_until
from factory_assets.vocabulary import ORDER_STATE_TOPIC, ORDER_TOPIC, parse_ts, utcnow
from factory_assets_tests.api.conftest import report
from factory_assets_tests.fixtures.mqtt import MqttRecorder

FID = "factory-1"
OFFSET_S = 120.0  # the controller's clock runs two minutes ahead of ours


def order_ingester(fdb, url: str):
    """The real ingester: it stores every controller message in ``fdb.mqtt``."""
    from factory_assets.ingest.mqtt import MqttIngester
    from factory_assets.ingest.service import Ingestor

    ingester = MqttIngester(Ingestor(fdb), url, progress_every=0).start()
    assert ingester.subscribed.wait(20)
    return ingester


class Controller:
    """The factory's controller as far as orders go: publishes ``f/i/order`` at QoS 1, stamped
    in its own clock (``offset_s`` ahead of ours), as the TXT does."""

    def __init__(self, url: str, offset_s: float = OFFSET_S):
        import paho.mqtt.client as mqtt

        from factory_assets.ingest.mqtt import parse_mqtt_url

        self.offset_s = offset_s
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        host, port = parse_mqtt_url(url)
        connected = threading.Event()
        self.client.on_connect = lambda *a, **k: connected.set()
        self.client.connect(host, port)
        self.client.loop_start()
        assert connected.wait(20)

    def say(self, state: str, kind: str, topic: str = ORDER_STATE_TOPIC, **fields) -> None:
        from factory_assets.twin.orders import controller_ts

        payload = {"ts": controller_ts(utcnow() + timedelta(seconds=self.offset_s)), "state": state, "type": kind,
                   **fields}
        self.client.publish(topic, json.dumps(payload), qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def api_server(fdb, url: str, **rules):
    from factory_assets.api.app import ApiSettings, TwinApiServer
    from factory_assets.twin.orders import OrderRules

    return TwinApiServer(fdb, ApiSettings(mqtt_url=url, keepalive=0.5, order_interval=0.2,
                                          order_rules=OrderRules(**rules))).start()


def post(api_url: str, token: str, kind: str, key: str, factory_id: str = FID) -> dict:
    r = httpx.post(f"{api_url}/api/factories/{factory_id}/orders", json={"type": kind},
                   headers={"Authorization": f"Bearer {token}", "Idempotency-Key": key}, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()


def state_of(fdb, order_id: str) -> str | None:
    return (fdb.db["twin_orders"].find_one({"_id": order_id}, {"state": 1}) or {}).get("state")


def reaches(fdb, order_id: str, state: str, timeout: float = 20) -> bool:
    return wait_until(lambda: state_of(fdb, order_id) == state, timeout)


def near_factory_clock(ts: str) -> bool:
    """The ts of a send is our clock plus the recorded offset (a few seconds of test run aside)."""
    return abs((parse_ts(ts) - (utcnow() + timedelta(seconds=OFFSET_S))).total_seconds()) < 10


def test_posted_orders_go_out_one_at_a_time_stamped_in_the_factory_clock_and_follow_the_controller(
        fdb, mqtt_broker, write_token):
    from factory_assets.storage.clocks import record_offset

    report(fdb, 5)  # 1 red, 2 blue, 2 white
    record_offset(fdb, FID, OFFSET_S, samples=20)
    ingester = order_ingester(fdb, mqtt_broker.url)
    controller = Controller(mqtt_broker.url)
    # a 2 s acknowledgement timeout: a re-send after ORDERED would show within the passes below
    api = api_server(fdb, mqtt_broker.url, ack_timeout_s=2.0)
    dispatcher = api.app.state.dispatcher
    try:
        with MqttRecorder(mqtt_broker.url, topics=(ORDER_TOPIC,)) as sent:
            red = post(api.url, write_token, "RED", "order-red-1")
            blue = post(api.url, write_token, "BLUE", "order-blue-1")
            assert post(api.url, write_token, "RED", "order-red-1")["id"] == red["id"]  # a retry: same order
            assert sent.wait_until(lambda: sent.count(ORDER_TOPIC) >= 1, 20)
            (first,) = sent.payloads(ORDER_TOPIC)
            assert set(first) == {"ts", "type"} and first["type"] == "RED" and near_factory_clock(first["ts"])
            controller.say("ORDERED", "RED")
            assert reaches(fdb, red["id"], "ordered")
            controller.say("IN_PROCESS", "RED")
            assert reaches(fdb, red["id"], "in_process")
            twin = httpx.get(f"{api.url}/api/factories/{FID}/twin").json()
            assert wait_until(lambda: [(e["type"], e["state"]) for e in httpx.get(
                f"{api.url}/api/factories/{FID}/twin").json()["orders"]] == [("RED", "in_process"), ("BLUE", "queued")],
                10), twin["orders"]
            # passes well past the acknowledgement timeout: neither a re-send nor the queued BLUE
            passes = dispatcher.passes
            assert wait_until(lambda: dispatcher.passes >= passes + 15, 30)
            assert sent.count(ORDER_TOPIC) == 1 and state_of(fdb, blue["id"]) == "queued"
            controller.say("SHIPPED", "RED")
            assert reaches(fdb, red["id"], "shipped")
            controller.say("WAITING_FOR_ORDER", "RED")
            assert sent.wait_until(lambda: sent.count(ORDER_TOPIC) >= 2, 20)
            second = sent.payloads(ORDER_TOPIC)[1]
            assert second["type"] == "BLUE" and near_factory_clock(second["ts"])
            assert reaches(fdb, blue["id"], "sent")
            listed = httpx.get(f"{api.url}/api/factories/{FID}/orders").json()
            assert [(o["type"], o["state"]) for o in listed["items"]] == [("BLUE", "sent"), ("RED", "shipped")]
            assert listed["factory"]["current"] == blue["id"]
    finally:
        api.stop()
        controller.close()
        ingester.stop()


def test_an_order_the_factory_does_not_acknowledge_is_sent_again_with_a_fresh_ts_then_failed(
        fdb, mqtt_broker, write_token):
    from factory_assets.storage.clocks import record_offset

    report(fdb, 0)  # one red piece
    record_offset(fdb, FID, OFFSET_S, samples=20)
    api = api_server(fdb, mqtt_broker.url, ack_timeout_s=0.5, max_attempts=2)
    try:
        with MqttRecorder(mqtt_broker.url, topics=(ORDER_TOPIC,)) as sent:
            order = post(api.url, write_token, "RED", "never-acknowledged")
            assert reaches(fdb, order["id"], "failed")
            first, second = sent.payloads(ORDER_TOPIC)
            assert first["type"] == second["type"] == "RED"
            assert parse_ts(second["ts"]) > parse_ts(first["ts"]) and near_factory_clock(second["ts"])
        stored = httpx.get(f"{api.url}/api/factories/{FID}/orders/{order['id']}").json()
        assert stored["reason"].startswith("the factory never acknowledged the order: 2 send(s)")
        assert [a["ts"] for a in stored["attempts"]] == [first["ts"], second["ts"]]
        assert wait_until(lambda: httpx.get(f"{api.url}/api/factories/{FID}/twin").json()["orders"] == [], 10)
    finally:
        api.stop()


def test_an_order_placed_while_the_broker_is_down_is_sent_when_it_is_back_and_a_restarted_api_follows_it(
        fdb, mqtt_broker, write_token):
    report(fdb, 0)
    ingester = order_ingester(fdb, mqtt_broker.url)
    mqtt_broker.stop()
    api = api_server(fdb, mqtt_broker.url, ack_timeout_s=30)
    try:
        order = post(api.url, write_token, "RED", "while-the-broker-is-down")
        dispatcher = api.app.state.dispatcher
        passes = dispatcher.passes
        assert wait_until(lambda: dispatcher.passes >= passes + 3, 20)
        assert state_of(fdb, order["id"]) == "queued"  # nothing recorded as sent without a broker
        mqtt_broker.start()
        assert reaches(fdb, order["id"], "sent", 60)
        # the ingester stores our order message like every message on the broker
        assert wait_until(lambda: fdb.mqtt.find_one({"topic": ORDER_TOPIC}), 30)
        assert fdb.mqtt.find_one({"topic": ORDER_TOPIC})["payload"]["type"] == "RED"
    finally:
        api.stop()
    # the factory takes the order while no API runs; the ingester stores what it says
    controller = Controller(mqtt_broker.url)
    try:
        controller.say("ORDERED", "RED")
        controller.say("IN_PROCESS", "RED")
        assert wait_until(lambda: fdb.mqtt.find_one({"topic": ORDER_STATE_TOPIC, "payload.state": "IN_PROCESS"}), 20)
        assert state_of(fdb, order["id"]) == "sent"
        api = api_server(fdb, mqtt_broker.url, ack_timeout_s=30)
        try:
            assert reaches(fdb, order["id"], "in_process")
            events = [e["state"] for e in fdb.db["twin_orders"].find_one({"_id": order["id"]})["events"]]
            assert events == ["queued", "sent", "ordered", "in_process"]
            assert len(fdb.db["twin_orders"].find_one({"_id": order["id"]})["attempts"]) == 1
        finally:
            api.stop()
    finally:
        controller.close()
        ingester.stop()


def test_two_api_processes_dispatching_at_once_send_an_order_once(fdb, mqtt_broker):
    from factory_assets.api.orders import MqttOrderLink, OrderDispatcher
    from factory_assets.twin.orders import OrderRules, place_orders
    from factory_assets.vocabulary.mqtt import MqttTarget

    report(fdb, 0)
    _, (order,), _ = place_orders(fdb, FID, ["RED"])
    # no lease at all (0 s): only the order-in-work and send records keep the two apart
    rules = OrderRules(lease_s=0)
    links = [MqttOrderLink(MqttTarget.parse(mqtt_broker.url)).start() for _ in range(2)]
    dispatchers = [OrderDispatcher(fdb, link, rules) for link in links]
    try:
        assert all(link.connected.wait(20) for link in links)
        with MqttRecorder(mqtt_broker.url, topics=(ORDER_TOPIC,)) as sent:
            barrier = threading.Barrier(len(dispatchers))
            published: list[int] = []

            def run(d):
                barrier.wait(30)
                published.append(d.pass_once())

            threads = [threading.Thread(target=run, args=(d,)) for d in dispatchers]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert sorted(published) == [0, 1]
            assert sent.wait_until(lambda: sent.count(ORDER_TOPIC) >= 1, 10)
        stored = fdb.db["twin_orders"].find_one({"_id": order["_id"]})
        assert stored["state"] == "sent" and len(stored["attempts"]) == 1 and stored["attempts"][0]["broker_ack"]
        assert sent.count(ORDER_TOPIC) == 1
    finally:
        for link in links:
            link.stop()


def test_a_posted_order_ships_a_piece_out_of_the_simulated_factory_and_the_reported_stock_falls(
        fdb, mqtt_broker, write_token):
    from factory_assets.simulation.factory import Timings
    from factory_assets.simulation.publisher import run_simulation
    from factory_assets.storage.clocks import record_offset
    from factory_assets.twin.live import apply_latest_stock
    from factory_assets.twin.orders import reported_counts

    ingester = order_ingester(fdb, mqtt_broker.url)
    stop = threading.Event()
    # the simulated controller's clock runs 30 s ahead: an order stamped in our clock would be stale.
    # No arrivals and no other customer: only our order moves the stock; its durations at 1/100
    sim = threading.Thread(target=run_simulation, kwargs=dict(
        mqtt_url=mqtt_broker.url, fps=2, seed=3, stop_event=stop, customer=False, arrivals=False,
        timings=Timings(scale=0.01), clock_offset_s=30.0))
    sim.start()
    record_offset(fdb, FID, 30.0, samples=1)  # the ingester's estimate of that offset
    api = api_server(fdb, mqtt_broker.url, ack_timeout_s=30)
    try:
        # the live updater's job (f/i/stock -> twin.reported) done here through the same function
        assert wait_until(lambda: apply_latest_stock(fdb) or fdb.twin.find_one({"_id": FID}), 30)
        before = reported_counts(fdb.twin.find_one({"_id": FID}))
        colour = max(before, key=before.get)
        assert before[colour] > 0
        order = post(api.url, write_token, colour.upper(), "ship-one")
        assert reaches(fdb, order["id"], "shipped", 60)
        events = [e["state"] for e in fdb.db["twin_orders"].find_one({"_id": order["id"]})["events"]]
        assert events == ["queued", "sent", "ordered", "in_process", "shipped"]

        def fell():
            apply_latest_stock(fdb)
            return reported_counts(fdb.twin.find_one({"_id": FID}))[colour] == before[colour] - 1

        assert wait_until(fell, 30)
        assert len(fdb.db["twin_orders"].find_one({"_id": order["id"]})["attempts"]) == 1
    finally:
        api.stop()
        stop.set()
        sim.join(30)
        ingester.stop()


# -- logins and prefixes: the CLI against a Mosquitto that refuses anonymous clients --------------

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


@contextmanager
def mosquitto_with_login(tmp_path, user: str, password: str):
    """A Mosquitto that lets in only ``user`` with ``password`` (a password file, like the TXT's)."""
    from factory_assets.simulation.broker import port_accepts

    if not (os.path.exists(MOSQUITTO) and os.path.exists(MOSQUITTO_PASSWD)):
        pytest.skip("mosquitto and mosquitto_passwd are needed (apt-get install mosquitto)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    passwd = tmp_path / "passwd"
    subprocess.run([MOSQUITTO_PASSWD, "-b", "-c", str(passwd), user, password], check=True, capture_output=True)
    passwd.chmod(0o600)
    conf = tmp_path / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous false", f"password_file {passwd}", "persistence false",
             "log_dest stderr"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: port_accepts(port), 20)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def logged_in_recorder(port: int, user: str, password: str, topic: str):
    import paho.mqtt.client as mqtt

    got: list[tuple[str, dict]] = []
    cond = threading.Condition()
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.username_pw_set(user, password)
    client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(topic, 1)
    client.on_subscribe = lambda *a, **k: subscribed.set()

    def on_message(c, u, msg):
        with cond:
            got.append((msg.topic, json.loads(msg.payload)))
            cond.notify_all()

    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert subscribed.wait(20)
    return client, got, cond


def test_the_api_logs_in_to_the_broker_and_sends_a_factorys_orders_under_its_prefix(fdb, tmp_path, write_token):
    report(fdb, 0, factory_id="factory-7")  # one red piece in factory-7's rack
    with mosquitto_with_login(tmp_path, "txt", "s3cret-pw") as port:
        client, got, cond = logged_in_recorder(port, "txt", "s3cret-pw", "#")
        env = {**os.environ, "FACTORY_MQTT_PASSWORD": "s3cret-pw", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "factory_assets.cli", "api", "--port", "0",
                                 "--mqtt", f"mqtt://txt@127.0.0.1:{port}", "--prefix", "/j1/txt/1/=factory-7"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            lines = [proc.stdout.readline() for _ in range(1)]
            while "twin API and page on" not in lines[-1] and lines[-1] and len(lines) < 100:
                lines.append(proc.stdout.readline())  # log lines may come first
            line = lines[-1]
            assert "twin API and page on http://127.0.0.1:" in line, lines
            assert f"sent through mqtt://txt:***@127.0.0.1:{port} on /j1/txt/1/f/o/order (factory-7)" in line
            assert "s3cret" not in line
            api_url = line.split(" on ", 1)[1].split("/ ", 1)[0]
            order = post(api_url, write_token, "RED", "prefixed-1", factory_id="factory-7")
            with cond:
                assert cond.wait_for(lambda: got, 30)
            ((topic, payload),) = got
            assert topic == "/j1/txt/1/f/o/order" and payload["type"] == "RED"
            assert reaches(fdb, order["id"], "sent")
        finally:
            proc.terminate()
            out, _ = proc.communicate(timeout=30)
            client.disconnect()
            client.loop_stop()
        assert "s3cret" not in out
