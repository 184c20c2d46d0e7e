"""The MQTT ingester against a real broker started by the test (Mosquitto, else amqtt)."""
import paho.mqtt.client as mqtt
from factory_assets.ingest.mqtt import MqttIngester
from factory_assets.ingest.service import Ingestor
from factory_assets.storage.frames import wait_until
from factory_assets_tests.helpers import cam_payload, jpeg_bytes, stock_payload


def publisher(broker) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.reconnect_delay_set(0.1, 1)
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


def publish_frames(client, start: int, n: int):
    for i in range(start, start + n):
        ts = f"2026-11-23T10:{i // 60:02d}:{i % 60:02d}.000Z"
        client.publish("i/cam", cam_payload(jpeg_bytes(seed=i), ts), qos=1).wait_for_publish(5)


def test_a_simulated_stream_with_bad_messages_is_stored_and_quarantined_without_losing_good_frames(fdb, mqtt_broker):
    broker = mqtt_broker
    ingester = MqttIngester(Ingestor(fdb), broker.url, progress_every=0).start()
    try:
        assert ingester.subscribed.wait(10)  # SUBACK: nothing published from now on is missed
        pub = publisher(broker)
        publish_frames(pub, 0, 10)
        for bad in (b"{not json", cam_payload(jpeg_bytes()[:300]), b'{"ts": "2026-11-23T10:00:00Z"}'):
            pub.publish("i/cam", bad, qos=1).wait_for_publish(5)
        pub.publish("f/i/stock", stock_payload("2026-11-23T10:00:00Z", {"A1": "RED"}), qos=1).wait_for_publish(5)
        pub.publish("i/ldr", b'{"ts": "2026-11-23T10:00:00Z", "br": 80}', qos=1).wait_for_publish(5)
        publish_frames(pub, 10, 10)
        assert wait_until(lambda: fdb.frames.count_documents({}) == 20 and fdb.quarantine.count_documents({}) == 3
                          and fdb.sensors.count_documents({}) == 1, timeout=20)
        assert fdb.mqtt.find_one({"topic": "f/i/stock"})["payload"]["stockItems"][0]["location"] == "A1"
        pub.loop_stop()
    finally:
        summary = ingester.stop()
    assert summary["frames"] == 20 and summary["quarantined"] == 3


def test_the_ingester_reconnects_after_a_broker_restart_and_keeps_ingesting(fdb, mqtt_broker):
    broker = mqtt_broker
    ingester = MqttIngester(Ingestor(fdb), broker.url, progress_every=0).start()
    try:
        assert ingester.subscribed.wait(10)  # SUBACK: nothing published from now on is missed
        pub = publisher(broker)
        publish_frames(pub, 0, 5)
        assert wait_until(lambda: fdb.frames.count_documents({}) == 5, timeout=10)
        pub.loop_stop()
        pub.disconnect()
        broker.restart()
        assert wait_until(lambda: ingester.connects >= 2 and ingester.subscribed.is_set(), timeout=20)
        pub = publisher(broker)
        publish_frames(pub, 5, 5)
        assert wait_until(lambda: fdb.frames.count_documents({}) == 10, timeout=15)
        pub.loop_stop()
    finally:
        ingester.stop()
    assert sorted(d["seq"] for d in fdb.frames.find()) == list(range(1, 11))


def test_stock_reports_with_malformed_items_are_quarantined_at_ingest_with_a_clear_reason(fdb):
    import json

    from factory_assets.vocabulary import stock_slots

    def report(*items) -> bytes:
        return json.dumps({"ts": "2026-11-23T10:00:01Z", "stockItems": list(items)}).encode()

    good = stock_payload("2026-11-23T10:00:00Z", {"A1": "RED", "B2": None})
    bad = {
        "workpiece-a-string": report({"location": "A1", "workpiece": "RED"}),
        "location-a-list": report({"location": ["A1"], "workpiece": {"type": "RED"}}),
        "unknown-slot": report({"location": "D4", "workpiece": None}),
        "unknown-type": report({"location": "A2", "workpiece": {"type": "GREEN"}}),
        "type-not-a-string": report({"location": "A3", "workpiece": {"type": 3}}),
    }
    ingestor = Ingestor(fdb)
    for payload in [good, *bad.values()]:
        ingestor.handle_mqtt("f/i/stock", payload)
    ingestor.flush()
    stored = list(fdb.mqtt.find({"topic": "f/i/stock"}))
    assert len(stored) == 1 and stock_slots(stored[0]["payload"])["A1"] == "RED"
    errors = sorted(d["error"] for d in fdb.quarantine.find({"reason": "bad_stock_item"}))
    assert len(errors) == len(bad), errors
    assert any("'workpiece' must be an object or null" in e and "str 'RED'" in e for e in errors)
    assert any("'location' must be one of the rack slots A1..C3" in e and "list" in e for e in errors)
    assert any("GREEN" in e for e in errors) and any("int 3" in e for e in errors)
