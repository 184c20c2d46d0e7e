"""The desired-state loop on real parts: PATCH -> f/o/order on a real broker -> the simulated
factory stores the piece -> its f/i/stock -> the real ingester -> twin.reported -> order done."""
from __future__ import annotations

import threading

import httpx

from factory_assets.storage.frames import wait_until
from factory_assets_tests.api.conftest import report


def order_ingester(fdb, url: str):
    """The real ingester: it stores every message, f/o/order too, in ``fdb.mqtt``. Its session is
    persistent, so the broker keeps what is published for it while it reconnects."""
    from factory_assets.ingest.mqtt import MqttIngester
    from factory_assets.ingest.service import Ingestor

    ingester = MqttIngester(Ingestor(fdb), url, progress_every=0).start()
    assert ingester.subscribed.wait(20)
    return ingester


def published(fdb, order_id: str) -> dict | None:
    return fdb.db["twin_orders"].find_one({"_id": order_id, "published_at": {"$ne": None}})


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


def test_an_order_placed_while_the_broker_is_down_is_sent_when_the_broker_is_back(fdb, mqtt_broker, write_token):
    from factory_assets.api.app import ApiSettings, TwinApiServer

    ingester = order_ingester(fdb, mqtt_broker.url)
    mqtt_broker.stop()
    report(fdb, 0)  # one red piece in the rack, twin version 1
    api = TwinApiServer(fdb, ApiSettings(mqtt_url=mqtt_broker.url, keepalive=0.5)).start()
    try:
        r = httpx.patch(f"{api.url}/api/factories/factory-1/twin/desired", json={"stock": {"red": 2}},
                        headers={"Authorization": f"Bearer {write_token}", "If-Match": "1"}, timeout=30)
        assert r.status_code == 200, r.text
        (order,) = r.json()["orders"]
        assert not order["published"] and not published(fdb, order["id"])
        mqtt_broker.start()
        assert wait_until(lambda: fdb.mqtt.find_one({"topic": "f/o/order"}), 60)
        assert wait_until(lambda: published(fdb, order["id"]), 30)
        assert fdb.mqtt.find_one({"topic": "f/o/order"})["payload"]["type"] == "RED"
    finally:
        api.stop()
        ingester.stop()


def test_an_order_stored_but_never_published_before_the_api_started_is_sent_after_start(fdb, mqtt_broker):
    from factory_assets.api.app import ApiSettings, TwinApiServer
    from factory_assets.twin.desired import set_desired

    report(fdb, 0)
    # stored by an API process that died before publishing it
    _, (order,) = set_desired(fdb, "factory-1", {"red": 2}, 1)
    assert order["published_at"] is None
    ingester = order_ingester(fdb, mqtt_broker.url)
    api = TwinApiServer(fdb, ApiSettings(mqtt_url=mqtt_broker.url, keepalive=0.5)).start()
    try:
        assert wait_until(lambda: published(fdb, order["_id"]), 30)
        assert wait_until(lambda: fdb.mqtt.find_one({"topic": "f/o/order"}), 30)
        assert fdb.mqtt.find_one({"topic": "f/o/order"})["payload"]["type"] == "RED"
    finally:
        api.stop()
        ingester.stop()


def test_two_api_processes_sweeping_at_once_send_a_pending_order_once(fdb, mqtt_broker):
    from factory_assets.api.orders import OrderPublisher
    from factory_assets.twin.desired import set_desired

    report(fdb, 0)
    _, (order,) = set_desired(fdb, "factory-1", {"red": 2}, 1)
    publishers = [OrderPublisher(mqtt_broker.url).start(fdb) for _ in range(2)]
    try:
        assert all(p.connected.wait(20) for p in publishers)
        barrier = threading.Barrier(len(publishers))
        acked: dict[str, int] = {}

        def sweep(p):
            barrier.wait(30)
            acked[p.owner] = p.sweep(fdb)

        threads = [threading.Thread(target=sweep, args=(p,)) for p in publishers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(acked.values()) == [0, 1]
        stored = published(fdb, order["_id"])
        assert stored and stored["claimed_by"] == next(o for o, n in acked.items() if n == 1)
    finally:
        for p in publishers:
            p.stop()
