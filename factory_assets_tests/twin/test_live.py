"""The live twin updater against a real inference server and real MongoDB."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from factory_assets.simulation.factory import FactorySimulator
from factory_assets.serving.predictor import EndpointUnavailable, HttpEndpointPredictor
from factory_assets.serving.server import InferenceServer
from factory_assets.storage.frames import build_frame, insert_frames
from factory_assets.twin.live import LiveTwinUpdater, load_cursor
from factory_assets.twin.state import reported_presence
from factory_assets.twin.store import get_twin

T0 = datetime(2026, 11, 24, 8, 0, tzinfo=timezone.utc)


def insert_sim_frames(fdb, n: int, seed: int = 5, start: datetime = T0, step_s: float = 1.0):
    sim = FactorySimulator(seed=seed, change_every_s=4.0, start=start)
    truth = {}
    docs = []
    for i in range(n):
        ts = start + timedelta(seconds=i * step_s)
        jpeg, stock = sim.frame(ts)
        doc = build_frame(jpeg, ts=ts, camera_id="cam-1", factory_id="factory-1", content_type="image/jpeg",
                          width=320, height=240, source={"kind": "test"})
        docs.append(doc)
        truth[ts] = reported_presence(stock)
    insert_frames(fdb, docs)
    return truth


def test_the_updater_infers_every_new_frame_once_and_the_twin_shows_the_newest(fdb, model_server):
    truth = insert_sim_frames(fdb, 30)
    updater = LiveTwinUpdater(fdb, HttpEndpointPredictor(model_server.url), log=lambda *_: None)
    while updater.step():
        pass
    assert fdb.inferences.count_documents({}) == 30
    assert load_cursor(fdb, "twin-live") == 30
    agreement = [truth[d["frame_ts"]] == d["present"] for d in fdb.inferences.find()]
    assert sum(agreement) / len(agreement) >= 0.9, "the simulated-frame model should read simulated frames"
    twin = get_twin(fdb)
    assert twin["observed"]["frame_ts"] == max(truth)
    legacy = fdb.twin_legacy.find_one({"_partition": "DTPartition"})
    assert legacy["ts"] == max(truth)
    # a second updater (e.g. after a restart) resumes from the stored cursor: nothing is inferred twice
    again = LiveTwinUpdater(fdb, HttpEndpointPredictor(model_server.url), log=lambda *_: None)
    assert again.step() == 0 and fdb.inferences.count_documents({}) == 30


def test_an_endpoint_outage_never_moves_the_cursor_past_an_uninferred_frame(fdb, trained_models):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    insert_sim_frames(fdb, 5)
    updater = LiveTwinUpdater(fdb, HttpEndpointPredictor(f"http://127.0.0.1:{port}", timeout=2),
                              log=lambda *_: None)
    with pytest.raises(EndpointUnavailable):
        updater.step()
    assert updater.cursor == 0 and load_cursor(fdb, "twin-live") == 0
    assert fdb.inferences.count_documents({}) == 0
    srv = InferenceServer("127.0.0.1", port, log=lambda *_: None)
    srv.slot.swap(trained_models[0].model)
    srv.start()
    try:
        while updater.step():
            pass
    finally:
        srv.stop()
    assert fdb.inferences.count_documents({}) == 5 and updater.cursor == 5


def test_a_corrupt_frame_is_quarantined_and_the_rest_of_the_batch_proceeds(fdb, model_server):
    insert_sim_frames(fdb, 3)
    # A frame that passed ingest but whose bytes are damaged in storage.
    good = fdb.frames.find_one({"seq": 2})
    fdb.frames.update_one({"_id": good["_id"]}, {"$set": {"image": b"\xff\xd8garbage"}})
    updater = LiveTwinUpdater(fdb, HttpEndpointPredictor(model_server.url), log=lambda *_: None)
    while updater.step():
        pass
    assert updater.stats.rejected == 1 and updater.stats.inferred == 2
    q = fdb.quarantine.find_one({"reason": "inference_rejected"})
    assert q is not None and str(good["_id"]) in str(q)
    assert get_twin(fdb)["observed"]["frame_ts"] == T0 + timedelta(seconds=2)


@pytest.mark.parametrize("damage", [
    {"$unset": {"image": ""}, "$set": {"data": "data:image/jpeg;base64,@@not base64@@"}},
    {"$unset": {"ts": ""}},
    {"$set": {"ts": "1714567890"}},
], ids=["bad-base64", "no-ts", "ts-not-a-time"])
def test_a_frame_another_tool_wrote_badly_is_quarantined_and_the_updater_carries_on(fdb, model_server, damage):
    # it used to raise out of run(): the process exited before its cursor moved, and every restart did the same
    insert_sim_frames(fdb, 3)
    bad = fdb.frames.find_one({"seq": 2})
    fdb.frames.update_one({"_id": bad["_id"]}, damage)
    updater = LiveTwinUpdater(fdb, HttpEndpointPredictor(model_server.url), log=lambda *_: None)
    while updater.step():
        pass
    assert updater.stats.rejected == 1 and updater.stats.inferred == 2 and updater.cursor == 3
    q = fdb.quarantine.find_one({"reason": "frame_unreadable"})
    assert q is not None and q["source"]["frame_id"] == str(bad["_id"])
    assert get_twin(fdb)["observed"]["frame_ts"] == T0 + timedelta(seconds=2)


def test_an_inference_the_database_refuses_is_left_to_the_batch_path_and_the_updater_carries_on(fdb, model_server):
    # a refusal is a final answer: re-raising it would retry the same frame for ever
    insert_sim_frames(fdb, 3)
    refused = fdb.frames.find_one({"seq": 2})
    fdb.db.command("collMod", fdb.names.inferences, validator={"frame_id": {"$ne": refused["_id"]}})
    updater = LiveTwinUpdater(fdb, HttpEndpointPredictor(model_server.url), log=lambda *_: None)
    while updater.step():
        pass
    assert (updater.stats.inferred, updater.stats.failed, updater.cursor) == (2, 1, 3)
    assert fdb.inferences.count_documents({}) == 2 and fdb.inferences.count_documents({"frame_id": refused["_id"]}) == 0
    assert get_twin(fdb)["observed"]["frame_ts"] == T0 + timedelta(seconds=2)


def test_a_stock_report_the_twin_cannot_take_is_passed_and_the_frames_are_still_inferred(fdb, model_server):
    # an error applying one report used to end run(): only frames' errors were guarded
    from factory_assets.vocabulary import STOCK_TOPIC

    insert_sim_frames(fdb, 3)
    fdb.db.command("collMod", fdb.names.twin, validator={"reported": {"$exists": False}})
    fdb.mqtt.insert_one({"topic": STOCK_TOPIC, "ts": T0, "factory_id": "factory-1", "message_id": "stock-1",
                         "payload": {"ts": T0.isoformat(), "stockItems": [
                             {"location": "B2", "workpiece": {"type": "RED", "id": "wp-1"}}]}})
    updater = LiveTwinUpdater(fdb, HttpEndpointPredictor(model_server.url), log=lambda *_: None)
    while updater.step():
        pass
    assert updater.stats.inferred == 3 and updater.cursor == 3
    twin = get_twin(fdb)
    assert "reported" not in twin and twin["observed"]["frame_ts"] == T0 + timedelta(seconds=2)


def test_the_batch_path_applies_the_newest_readable_report_when_the_newest_is_unreadable(fdb):
    # the newest report alone used to be tried: one bad report left the twin on no rack at all
    from factory_assets.twin.live import apply_latest_stock
    from factory_assets.vocabulary import STOCK_TOPIC

    good = {"ts": T0.isoformat(), "stockItems": [{"location": "B2", "workpiece": {"type": "RED", "id": "wp-1"}}]}
    bad = {"ts": (T0 + timedelta(seconds=5)).isoformat(), "stockItems": [{"location": "B2", "workpiece": "RED"}]}
    fdb.mqtt.insert_many([
        {"topic": STOCK_TOPIC, "ts": T0, "factory_id": "factory-1", "message_id": "good", "payload": good},
        {"topic": STOCK_TOPIC, "ts": T0 + timedelta(seconds=5), "factory_id": "factory-1", "message_id": "bad",
         "payload": bad}])
    assert apply_latest_stock(fdb)
    assert get_twin(fdb)["reported"]["slots"]["B2"] == "RED"
    assert fdb.quarantine.count_documents({"reason": "stock_report_unreadable"}) == 1


@pytest.mark.parametrize("item", [{"location": "A1", "workpiece": "RED"}, {"location": ["A1"], "workpiece": None}],
                         ids=["workpiece-a-string", "location-a-list"])
def test_an_unreadable_stock_report_is_quarantined_and_the_next_one_is_applied(fdb, model_server, item):
    from factory_assets.vocabulary import STOCK_TOPIC

    def report(ts, items, n):
        fdb.mqtt.insert_one({"topic": STOCK_TOPIC, "ts": ts, "factory_id": "factory-1", "message_id": f"stock-{n}",
                             "payload": {"ts": ts.isoformat(), "stockItems": items}})

    insert_sim_frames(fdb, 2)
    report(T0, [item], 1)
    updater = LiveTwinUpdater(fdb, HttpEndpointPredictor(model_server.url), log=lambda *_: None)
    while updater.step():
        pass
    assert updater.stats.inferred == 2
    assert fdb.quarantine.count_documents({"reason": "stock_report_unreadable"}) == 1
    assert (get_twin(fdb).get("reported") or {}).get("ts") is None
    report(T0 + timedelta(seconds=5), [{"location": "B2", "workpiece": {"type": "RED", "id": "wp-1"}}], 2)
    updater.step()
    assert get_twin(fdb)["reported"]["slots"]["B2"] == "RED"
    assert fdb.quarantine.count_documents({"reason": "stock_report_unreadable"}) == 1  # passed, not retried


def test_a_long_backlog_is_left_to_the_batch_path_so_the_twin_is_live_at_once(fdb, model_server):
    insert_sim_frames(fdb, 40)
    updater = LiveTwinUpdater(fdb, HttpEndpointPredictor(model_server.url), max_backlog=10, log=lambda *_: None)
    while updater.step():
        pass
    assert updater.stats.skipped_to_batch == 30
    assert fdb.inferences.count_documents({}) == 10
    assert get_twin(fdb)["observed"]["frame_ts"] == T0 + timedelta(seconds=39)


def test_simulated_factory_to_twin_end_to_end_matches_the_ground_truth(fdb, mqtt_broker, model_server):
    import threading

    from factory_assets.ingest.mqtt import MqttIngester
    from factory_assets.ingest.service import Ingestor
    from factory_assets.simulation.publisher import run_simulation
    from factory_assets.storage.frames import parse_ts, wait_until

    ingester = MqttIngester(Ingestor(fdb), mqtt_broker.url, progress_every=0, log=lambda *_: None).start()
    updater = LiveTwinUpdater(fdb, HttpEndpointPredictor(model_server.url), log=lambda *_: None)
    stop = threading.Event()
    live = threading.Thread(target=updater.run, kwargs={"stop": stop})
    truth: dict = {}

    def on_publish(topic, payload, stock):
        if topic == "i/cam":
            truth[parse_ts(payload["ts"])] = stock

    try:
        assert ingester.subscribed.wait(10)  # SUBACK: nothing published from now on is missed
        live.start()
        run_simulation(mqtt_broker.url, fps=10, max_frames=40, seed=11, change_every_s=1.0,
                       stock_interval_s=0.5, on_publish=on_publish, camera_on=True)
        assert wait_until(lambda: fdb.inferences.count_documents({}) == 40, timeout=30)
        last = max(truth)
        assert wait_until(lambda: (get_twin(fdb) or {}).get("observed", {}).get("frame_ts") == last, timeout=10)
    finally:
        stop.set()
        live.join(timeout=10)
        ingester.stop()
    inferences = list(fdb.inferences.find())
    agreement = [reported_presence(truth[d["frame_ts"]]) == d["present"] for d in inferences]
    assert sum(agreement) / len(agreement) >= 0.9
    twin = get_twin(fdb)
    # reported: the controller's last stock report, per slot, equals the simulator's stock
    reported_slots = {slot: (v or {}).get("type") if isinstance(v, dict) else v
                      for slot, v in twin["reported"]["slots"].items()}
    assert reported_slots == truth[last]
    legacy = fdb.twin_legacy.find_one({"_partition": "DTPartition"})
    assert legacy["is_present"] == {c: twin["observed"][c]["present"] for c in ("blue", "red", "white")}
    assert legacy["ts"] == last


def test_the_updater_rides_out_a_mongodb_restart_without_skipping_or_duplicating(tmp_path, model_server):
    # Its own embedded server, so stopping it does not disturb the other tests.
    import threading

    from pymongo import MongoClient

    from factory_assets.storage.embedded import EmbeddedMongo
    from factory_assets.storage.frames import wait_until
    from factory_assets.storage.indexes import ensure_indexes
    from factory_assets.storage.mongo import CollectionNames, FactoryDB

    embedded = EmbeddedMongo(tmp_path / "home")
    uri = embedded.start(port=0).uri
    port = int(uri.rsplit(":", 1)[1].split("/")[0])
    # the updater's reads fail after 1 s of outage instead of the 10 s connect() allows: it meets
    # the outage (and the test goes on) within seconds; nothing else differs
    client = MongoClient(uri, serverSelectionTimeoutMS=1000, tz_aware=True)
    try:
        fdb = FactoryDB(client["restart_test"], CollectionNames.from_env())
        ensure_indexes(fdb)
        insert_sim_frames(fdb, 5)
        updater = LiveTwinUpdater(fdb, HttpEndpointPredictor(model_server.url))
        stop = threading.Event()
        live = threading.Thread(target=updater.run, kwargs={"stop": stop})
        live.start()
        assert wait_until(lambda: fdb.inferences.count_documents({}) == 5, timeout=20)
        embedded.stop()
        # down until the updater has met the outage (counted, whatever the logging configuration)
        assert wait_until(lambda: updater.stats.database_errors >= 1, timeout=120)
        embedded.start(port=port)
        insert_sim_frames(fdb, 5, start=T0 + timedelta(minutes=1))
        assert wait_until(lambda: fdb.inferences.count_documents({}) == 10, timeout=60)
        stop.set()
        live.join(timeout=20)
        assert not live.is_alive()
        assert load_cursor(fdb, "twin-live") == 10
        assert get_twin(fdb)["observed"]["frame_ts"] == T0 + timedelta(minutes=1, seconds=4)
    finally:
        client.close()
        embedded.stop()
