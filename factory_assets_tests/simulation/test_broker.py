"""The MQTT broker the tests and ``make run`` use (Mosquitto, else amqtt): a real subprocess on 127.0.0.1."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest

from factory_assets.simulation.broker import port_accepts, start_broker
from factory_assets_tests.fixtures.mqtt import MqttRecorder, mqtt_broker  # noqa: F401


def publish_and_wait(url: str, topic: str, payload: bytes, qos: int = 1, timeout: float = 10.0) -> None:
    import paho.mqtt.client as mqtt

    from factory_assets.ingest.mqtt import parse_mqtt_url

    host, port = parse_mqtt_url(url)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect(host, port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=qos).wait_for_publish(timeout)
    finally:
        client.disconnect()
        client.loop_stop()


def test_the_broker_listens_on_127_0_0_1_at_the_port_in_its_url(mqtt_broker):
    assert mqtt_broker.url == f"mqtt://127.0.0.1:{mqtt_broker.port}"
    assert mqtt_broker.port > 0
    assert port_accepts(mqtt_broker.port)


def test_an_anonymous_client_can_publish_and_another_receives_it(mqtt_broker):
    with MqttRecorder(mqtt_broker.url) as rec:
        publish_and_wait(mqtt_broker.url, "f/i/stock", b'{"ts":"2026-11-23T10:00:00.000Z"}')
        assert rec.wait_until(lambda: rec.count("f/i/stock") == 1, 5)
    assert rec.on("f/i/stock")[0][0] == b'{"ts":"2026-11-23T10:00:00.000Z"}'


def test_a_20_megabyte_payload_passes_through_the_broker(mqtt_broker):
    payload = bytes(range(256)) * (20 * 1024 * 1024 // 256)
    with MqttRecorder(mqtt_broker.url) as rec:
        publish_and_wait(mqtt_broker.url, "i/cam", payload, timeout=30)
        assert rec.wait_until(lambda: rec.count("i/cam") == 1, 30)
    assert rec.on("i/cam")[0][0] == payload


def test_the_broker_publishes_no_sys_topics(mqtt_broker):
    # Brokers send $SYS (retained) right after SUBACK; a marker published afterwards arrives
    # after them on the same connection, so waiting for it is waiting long enough.
    with MqttRecorder(mqtt_broker.url, topics=("$SYS/#", "probe/sys")) as rec:
        publish_and_wait(mqtt_broker.url, "probe/sys", b"marker")
        assert rec.wait_until(lambda: rec.count("probe/sys") == 1, 10)
    assert [t for t, _, _ in rec.messages if t.startswith("$SYS")] == []


def test_restart_keeps_the_port_and_subscribers_get_messages_again(mqtt_broker):
    port = mqtt_broker.port
    with MqttRecorder(mqtt_broker.url) as rec:
        mqtt_broker.restart()
        assert mqtt_broker.port == port and mqtt_broker.running
        assert rec.wait_until(lambda: rec.subscriptions >= 2, 10), "the subscriber never got back in"
        publish_and_wait(mqtt_broker.url, "i/ldr", b"{}")
        assert rec.wait_until(lambda: rec.count("i/ldr") == 1, 5)


def test_stop_terminates_the_process_cleanly_and_frees_the_port():
    broker = start_broker()
    proc = broker.proc
    broker.stop()
    assert proc.returncode == 0, broker.log_text()[-3000:]
    assert not broker.running
    assert not port_accepts(broker.port)
    broker.close()


def test_start_broker_on_a_given_port_uses_that_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with start_broker(port) as broker:
        assert broker.port == port
        assert port_accepts(port)
    assert not port_accepts(port)


def test_a_second_broker_on_a_busy_port_fails_with_the_reason(mqtt_broker):
    from factory_assets.simulation.broker import BrokerError

    with pytest.raises(BrokerError, match="did not start"):
        start_broker(mqtt_broker.port, startup_timeout=10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_module_runs_in_the_foreground_until_a_signal_and_exits_cleanly(sig):
    proc = subprocess.Popen([sys.executable, "-m", "factory_assets.simulation.broker", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("listening mqtt://127.0.0.1:")
        url = line.split()[1]
        with MqttRecorder(url) as rec:  # a connected client does not prevent the shutdown
            publish_and_wait(url, "i/bme680", b"{}")
            assert rec.wait_until(lambda: rec.count("i/bme680") == 1, 5)
            proc.send_signal(sig)
            assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "shutting down" in proc.stderr.read()


def test_mosquitto_keeps_qos1_messages_for_an_offline_persistent_session_across_its_restart(mqtt_broker):
    import paho.mqtt.client as mqtt

    from factory_assets.storage.frames import wait_until

    if mqtt_broker.kind != "mosquitto":
        pytest.skip("the broker is amqtt (no Mosquitto, or FACTORY_MQTT_BROKER=amqtt): it does not queue for offline sessions")
    received: list[bytes] = []
    subscribed = __import__("threading").Event()

    def session() -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="offline-session", clean_session=False)
        client.on_connect = lambda c, *_: c.subscribe("queued/#", qos=1)
        client.on_subscribe = lambda *_: subscribed.set()
        client.on_message = lambda c, u, msg: received.append(bytes(msg.payload))
        client.connect(mqtt_broker.host, mqtt_broker.port)
        client.loop_start()
        return client

    client = session()
    assert subscribed.wait(10)
    client.disconnect()  # offline now; the session stays on the broker
    client.loop_stop()
    for i in range(10):
        publish_and_wait(mqtt_broker.url, f"queued/{i}", str(i).encode())
    mqtt_broker.restart()  # the queued messages are in its persistence file
    client = session()
    try:
        assert wait_until(lambda: len(received) == 10, 10)
    finally:
        client.disconnect()
        client.loop_stop()
    assert sorted(received) == sorted(str(i).encode() for i in range(10))


def test_amqtt_remains_available_as_the_pip_only_fallback():
    with start_broker(broker="amqtt") as broker:
        assert broker.kind == "amqtt"
        with MqttRecorder(broker.url) as rec:
            publish_and_wait(broker.url, "i/ldr", b"{}")
            assert rec.wait_until(lambda: rec.count("i/ldr") == 1, 5)


class OfflineSession:
    """A persistent session (the ingester's) that subscribes, goes offline, and comes back."""

    def __init__(self, broker, client_id: str = "offline-ingester"):
        import threading

        self.broker, self.client_id = broker, client_id
        self.received: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        self._client = None

    def connect(self) -> "OfflineSession":
        import threading

        import paho.mqtt.client as mqtt

        subscribed = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=False)
        client.on_connect = lambda c, *_: c.subscribe("#", qos=1)
        client.on_subscribe = lambda *_: subscribed.set()
        client.on_message = self._on_message
        client.connect(self.broker.host, self.broker.port)
        client.loop_start()
        assert subscribed.wait(10)
        self._client = client
        return self

    def _on_message(self, client, userdata, msg):
        with self._cond:
            self.received.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    def wait_until(self, condition, timeout: float = 20) -> bool:
        with self._cond:
            return self._cond.wait_for(condition, timeout)

    def topics(self, topic: str) -> list[bytes]:
        with self._cond:
            return [p for t, p in self.received if t == topic]

    def go_offline(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def publish_many(url: str, messages) -> None:
    import paho.mqtt.client as mqtt

    from factory_assets.ingest.mqtt import parse_mqtt_url

    host, port = parse_mqtt_url(url)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect(host, port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=qos) for topic, payload, qos in messages]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()


FRAME = b"f" * 20_000  # about a TXT frame in base64 JSON


def test_the_broker_keeps_qos0_frames_for_an_offline_session_across_its_restart_and_qos1_still_flows_after_them(
        mqtt_broker):
    if mqtt_broker.kind != "mosquitto":
        pytest.skip("amqtt queues nothing for offline sessions")
    session = OfflineSession(mqtt_broker).connect()
    session.go_offline()  # the ingester is down
    # 300 frames (QoS 0) then 5 stock reports (QoS 1): more queued QoS 0 messages than any inflight window
    publish_many(mqtt_broker.url, [("i/cam", b"%04d" % i + FRAME, 0) for i in range(300)]
                 + [("f/i/stock", b"%d" % i, 1) for i in range(5)])
    mqtt_broker.restart()  # the queue is in its persistence file
    session.connect()
    try:
        assert session.wait_until(lambda: len(session.topics("f/i/stock")) == 5)
        assert [p[:4] for p in session.topics("i/cam")] == [b"%04d" % i for i in range(300)]  # all, in order
        # and QoS 1 keeps flowing on this connection (a finite max_inflight_messages stalls it here)
        publish_many(mqtt_broker.url, [("f/i/order", b"live", 1)])
        assert session.wait_until(lambda: session.topics("f/i/order") == [b"live"])
    finally:
        session.go_offline()


def test_a_broker_that_drops_qos0_for_offline_sessions_loses_the_frames_published_meanwhile():
    # what a user's own broker does with Mosquitto's default (queue_qos0_messages false)
    from factory_assets.simulation.broker import QueueLimits, mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("needs Mosquitto")
    with start_broker(queue=QueueLimits.for_outage(qos0=False)) as broker:
        session = OfflineSession(broker).connect()
        session.go_offline()
        publish_many(broker.url, [("i/cam", FRAME, 0) for _ in range(10)] + [("f/i/stock", b"after", 1)])
        session.connect()
        try:
            # the report published after the frames arrives, and no frame before it: they were dropped
            assert session.wait_until(lambda: session.topics("f/i/stock") == [b"after"])
            assert session.topics("i/cam") == []
        finally:
            session.go_offline()


def test_the_offline_queue_is_sized_for_the_stated_outage_and_configurable():
    from pathlib import Path

    from factory_assets.simulation.broker import QueueLimits, mosquitto_config, queue_argv

    thirty = QueueLimits.for_outage()  # the default: 30 minutes at 2 frames/s, 32 KiB a frame
    assert (thirty.messages, thirty.bytes) == (3600 + 1800, 3600 * 32 * 1024 + 1800 * 4 * 1024)
    hour = QueueLimits.for_outage(minutes=60, fps=5, frame_bytes=50_000)
    assert (hour.messages, hour.bytes) == (18000 + 3600, 18000 * 50_000 + 3600 * 4096)
    conf = mosquitto_config(1883, Path("/tmp/x"), queue=hour)
    assert "queue_qos0_messages true" in conf and f"max_queued_messages {hour.messages}" in conf
    assert f"max_queued_bytes {hour.bytes}" in conf and "max_inflight_messages 0" in conf
    assert "allow_anonymous true" in conf
    assert queue_argv(hour) == ["--outage-minutes", "60", "--outage-fps", "5", "--frame-bytes", "50000"]
    assert "queue_qos0_messages false" in mosquitto_config(1883, Path("/tmp/x"), queue=QueueLimits(qos0=False))
    secured = mosquitto_config(8883, Path("/tmp/x"), password_file=Path("/tmp/x/passwd"),
                               certfile=Path("/tmp/x/s.crt"), keyfile=Path("/tmp/x/s.key"))
    assert "allow_anonymous false" in secured and "password_file /tmp/x/passwd" in secured
    assert "certfile /tmp/x/s.crt" in secured and "keyfile /tmp/x/s.key" in secured
