"""Messages MongoDB cannot or will not store are quarantined; the ingester keeps storing and acknowledging.

Real broker (Mosquitto, else amqtt), real MongoDB (SecantusDB), the real MqttIngester.
"""
import json

import paho.mqtt.client as mqtt

from factory_assets.ingest.mqtt import MqttIngester
from factory_assets.ingest.service import Ingestor
from factory_assets.storage.frames import wait_until
from factory_assets_tests.helpers import cam_payload, jpeg_bytes

TS = "2026-11-23T10:00:00Z"


def frame(i: int) -> bytes:
    return cam_payload(jpeg_bytes(size=(64, 48), seed=i), f"2026-11-23T10:00:{i:02d}.000Z")


def publish_all(broker, messages: list[tuple[str, bytes]]) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=1).wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()


def quarantined(fdb) -> dict[str, str]:
    return {d["topic"]: d["reason"] for d in fdb.quarantine.find()}


def assert_still_running_and_acknowledging(ingester, published: int) -> None:
    # every message, good or bad, was acknowledged (the broker forgets it) and nothing is held back
    assert wait_until(lambda: ingester.acked == published and ingester.held_bytes == 0, 30), \
        (ingester.acked, published, ingester.held_bytes)
    assert ingester._writer.is_alive() and ingester.failed is None


def test_unstorable_messages_between_good_frames_are_quarantined_and_every_good_frame_is_stored(fdb, mqtt_broker):
    camera_id_too_big = json.loads(frame(40))
    camera_id_too_big["camera_id"] = 2 ** 64
    bad = [
        # valid JSON, but BSON has no integer over 64 bits
        ("i/bme680", f'{{"ts":"{TS}","uptime_ns":18446744073709551615}}'.encode()),
        # a lone surrogate: valid JSON escape, not encodable as UTF-8
        ("f/i/state/hbw", f'{{"ts":"{TS}","label":"\\ud83d"}}'.encode()),
        ("i/cam", json.dumps(camera_id_too_big).encode()),
        # 3 MB of JSON that is ~19 MB as BSON (each array element carries its index as a key)
        ("f/i/trace", (f'{{"ts":"{TS}","samples":[' + ",".join(["0"] * 1_500_000) + "]}").encode()),
        # over the size bound of a factory message
        ("f/i/state/dsi", f'{{"ts":"{TS}","blob":"{"x" * (5 * 1024 * 1024)}"}}'.encode()),
        # the surrogate lands in the error message of the quarantine record itself
        ("i/ldr", b'{"ts":"\\ud83d","br":3}'),
    ]
    # f/i/trace's 3 MB must pass the size bound for the BSON check to be what catches it: raise the bound
    ingestor = Ingestor(fdb, batch_size=4)
    ingestor.max_message_bytes = 4 * 1024 * 1024
    # camera_fps=None: no c/cam of its own, so every message counted here is one the test published
    ingester = MqttIngester(ingestor, mqtt_broker.url, progress_every=0, camera_fps=None).start()
    try:
        assert ingester.subscribed.wait(10)  # SUBACK: nothing published from now on is missed
        messages = [("i/cam", frame(i)) for i in range(5)] + bad + [("i/cam", frame(i)) for i in range(5, 10)]
        publish_all(mqtt_broker, messages)
        assert wait_until(lambda: fdb.frames.count_documents({}) == 10 and fdb.quarantine.count_documents({}) == 6,
                          timeout=30), (fdb.frames.count_documents({}), quarantined(fdb))
        assert quarantined(fdb) == {"i/bme680": "unstorable", "f/i/state/hbw": "unstorable", "i/cam": "bad_id",
                                    "f/i/trace": "unstorable", "i/ldr": "bad_timestamp", "f/i/state/dsi": "oversize"}
        errors = {d["topic"]: d["error"] for d in fdb.quarantine.find()}
        assert "OverflowError" in errors["i/bme680"] and "camera_id" in errors["i/cam"]
        assert "16777216" in errors["f/i/trace"] and "\\ud83d" in errors["i/ldr"]
        assert_still_running_and_acknowledging(ingester, len(messages))
        assert fdb.sensors.count_documents({}) == 0 and fdb.mqtt.count_documents({}) == 0
        pending = fdb.counters.find_one({"_id": ingester.ingestor.sequence.key})["pending"]
        assert pending == []  # no sequence block left holding readers back
    finally:
        summary = ingester.stop()
    assert summary["frames"] == 10 and summary["quarantined"] == 6


def test_a_factory_message_over_one_mebibyte_is_quarantined_as_oversize(fdb):
    # stock reports and sensor readings are a few hundred bytes; the camera's limit (16 MB) was applied to them
    ingestor = Ingestor(fdb)
    ingestor.handle_mqtt("f/i/state/dsi", f'{{"ts":"{TS}","blob":"{"x" * (1024 * 1024)}"}}'.encode())
    ingestor.handle_mqtt("f/i/state/dsi", f'{{"ts":"{TS}","blob":"{"x" * 1000}"}}'.encode())
    ingestor.flush()
    assert [d["reason"] for d in fdb.quarantine.find()] == ["oversize"]
    assert fdb.mqtt.count_documents({"topic": "f/i/state/dsi"}) == 1


def test_a_record_the_database_refuses_is_quarantined_alone_and_the_rest_of_its_batch_is_stored_and_counted_once(fdb, mqtt_broker):
    # Valid, encodable, yet refused by the server (a validator here): only the database can tell.
    # It names the refused document of the batch; that one is quarantined, the rest stored once.
    fdb.db.command("collMod", fdb.names.frames, validator={"camera_id": {"$ne": "refused-cam"}})
    fdb.db.command("collMod", fdb.names.sensors, validator={"payload.br": {"$lte": 100}})
    refused_frame = json.loads(frame(50))
    refused_frame["camera_id"] = "refused-cam"
    listened = []
    ingester = MqttIngester(Ingestor(fdb, batch_size=8, on_stored=listened.extend), mqtt_broker.url,
                            progress_every=0, camera_fps=None).start()  # no c/cam: only the test's messages
    try:
        assert ingester.subscribed.wait(10)
        messages = ([("i/cam", frame(i)) for i in range(3)] + [("i/cam", json.dumps(refused_frame).encode())]
                    + [("i/ldr", f'{{"ts":"{TS}","br":{br}}}'.encode()) for br in (10, 500, 20)]
                    + [("i/cam", frame(i)) for i in range(3, 6)])
        publish_all(mqtt_broker, messages)
        assert wait_until(lambda: fdb.frames.count_documents({}) == 6 and fdb.sensors.count_documents({}) == 2
                          and fdb.quarantine.count_documents({}) == 2, timeout=30), quarantined(fdb)
        refused = {d["topic"]: d for d in fdb.quarantine.find()}
        assert {t: d["reason"] for t, d in refused.items()} == {"i/cam": "unstorable", "i/ldr": "unstorable"}
        assert "validation" in refused["i/cam"]["error"] and '"br":500' in refused["i/ldr"]["payload_preview"]
        assert_still_running_and_acknowledging(ingester, len(messages))
        # the blocks of the refused attempts are settled: readers are not held back until their lease ends
        assert fdb.counters.find_one({"_id": ingester.ingestor.sequence.key})["pending"] == []
        assert ingester.ingestor.sequence.unsettled == []
        assert ingester.store_failures == 0  # nothing was retried: a refusal is not an outage
        # every stored frame counted once and handed to the listener, none taken for a duplicate
        stats = ingester.ingestor.stats
        assert (stats.frames, stats.duplicates, stats.messages, stats.quarantined) == (6, 0, 2, 2)
        assert sorted(d["_id"] for d in listened) == sorted(d["_id"] for d in fdb.frames.find({}, {"_id": 1}))
    finally:
        ingester.stop()


def test_only_a_refusal_of_the_document_itself_is_final_every_other_server_error_is_retried():
    # an error code nobody listed (365 TemporarilyUnavailable, 46 LockBusy) must not quarantine a good frame
    from pymongo.errors import AutoReconnect, BulkWriteError, OperationFailure, WriteError
    from bson.errors import InvalidDocument

    from factory_assets.storage.errors import is_transient

    assert is_transient(AutoReconnect("down"))
    assert is_transient(OperationFailure("busy", code=365)) and is_transient(OperationFailure("lock", code=46))
    assert not is_transient(WriteError("Document failed validation", code=121))
    assert not is_transient(OperationFailure("too large", code=10334))
    assert not is_transient(InvalidDocument("key must not start with '$'"))
    refused = BulkWriteError({"writeErrors": [{"index": 0, "code": 11000}, {"index": 1, "code": 121}]})
    assert not is_transient(refused)
    passing = BulkWriteError({"writeErrors": [{"index": 0, "code": 121}, {"index": 1, "code": 365}]})
    assert is_transient(passing)
    assert is_transient(BulkWriteError({"writeErrors": [], "writeConcernErrors": [{"code": 64}]}))
