"""Every message the controller sends, as it sends it (the corpus in fixtures/messages, written
from the controller's facts), goes through a real broker into MongoDB: each stored once with
its factory, none quarantined. The canonical ones pass the format rules the simulator is held to."""
from __future__ import annotations

import hashlib

import paho.mqtt.client as mqtt
import pytest

from factory_assets.ingest.mqtt import MqttIngester
from factory_assets.ingest.service import Ingestor
from factory_assets.storage.frames import wait_until
from factory_assets.vocabulary import CAMERA_TOPIC, DEFAULT_QOS, SENSOR_TOPICS, SLOTS, TOPIC_QOS, TYPES, parse_ts
from factory_assets.vocabulary.formats import problems
from factory_assets.vocabulary.messages import parse_stock_report
from factory_assets_tests.fixtures.messages import corpus

CLOUD_FACTORY = "factory-cloud"
PREFIXES = ["", f"/j1/txt/1/={CLOUD_FACTORY}"]  # the unprefixed factory (ours) and one behind the cloud


def test_the_corpus_covers_every_topic_the_controller_sends_both_empty_slot_variants_and_prefixes():
    messages = corpus()
    topics = {m.topic for m in messages}
    assert {"i/cam", "i/bme680", "i/ldr", "i/alert", "i/ptu/pos", "i/broadcast", "f/i/stock", "f/i/order",
            "f/i/nfc/ds", "c/cam", "f/o/order"} <= topics
    assert {f"f/i/state/{s}" for s in ("hbw", "vgr", "mpo", "sld", "dsi", "dso")} <= topics
    empties = {m.name for m in messages if m.topic == "f/i/stock"}
    assert {"stock-empty-slots-null", "stock-empty-slots-raw-blank", "stock-empty-slots-object",
            "stock-empty-slots-type-none"} <= empties
    assert {m.prefix for m in messages} == {"", "/j1/txt/1/"}
    assert len({m.name for m in messages}) == len(messages)


@pytest.mark.parametrize("message", [m for m in corpus() if m.canonical], ids=lambda m: m.name)
def test_every_canonical_corpus_message_passes_the_controller_format_rules(message):
    assert problems(message.topic, message.payload) == []


@pytest.mark.parametrize("message", [m for m in corpus() if not m.canonical], ids=lambda m: m.name)
def test_the_other_generations_messages_depart_from_those_rules_yet_read_as_what_they_mean(message):
    assert problems(message.topic, message.payload) != []
    if message.topic == "f/i/stock":  # every variant of an empty slot reads as empty
        slots = parse_stock_report(message.payload)
        pieces = {i["location"]: i["workpiece"]["type"] for i in message.payload["stockItems"]
                  if (i["workpiece"] or {}).get("type") in TYPES}
        assert pieces and slots == {s: pieces.get(s) for s in SLOTS}


def test_every_corpus_message_through_a_real_broker_is_stored_once_with_its_factory_and_none_is_quarantined(
        fdb, mqtt_broker):
    messages = corpus()
    # camera_fps=None: the corpus has its own c/cam messages, the ingester's would be one more
    ingester = MqttIngester(Ingestor(fdb), mqtt_broker.url, progress_every=0, camera_fps=None,
                            prefixes=PREFIXES).start()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    try:
        assert ingester.subscribed.wait(20)
        client.connect(mqtt_broker.host, mqtt_broker.port)
        client.loop_start()
        for m in messages:  # at the controller's QoS: i/cam 0, the rest 1
            client.publish(m.full_topic, m.body, qos=TOPIC_QOS.get(m.topic, DEFAULT_QOS)).wait_for_publish(20)
        frames = [m for m in messages if m.topic == CAMERA_TOPIC]
        sensors = [m for m in messages if m.topic in SENSOR_TOPICS]
        others = len(messages) - len(frames) - len(sensors)
        assert wait_until(lambda: fdb.frames.count_documents({}) == len(frames)
                          and fdb.sensors.count_documents({}) == len(sensors)
                          and fdb.mqtt.count_documents({}) == others, 30), (
            fdb.frames.count_documents({}), fdb.sensors.count_documents({}), fdb.mqtt.count_documents({}),
            [(d["topic"], d["reason"], d["error"]) for d in fdb.quarantine.find()])
    finally:
        client.disconnect()
        client.loop_stop()
        ingester.stop()
    assert fdb.quarantine.count_documents({}) == 0
    for m in messages:
        factory = CLOUD_FACTORY if m.prefix else "factory-1"
        if m.topic == CAMERA_TOPIC:
            doc = fdb.frames.find_one({"source.topic": m.full_topic})
            assert doc["ts"] == parse_ts(m.payload["ts"])
        else:
            coll = fdb.sensors if m.topic in SENSOR_TOPICS else fdb.mqtt
            doc = coll.find_one({"message_id": hashlib.sha256(m.full_topic.encode() + b"\0" + m.body).hexdigest()})
            assert doc is not None, m.name
            assert doc["topic"] == m.topic and doc["payload"] == m.payload, m.name
            if "ts" in m.payload:
                assert doc["ts"] == parse_ts(m.payload["ts"]), m.name
            else:  # c/cam, c/bme680, o/ptu: the controller's commands carry no ts
                assert doc["ts_source"] == "received_at" and doc["ts"] == doc["received_at"], m.name
        assert doc["factory_id"] == factory and doc["source"]["topic"] == m.full_topic, m.name
