"""The broker URL, topic prefixes and the controller's message formats, as the vocabulary defines them."""
from __future__ import annotations

import pytest

from factory_assets.vocabulary import formats
from factory_assets.vocabulary.messages import parse_stock_report, stock_slots
from factory_assets.vocabulary.mqtt import MqttTarget, TopicPrefix, match_prefix, redact


def test_a_login_in_the_url_is_used_and_never_shown():
    target = MqttTarget.parse("mqtt://txt:s3cret%2F@192.168.0.10")
    assert (target.host, target.port, target.username, target.password) == ("192.168.0.10", 1883, "txt", "s3cret/")
    assert "s3cret" not in str(target) and "s3cret" not in repr(target)
    assert str(target) == "mqtt://txt:***@192.168.0.10:1883"


def test_the_password_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("FACTORY_MQTT_PASSWORD", "from-env")
    assert MqttTarget.parse("mqtt://txt@broker:1884").password == "from-env"
    # a password in the URL wins over the environment
    assert MqttTarget.parse("mqtt://txt:url@broker").password == "url"


def test_mqtts_and_a_ca_file_mean_tls_on_8883_by_default():
    assert MqttTarget.parse("mqtts://broker").tls and MqttTarget.parse("mqtts://broker").port == 8883
    target = MqttTarget.parse("mqtt://broker:1883", ca_file="/tmp/ca.pem")
    assert target.tls and target.port == 1883


def test_an_unknown_scheme_is_refused_with_the_url_redacted():
    with pytest.raises(ValueError, match="unsupported MQTT URL scheme"):
        MqttTarget.parse("http://u:p@broker")
    assert "pw" not in redact("mqtt://u:pw@broker:1")


def test_a_prefix_maps_topics_both_ways_and_the_longest_prefix_wins():
    cloud = TopicPrefix.parse("/j1/txt/1=factory-7")
    assert cloud == TopicPrefix("/j1/txt/1/", "factory-7")
    assert cloud.full("i/cam") == "/j1/txt/1/i/cam" and cloud.subscription == "/j1/txt/1/#"
    local = TopicPrefix.parse("")
    assert match_prefix([local, cloud], "/j1/txt/1/f/i/stock") == (cloud, "f/i/stock")
    assert match_prefix([local, cloud], "f/i/stock") == (local, "f/i/stock")
    assert match_prefix([cloud], "i/cam") is None
    with pytest.raises(ValueError):
        TopicPrefix.parse("a/+/b")


@pytest.mark.parametrize("workpiece", [None, {}, {"id": "", "state": "RAW", "type": ""}, {"type": "NONE"}])
def test_every_controller_generations_empty_slot_reads_as_empty(workpiece):
    payload = {"ts": "2026-12-06T10:00:00.000Z",
               "stockItems": [{"location": "A1", "workpiece": workpiece},
                              {"location": "B2", "workpiece": {"id": "04a1b2c3d4e5f6", "type": "RED", "state": "RAW"}}]}
    assert parse_stock_report(payload) == {"A1": None, "B2": "RED"}
    assert stock_slots(payload)["A1"] is None and stock_slots(payload)["B2"] == "RED"


def test_the_formats_accept_what_the_controller_sends_and_name_what_differs():
    ts = "2026-12-06T10:00:00.123Z"
    assert formats.problems("i/ldr", {"ts": ts, "ldr": 7000, "br": "53.3"}) == []
    # br is a string on the controller; a number is our old simulator's assumption
    assert any("'br'" in p for p in formats.problems("i/ldr", {"ts": ts, "ldr": 7000, "br": 53.3}))
    assert any("'ts'" in p for p in formats.problems("f/i/order", {"ts": "2026-12-06 10:00:00",
                                                                   "state": "ORDERED", "type": "RED"}))
    assert formats.problems("f/o/order", {"ts": ts, "type": "red"}) != []  # exactly BLUE, RED or WHITE
    assert formats.problems("f/i/state/vgr", {"ts": ts, "station": "vgr", "code": 1, "description": "",
                                              "active": 0, "target": "hbw"}) == []
    assert formats.problems("f/i/state/hbw", {"ts": ts, "station": "hbw", "code": 1, "description": "",
                                              "active": 0, "target": "x"}) != []
    assert formats.problems("c/cam", {"on": True, "fps": 2}) == []
