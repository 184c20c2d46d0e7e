"""The desired-state loop on real parts: PATCH -> f/o/order on a real broker -> the simulated
factory stores the piece -> its f/i/stock -> the real ingester -> twin.reported -> order done."""
from __future__ import annotations

import threading

import httpx

from factory_assets.storage.frames import wait_until


def test_an_order_reaches_the_simulated_factory_and_is_done_when_the_controller_reports_it(
        fdb, mqtt_broker, write_token):
    from factory_assets.api.app import ApiSettings, TwinApiServer
    from factory_assets.ingest.mqtt import MqttIngester
    from factory_assets.ingest.service import Ingestor
    from factory_assets.simulation.publisher import run_simulation
    from factory_assets.twin.desired import reported_counts
    from factory_assets.twin.live import apply_latest_stock

    ingester = MqttIngester(Ingestor(fdb), mqtt_broker.url, progress_every=0, log=lambda *_: None).start()
    assert ingester.subscribed.wait(20)
    stop = threading.Event()
    # change_every_s: no stock change of its own during the test, so only the order moves the stock
    sim = threading.Thread(target=run_simulation, kwargs=dict(mqtt_url=mqtt_broker.url, fps=2, seed=3,
                                                              change_every_s=1e6, stop_event=stop))
    sim.start()
    api = TwinApiServer(fdb, ApiSettings(mqtt_url=mqtt_broker.url, keepalive=0.5)).start()
    try:
        # the live updater's job (f/i/stock -> twin.reported) done here through the same function
        assert wait_until(lambda: apply_latest_stock(fdb) or fdb.twin.find_one({"_id": "factory-1"}), 30)
        twin = httpx.get(f"{api.url}/api/factories/factory-1/twin").json()
        red = reported_counts({"reported": twin["reported"]})["red"]
        assert red < 9
        r = httpx.patch(f"{api.url}/api/factories/factory-1/twin/desired", json={"stock": {"red": red + 1}},
                        headers={"Authorization": f"Bearer {write_token}", "If-Match": str(twin["version"])},
                        timeout=30)
        assert r.status_code == 200, r.text
        (order,) = r.json()["orders"]
        assert order["published"] and order["status"] == "pending"
        # the order message as the factory's cloud sends it, stored by the ingester like every message
        assert wait_until(lambda: fdb.mqtt.find_one({"topic": "f/o/order"}), 20)
        assert set(fdb.mqtt.find_one({"topic": "f/o/order"})["payload"]) == {"type", "ts"}

        def done():
            apply_latest_stock(fdb)
            return fdb.db["twin_orders"].find_one({"_id": order["id"], "status": "done"})

        assert wait_until(done, 30)
        twin = fdb.twin.find_one({"_id": "factory-1"})
        assert reported_counts(twin)["red"] == red + 1
        listed = httpx.get(f"{api.url}/api/factories/factory-1/orders").json()["items"]
        assert listed[0]["status"] == "done"
    finally:
        api.stop()
        stop.set()
        sim.join(30)
        ingester.stop()
