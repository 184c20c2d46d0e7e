"""The ingester against brokers a real factory has: Mosquitto refusing anonymous clients (a
password file, like the TXT's own broker with user ``txt``), a TLS listener with a CA the
test makes, and a broker that carries several factories under topic prefixes (bridges, the
Fischertechnik cloud). Every broker here is a real Mosquitto started by the test."""
from __future__ import annotations

import json
import logging
import uuid

import paho.mqtt.client as mqtt
import pytest

from factory_assets.ingest.mqtt import MqttIngester
from factory_assets.ingest.service import Ingestor
from factory_assets.simulation.broker import ServerTls, mosquitto_binary, start_broker
from factory_assets.storage.frames import wait_until
from factory_assets.vocabulary.mqtt import MqttTarget
from factory_assets_tests.fixtures.mqtt import IngesterProcess, MqttRecorder, ingester_env, make_tls_files
from factory_assets_tests.helpers import cam_payload, jpeg_bytes, stock_payload

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="needs Mosquitto (apt-get install mosquitto)")

USER, PASSWORD = "txt", "s3cret-xtx"


def frame(i: int) -> bytes:
    return cam_payload(jpeg_bytes(size=(48, 32), seed=100 + i), f"2026-11-23T11:00:{i:02d}.000Z")


def publish(url: str, messages, ca_file: str | None = None) -> None:
    """Publish (topic, payload, qos) in order from one client with the URL's login and TLS."""
    target = MqttTarget.parse(url, ca_file=ca_file)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    target.configure(client)
    client.connect(target.host, target.port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=qos) for topic, payload, qos in messages]
        for info in infos:
            info.wait_for_publish(20)
    finally:
        client.disconnect()
        client.loop_stop()


def connack(url: str) -> str:
    """What the broker answers a client logging in as ``url`` says."""
    import threading

    target = MqttTarget.parse(url)
    answered, answer = threading.Event(), []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    target.configure(client)
    client.on_connect = lambda c, u, f, rc, p=None: (answer.append(str(rc)), answered.set())
    client.connect(target.host, target.port)
    client.loop_start()
    try:
        assert answered.wait(20)
    finally:
        client.disconnect()
        client.loop_stop()
    return answer[0]


@pytest.fixture
def login_broker():
    broker = start_broker(users={USER: PASSWORD})
    try:
        yield broker
    finally:
        broker.close()


def test_with_the_right_login_the_ingester_stores_frames_from_a_broker_that_refuses_anonymous_clients(
        fdb, login_broker):
    assert connack(login_broker.url) == "Not authorized"  # the broker really refuses anonymous clients
    ingester = MqttIngester(Ingestor(fdb), login_broker.url_for(USER, PASSWORD), progress_every=0).start()
    try:
        assert ingester.subscribed.wait(20), ingester.last_refusal
        publish(login_broker.url_for(USER, PASSWORD), [("i/cam", frame(i), 0) for i in range(5)])
        assert wait_until(lambda: fdb.frames.count_documents({}) == 5, 20)
        assert ingester.refusals == 0
    finally:
        ingester.stop()
    assert PASSWORD not in ingester.url and PASSWORD not in json.dumps(
        [d["source"] for d in fdb.frames.find({}, {"source": 1, "_id": 0})])


def test_with_a_wrong_password_the_ingester_logs_a_clear_refusal_keeps_retrying_and_does_not_crash(
        fdb, login_broker, caplog):
    caplog.set_level(logging.INFO, logger="factory_assets.ingest.mqtt")
    ingester = MqttIngester(Ingestor(fdb), login_broker.url_for(USER, "wrong-password"), progress_every=0).start()
    try:
        assert wait_until(lambda: ingester.refusals >= 2, 30)  # refused, and tried again
        assert not ingester.connected.is_set() and ingester.failed is None and ingester._writer.is_alive()
    finally:
        ingester.stop()
    refusals = [r.getMessage() for r in caplog.records if "refused the connection" in r.getMessage()]
    assert refusals and refusals[0].startswith(f"MQTT broker mqtt://{USER}:***@127.0.0.1:{login_broker.port} "
                                               "refused the connection")
    assert "Not authorized" in refusals[0] and "FACTORY_MQTT_PASSWORD" in refusals[0]
    assert not any("wrong-password" in r.getMessage() for r in caplog.records)


def test_the_ingest_command_takes_the_password_from_the_environment_and_never_prints_it(
        fdb, mongo_uri, database_name, login_broker):
    url = f"mqtt://{USER}@127.0.0.1:{login_broker.port}"  # no password in the URL or the process list
    ingester = IngesterProcess(url, ingester_env(mongo_uri, database_name, FACTORY_MQTT_PASSWORD=PASSWORD),
                               f"login-{uuid.uuid4().hex[:6]}").start()
    try:
        publish(login_broker.url_for(USER, PASSWORD), [("i/cam", frame(i), 0) for i in range(3)])
        assert wait_until(lambda: fdb.frames.count_documents({}) == 3, 30), ingester.out.text()
    finally:
        output = ingester.stop()
    assert ingester.proc.returncode == 0, output
    assert f"ingesting from mqtt://{USER}:***@127.0.0.1:{login_broker.port}" in output
    assert PASSWORD not in output


@pytest.fixture
def tls_broker(tmp_path):
    files = make_tls_files(tmp_path / "tls")
    broker = start_broker(tls=ServerTls(files.server_cert, files.server_key))
    try:
        yield broker, files
    finally:
        broker.close()


def test_the_ingester_connects_over_tls_with_the_ca_file_and_stores_frames(fdb, tls_broker):
    broker, files = tls_broker
    assert broker.url.startswith("mqtts://")
    ingester = MqttIngester(Ingestor(fdb), broker.url, progress_every=0, ca_file=str(files.ca_cert)).start()
    try:
        assert ingester.subscribed.wait(20), ingester.last_connect_error
        publish(broker.url, [("i/cam", frame(i), 0) for i in range(4)], ca_file=str(files.ca_cert))
        assert wait_until(lambda: fdb.frames.count_documents({}) == 4, 20)
    finally:
        ingester.stop()


def test_without_the_ca_the_ingester_says_why_the_tls_connection_fails_and_keeps_trying(fdb, tls_broker, caplog):
    broker, _ = tls_broker  # the system's CAs do not know the test's CA
    caplog.set_level(logging.INFO, logger="factory_assets.ingest.mqtt")
    ingester = MqttIngester(Ingestor(fdb), broker.url, progress_every=0).start()
    try:
        assert wait_until(lambda: ingester.connect_failures >= 2, 30)
        assert ingester.failed is None and not ingester.subscribed.is_set()
    finally:
        ingester.stop()
    assert "certificate verify failed" in ingester.last_connect_error
    assert any("cannot connect to MQTT broker mqtts://127.0.0.1" in r.getMessage()
               and "certificate verify failed" in r.getMessage() for r in caplog.records)


def test_one_ingester_follows_two_prefixed_factories_stamping_each_document_and_switching_each_camera_on(
        fdb, mqtt_broker):
    prefixes = ["/j1/txt/1/=factory-7", "bridge/plant-b=factory-8"]
    with MqttRecorder(mqtt_broker.url, topics=("/j1/txt/1/c/cam", "bridge/plant-b/c/cam")) as rec:
        ingester = MqttIngester(Ingestor(fdb), mqtt_broker.url, progress_every=0, prefixes=prefixes).start()
        try:
            assert ingester.subscribed.wait(20)
            assert ingester.subscriptions == ("/j1/txt/1/#", "bridge/plant-b/#")
            # each factory's camera is switched on under its own prefix
            assert rec.wait_until(lambda: rec.count("/j1/txt/1/c/cam") >= 1 and rec.count("bridge/plant-b/c/cam") >= 1,
                                  20)
            assert rec.payloads("/j1/txt/1/c/cam")[0] == {"on": True, "fps": 2.0}
            publish(mqtt_broker.url, [
                ("/j1/txt/1/i/cam", frame(1), 0), ("bridge/plant-b/i/cam", frame(2), 0),
                ("/j1/txt/1/f/i/stock", stock_payload("2026-11-23T11:00:03.000Z", {"A1": "RED"}), 1),
                ("bridge/plant-b/f/i/stock", stock_payload("2026-11-23T11:00:03.000Z", {"A1": "RED"}), 1),
                ("bridge/plant-b/i/ldr", b'{"ts":"2026-11-23T11:00:04.000Z","ldr":2345,"br":"84.4"}', 1),
            ])
            assert wait_until(lambda: fdb.frames.count_documents({}) == 2 and fdb.sensors.count_documents({}) == 1
                              and fdb.mqtt.count_documents({"topic": "f/i/stock"}) == 2, 20)
        finally:
            ingester.stop()
    frames = {d["factory_id"]: d["source"]["topic"] for d in fdb.frames.find()}
    assert frames == {"factory-7": "/j1/txt/1/i/cam", "factory-8": "bridge/plant-b/i/cam"}
    stock = {d["factory_id"]: d["source"]["topic"] for d in fdb.mqtt.find({"topic": "f/i/stock"})}
    # the same bytes from two factories: two documents
    assert stock == {"factory-7": "/j1/txt/1/f/i/stock", "factory-8": "bridge/plant-b/f/i/stock"}
    assert fdb.sensors.find_one()["factory_id"] == "factory-8" and fdb.sensors.find_one()["topic"] == "i/ldr"
    # the camera commands it sent came back under each prefix and are stored as that factory's messages
    assert {d["factory_id"] for d in fdb.mqtt.find({"topic": "c/cam"})} == {"factory-7", "factory-8"}
    assert fdb.quarantine.count_documents({}) == 0
