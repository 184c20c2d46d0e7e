"""The simulated factory streamed through a real broker into MongoDB by the ingester."""

from factory_assets.ingest.mqtt import MqttIngester
from factory_assets.ingest.service import Ingestor
from factory_assets.simulation.factory import Timings
from factory_assets.simulation.publisher import run_simulation
from factory_assets.storage.frames import parse_ts, wait_until


def test_a_simulated_stream_lands_in_mongodb_frame_for_frame_with_consistent_stock(fdb, mqtt_broker):
    ingester = MqttIngester(Ingestor(fdb), mqtt_broker.url, progress_every=0).start()
    truth: dict = {}
    try:
        assert ingester.subscribed.wait(10)  # SUBACK: nothing published from now on is missed

        def on_publish(topic, payload, stock):
            if topic == "i/cam":
                truth[payload["ts"]] = stock

        run_simulation(mqtt_broker.url, fps=20, max_frames=40, seed=3, change_every_s=0.5, on_publish=on_publish,
                       camera_on=True, timings=Timings(crane_travel_s=(0, 0)))  # no crane travel: reports = pictures
        assert wait_until(lambda: fdb.frames.count_documents({}) == 40, timeout=20)
    finally:
        ingester.stop()
    docs = list(fdb.frames.find({}, {"ts": 1, "width": 1, "height": 1, "seq": 1}))
    assert {(d["width"], d["height"]) for d in docs} == {(320, 240)}
    assert sorted(d["seq"] for d in docs) == list(range(1, 41))
    assert {d["ts"] for d in docs} == {parse_ts(ts) for ts in truth}
    # the latest stock report describes the stock of the last frame
    last_ts = max(truth)
    report = fdb.mqtt.find_one({"topic": "f/i/stock", "ts": {"$lte": parse_ts(last_ts)}}, sort=[("ts", -1)])
    reported = {i["location"]: (i["workpiece"] or {}).get("type") for i in report["payload"]["stockItems"]}
    assert reported == truth[last_ts]
    assert fdb.sensors.count_documents({}) >= 1 and fdb.quarantine.count_documents({}) == 0
