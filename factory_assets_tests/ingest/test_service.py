"""Every bad input is quarantined with its reason, and nothing good is lost."""
import base64
import json

import pytest

from factory_assets.ingest.service import Ingestor
from factory_assets_tests.helpers import cam_payload, jpeg_bytes, png_bytes, stock_payload

GOOD = jpeg_bytes(seed=1)


def ingest(fdb, messages, **kw):
    ing = Ingestor(fdb, **kw)
    for topic, payload in messages:
        ing.handle_mqtt(topic, payload)
    ing.flush()
    return ing


def reasons(fdb) -> list[str]:
    return sorted(d["reason"] for d in fdb.quarantine.find())


def test_a_camera_message_becomes_one_frame_document_with_binary_image(fdb):
    ingest(fdb, [("i/cam", cam_payload(GOOD, "2026-11-23T10:00:00.123Z"))])
    doc = fdb.frames.find_one()
    assert bytes(doc["image"]) == GOOD
    assert (doc["width"], doc["height"], doc["content_type"]) == (320, 240, "image/jpeg")
    assert doc["ts"].isoformat() == "2026-11-23T10:00:00.123000+00:00"
    assert doc["camera_id"] == "txt-cam" and doc["factory_id"] == "factory-1"
    assert doc["size"] == len(GOOD) and len(doc["sha256"]) == 64 and doc["seq"] == 1
    assert doc["source"] == {"kind": "mqtt", "topic": "i/cam"}


@pytest.mark.parametrize("payload, reason", [
    (b'{"ts": "2026-11-23T10:00:00Z", "data": ', "malformed_json"),
    (b'[1, 2]', "malformed_json"),
    (json.dumps({"data": "data:image/jpeg;base64," + base64.b64encode(GOOD).decode()}).encode(), "missing_field"),
    (json.dumps({"ts": "2026-11-23T10:00:00Z"}).encode(), "missing_field"),
    (json.dumps({"ts": "yesterday", "data": "data:image/jpeg;base64,AAAA"}).encode(), "bad_timestamp"),
    (json.dumps({"ts": "2026-11-23T10:00:00Z", "data": "data:image/jpeg;base64,@@not base64@@"}).encode(), "bad_base64"),
    (cam_payload(b"GIF89a" + b"\0" * 100), "unknown_content_type"),
    (cam_payload(GOOD[: len(GOOD) // 2]), "truncated_image"),
    (cam_payload(b"\xff\xd8\xff\xe0" + b"garbage" * 50 + b"\xff\xd9"), "undecodable_image"),
    (cam_payload(GOOD, content_type="image/gif"), "unsupported_content_type"),
], ids=["truncated-json", "json-array", "no-ts", "no-data", "bad-ts", "bad-base64", "not-an-image",
        "truncated-jpeg", "corrupt-jpeg", "gif-content-type"])
def test_a_bad_camera_message_is_quarantined_and_the_next_good_one_is_stored(fdb, payload, reason):
    ing = ingest(fdb, [("i/cam", payload), ("i/cam", cam_payload(GOOD, "2026-11-23T10:00:01Z"))])
    assert reasons(fdb) == [reason]
    q = fdb.quarantine.find_one()
    assert q["topic"] == "i/cam" and q["error"] and q["payload_size"] == len(payload)
    assert len(q["payload_preview"]) <= 2048
    assert fdb.frames.count_documents({}) == 1 and ing.stats.frames == 1


def test_an_image_over_the_size_limit_is_quarantined_with_a_truncated_preview(fdb):
    big = jpeg_bytes(size=(1600, 1200), seed=2, quality=100)
    ingest(fdb, [("i/cam", cam_payload(big)), ("i/cam", cam_payload(GOOD, "2026-11-23T10:00:01Z"))],
           max_image_bytes=len(big) - 1)
    q = fdb.quarantine.find_one()
    assert q["reason"] == "oversize" and q["payload_truncated"] is True
    assert fdb.frames.count_documents({}) == 1


def test_png_frames_are_accepted(fdb):
    ingest(fdb, [("i/cam", cam_payload(png_bytes(), content_type="image/png"))])
    assert fdb.frames.find_one()["content_type"] == "image/png"


def test_the_same_bad_payload_delivered_twice_is_one_quarantine_document_counted_twice(fdb):
    ingest(fdb, [("i/cam", b"{oops"), ("i/cam", b"{oops")])
    assert fdb.quarantine.count_documents({}) == 1
    assert fdb.quarantine.find_one()["count"] == 2


def test_sensor_and_stock_messages_go_to_their_collections_once(fdb):
    stock = stock_payload("2026-11-23T10:00:00Z", {"A1": "BLUE", "A2": None})
    bme = json.dumps({"ts": "2026-11-23T10:00:00Z", "t": 21.5, "h": 40.0}).encode()
    ingest(fdb, [("f/i/stock", stock), ("f/i/stock", stock), ("i/bme680", bme), ("i/ldr", b'{"ts": 1, "br": 3}'),
                 ("f/i/state/hbw", b'{"ts": "2026-11-23T10:00:00Z", "active": 1}')])
    assert fdb.mqtt.count_documents({"topic": "f/i/stock"}) == 1  # a redelivery is not stored twice
    assert fdb.mqtt.find_one({"topic": "f/i/stock"})["payload"]["stockItems"][0]["workpiece"]["type"] == "BLUE"
    assert fdb.sensors.count_documents({}) == 2
    assert fdb.mqtt.count_documents({"topic": "f/i/state/hbw"}) == 1


def test_a_stock_message_without_stock_items_is_quarantined(fdb):
    ingest(fdb, [("f/i/stock", b'{"ts": "2026-11-23T10:00:00Z"}'),
                 ("f/i/stock", b'{"ts": "2026-11-23T10:00:00Z", "stockItems": [{"workpiece": null}]}')])
    assert reasons(fdb) == ["missing_field", "missing_field"]
    assert fdb.mqtt.count_documents({}) == 0


def test_a_command_without_ts_is_stored_at_its_arrival_while_a_controller_message_without_ts_is_quarantined(fdb):
    from datetime import datetime, timezone

    arrived = datetime(2026, 11, 23, 10, 0, 5, 123000, tzinfo=timezone.utc)
    ing = Ingestor(fdb)
    ing.handle_mqtt("c/cam", b'{"on": true, "fps": 2.0}', received_at=arrived)
    ing.handle_mqtt("o/ptu", b'{"cmd": "relmove_left", "degree": 5}', received_at=arrived)
    ing.handle_mqtt("f/i/state/hbw", b'{"station": "hbw", "code": 1, "description": "", "active": 0}')
    ing.flush()
    cam = fdb.mqtt.find_one({"topic": "c/cam"})
    assert cam["ts"] == arrived and cam["received_at"] == arrived and cam["ts_source"] == "received_at"
    assert fdb.mqtt.count_documents({"topic": "o/ptu"}) == 1
    assert reasons(fdb) == ["missing_field"]  # the controller always stamps what it publishes
    assert ing.clock.estimate("factory-1") is None  # commands say nothing about the factory's clock


def test_the_factory_of_a_prefix_wins_over_one_the_payload_names_and_the_full_topic_is_kept(fdb):
    payload = json.dumps({"ts": "2026-11-23T10:00:00.000Z", "factory_id": "named", "ldr": 1, "br": "99.3"}).encode()
    ing = Ingestor(fdb)
    ing.handle_mqtt("i/ldr", payload, {"kind": "mqtt", "topic": "/j1/txt/1/i/ldr"}, factory_id="factory-7")
    ing.handle_mqtt("i/ldr", payload)  # the same bytes unprefixed: another message
    ing.flush()
    docs = {d["source"]["topic"]: d["factory_id"] for d in fdb.sensors.find()}
    assert docs == {"/j1/txt/1/i/ldr": "factory-7", "i/ldr": "named"}


def test_a_camera_message_is_parsed_as_json_parses_it_whatever_surrounds_its_data_url():
    # the data URL is cut out before parsing (the scanner need not walk the image): every other shape
    # of message, escapes and traps included, gives json's own document or its own error
    from factory_assets.ingest.service import BadMessage, _camera_json, _json_object

    url = "data:image/jpeg;base64," + base64.b64encode(GOOD[:300]).decode()
    payloads = [
        json.dumps({"ts": "2026-11-23T10:00:00.123Z", "data": url}).encode(),
        json.dumps({"data": url, "ts": "x", "camera_id": "c"}, indent=2).encode(),
        json.dumps({"ts": "x", "data": url.replace("/", "\\/")}).encode().replace(b"\\\\/", b"\\/"),  # \/ escapes
        json.dumps({"note": url, "data": "data:,"}).encode(),  # another key holds a data URL first
        json.dumps({"note": url, "data": ""}).encode(),
        b'{"data": "' + url.encode() + b'", "data": "data:,x"}',  # a repeated key: the last wins
        json.dumps({"x": {"data": url}}).encode(),  # nested
        json.dumps({"data:x": 1, "data": url}).encode(),  # a key that looks like one
        json.dumps([url]).encode(),
        b'{"data": "' + url.encode() + b'"',  # cut short
        b'{"data": "' + url.encode() + b'\x01"}',  # a control character in the string
        json.dumps({"ts": "\u00e9t\u00e9", "data": url}, ensure_ascii=False).encode(),
        json.dumps({"ts": "x", "data": url}).encode("utf-16"),
        b'\xef\xbb\xbf' + json.dumps({"data": url}).encode(),  # a UTF-8 byte order mark
        b'{"data": "data:\xff"}',
    ]

    payloads += [
        json.dumps({"data": "data:image/jpeg;base64,QUJD"}).encode(),  # bad padding: json reads it, base64 not
        json.dumps({"data": "data:image/jpeg\u0001;base64,QUJD"}).encode(),
        b'{"data": "data:image/jpeg\x01;base64,QUJD"}',  # a control character in the header
        b'{"data": "data:image/jpeg;base64,QU\x00JD"}',
    ]

    def outcome(parse, payload):
        try:
            doc = parse(payload)
            return doc[0] if isinstance(doc, tuple) else doc
        except BadMessage as exc:
            return exc.reason

    fast = 0
    for payload in payloads:
        assert outcome(_camera_json, payload) == outcome(_json_object, payload), payload[:80]
        try:
            fast += _camera_json(payload)[1] is not None
        except BadMessage:
            pass
    assert fast >= 3  # the plain ones were read apart
