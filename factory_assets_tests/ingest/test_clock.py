"""Each factory's clock offset, estimated from the (ts, received_at) of the messages the
ingester stores: the estimator on exact numbers, then a factory 37 s ahead through a real broker."""
from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone

import dagster as dg
import paho.mqtt.client as mqtt

from factory_assets.ingest.clock import ClockEstimator, ClockRecorder
from factory_assets.ingest.mqtt import MqttIngester
from factory_assets.ingest.service import Ingestor
from factory_assets.storage.clocks import clock_info, clock_offset
from factory_assets.storage.frames import wait_until
from factory_assets.vocabulary import utcnow
from factory_assets_tests.helpers import cam_payload, jpeg_bytes, stock_payload

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc)


def feed(est: ClockEstimator, factory: str, offset_s: float, seconds: int, *, start: datetime = T0,
         per_s: int = 2, seed: int = 0) -> datetime:
    """Messages ``per_s`` a second for ``seconds``, stamped ``offset_s`` ahead, arriving 2..80 ms after."""
    rng = random.Random(seed)
    for k in range(seconds * per_s):
        sent = start + timedelta(seconds=k / per_s)
        est.add(factory, sent + timedelta(seconds=offset_s), sent + timedelta(milliseconds=rng.uniform(2, 80)))
    return start + timedelta(seconds=seconds)


def test_the_offset_is_the_factory_clock_minus_ours_from_the_fastest_messages():
    est = ClockEstimator()
    feed(est, "f", 37.0, 120)
    got = est.estimate("f")
    assert abs(got.offset_s - 37.0) < 0.08  # off by the fastest latency of each bucket (2..80 ms) at most
    assert got.buckets == 31 and got.samples == 31 * 4 and got.spread_s < 0.08
    assert est.estimate("unknown") is None


def test_replayed_old_messages_and_a_backlog_after_an_outage_do_not_move_the_estimate():
    est = ClockEstimator()
    now = feed(est, "f", 37.0, 60)
    for k in range(200):  # a broker's backlog: published over the last 10 minutes, delivered in one second
        sent = now - timedelta(minutes=10) + timedelta(seconds=3 * k)
        est.add("f", sent + timedelta(seconds=37), now + timedelta(milliseconds=5 * k))
    for k in range(20):  # old reports replayed (a bridge reconnecting): hours late
        est.add("f", now - timedelta(hours=2) + timedelta(seconds=37 + k), now + timedelta(seconds=1 + k / 10))
    now = feed(est, "f", 37.0, 30, start=now + timedelta(seconds=3), seed=1)
    assert abs(est.estimate("f").offset_s - 37.0) < 0.08


def test_a_few_buckets_with_messages_stamped_in_the_future_do_not_move_it_but_a_clock_step_is_followed():
    est = ClockEstimator()
    now = feed(est, "f", 37.0, 60)
    for k in range(5):  # a publisher with a wrong clock, now and then
        est.add("f", now + timedelta(seconds=4 * k, hours=1), now + timedelta(seconds=4 * k))
    assert abs(est.estimate("f").offset_s - 37.0) < 0.08
    # the controller rebooted and set its clock by NTP: 37 s ahead becomes 0.5 s behind
    feed(est, "f", -0.5, 40, start=now + timedelta(seconds=30))
    assert abs(est.estimate("f").offset_s + 0.5) < 0.08


def test_each_factory_has_its_own_clock():
    est = ClockEstimator()
    feed(est, "factory-7", 37.0, 20)
    feed(est, "factory-8", -12.0, 20)
    assert round(est.estimate("factory-7").offset_s) == 37 and round(est.estimate("factory-8").offset_s) == -12
    assert sorted(est.factories()) == ["factory-7", "factory-8"]


def test_the_estimate_is_recorded_at_a_bounded_rate_and_only_when_it_changed(fdb):
    ticks = iter([0.0, 1.0, 2.0, 6.0, 20.0])
    est = ClockEstimator()
    recorder = ClockRecorder(est, every_s=5.0, monotonic=lambda: next(ticks))
    feed(est, "f", 37.0, 10)
    assert recorder.record_due(fdb) == 1  # t=0: the first estimate
    assert clock_info(fdb, "f")["samples"] == 20
    feed(est, "f", 37.0, 10, start=T0 + timedelta(seconds=10), seed=2)
    assert recorder.record_due(fdb) == 0  # t=1: changed, but recorded 1 s ago
    assert recorder.record_due(fdb) == 0  # t=2
    assert recorder.record_due(fdb) == 1  # t=6: due
    assert clock_info(fdb, "f")["samples"] == 40
    assert recorder.record_due(fdb) == 0  # t=20: due, but nothing changed
    assert abs(clock_offset(fdb, "f") - 37.0) < 0.08


def publish(broker, messages) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=qos, retain=retain) for topic, payload, qos, retain in messages]
        for info in infos:
            info.wait_for_publish(20)
    finally:
        client.disconnect()
        client.loop_stop()


def controller_ts(offset_s: float) -> str:
    """Now in a controller clock ``offset_s`` ahead of ours, as the controller writes it."""
    return (utcnow() + timedelta(seconds=offset_s)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def test_a_factory_37_s_ahead_is_recorded_37_s_ahead_through_a_real_broker_whatever_old_messages_arrive(
        fdb, mqtt_broker, mongo_uri, database_name):
    from factory_assets.defs.camera.assets import raw_frames
    from factory_assets.defs.resources import MongoResource

    two_hours_ago = controller_ts(37 - 7200)
    # a retained stock report two hours old, which the broker hands the ingester when it subscribes
    publish(mqtt_broker, [("f/i/stock", stock_payload(two_hours_ago, {"A1": "RED"}), 1, True)])
    ingester = MqttIngester(Ingestor(fdb), mqtt_broker.url, progress_every=0, camera_fps=None,
                            prefixes=["", "/j1/txt/8/=factory-8"])
    ingester.clock.every_s = 0.0  # record after every stored batch, so the last record is the final estimate
    ingester.start()
    try:
        assert ingester.subscribed.wait(20)
        live = [("i/cam", cam_payload(jpeg_bytes(size=(32, 24), seed=i), controller_ts(37)), 0, False)
                for i in range(10)]
        live += [("i/ldr", json.dumps({"ts": controller_ts(37), "ldr": 2345, "br": "84.4"}).encode(), 1, False)]
        live += [("/j1/txt/8/f/i/state/hbw", json.dumps({"ts": controller_ts(-12), "station": "hbw", "code": 1,
                                                         "description": "", "active": 0}).encode(), 1, False)]
        publish(mqtt_broker, live)
        # old messages replayed late (a bridge catching up), and our own order command (our clock)
        publish(mqtt_broker, [("f/i/order", json.dumps({"ts": two_hours_ago, "state": "SHIPPED", "type": "RED"})
                               .encode(), 1, False),
                              ("f/o/order", json.dumps({"ts": controller_ts(0), "type": "RED"}).encode(), 1, False)])
        publish(mqtt_broker, live[:5])  # redeliveries: same frames, stored once
        assert wait_until(lambda: fdb.mqtt.count_documents({}) == 4 and fdb.frames.count_documents({}) == 10, 20)
        assert wait_until(lambda: clock_offset(fdb, "factory-8") is not None
                          and abs(clock_offset(fdb, "factory-1") - 37.0) < 1.0, 20), clock_info(fdb, "factory-1")
    finally:
        ingester.stop()
    assert abs(ingester.ingestor.clock.estimate("factory-1").offset_s - 37.0) < 1.0
    assert abs(clock_offset(fdb, "factory-1") - 37.0) < 1.0  # the replayed and retained ones moved nothing
    assert abs(clock_offset(fdb, "factory-8") + 12.0) < 1.0
    day = fdb.frames.find_one()["ts"].strftime("%Y-%m-%d")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("factory", ["factory-1"])  # raw_frames is partitioned by factory and day
    result = dg.materialize([raw_frames], partition_key=f"{day}|factory-1", instance=instance,
                            resources={"mongo": MongoResource(uri=mongo_uri, database=database_name)})
    shown = result.asset_materializations_for_node("raw_frames")[0].metadata["clock_offset_s"].value
    assert set(shown) == {"factory-1"} and abs(shown["factory-1"] - 37.0) < 1.0  # the partition's factory's clock
