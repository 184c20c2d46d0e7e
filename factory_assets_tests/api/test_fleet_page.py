"""The fleet page ``/fleet`` and ``GET /api/fleet`` on the real server and database, with three
simulated factories seeded through the real paths: the fleet simulator publishing to a real
Mosquitto under each factory's prefix, the MQTT ingester, the live twin updater, the twin's
store and the order placement. The page runs in headless Chromium like the twin page."""
from __future__ import annotations

import json
import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone

import pytest

from factory_assets.api.fleet import Entry, agreement
from factory_assets_tests.fixtures.chromium import SCREENSHOT_DIR, browser  # noqa: F401 (the Chromium fixture)
from factory_assets_tests.fixtures.mqtt import mqtt_broker  # noqa: F401

SEED = 0  # factory-3 (seed 2) holds no RED piece: an order for one faults its warehouse
T = datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc)


def at(s: float) -> datetime:
    return T + timedelta(seconds=s)


# -- what agreement means (pure) -------------------------------------------------------------

def test_agreement_is_the_share_of_the_hour_with_a_camera_view_and_no_flagged_disagreement():
    start, end = at(0), at(3600)
    entries = [Entry(at(-100), 1, False, False, True, False),  # before the window: agreeing
               Entry(at(600), 2, True, True, True, False),  # flagged at 10 min ...
               Entry(at(960), 3, False, False, True, True),  # ... cleared 6 min later
               Entry(at(1800), 4, False, False, False, False)]  # a stock report: still agreeing
    a = agreement(entries, start=start, end=end, vision_since=at(-3000))
    assert (a.covered_s, a.disagreeing_s, a.flags) == (3600, 360, 1)
    assert a.share == pytest.approx(0.9)
    # the camera's first observation 30 min into the hour: only the time since counts
    late = agreement(entries[2:], start=start, end=end, vision_since=at(1800))
    assert (late.covered_s, late.disagreeing_s, late.share) == (1800, 0, 1.0)
    # a disagreement flagged before the window and still there: the whole hour disagrees
    stuck = agreement([Entry(at(-5000), 7, True, True, True, False)], start=start, end=end, vision_since=at(-9000))
    assert (stuck.share, stuck.flags) == (0.0, 0)
    # no entry at all: the twin's current state held the whole hour
    assert agreement([], start=start, end=end, vision_since=at(-1), current_disagree=False).share == 1.0
    # no entry before the window: the state before the first one comes from what it flagged or cleared
    assert agreement([Entry(at(1800), 9, False, False, True, True)], start=start, end=end,
                     vision_since=at(-1)).share == pytest.approx(0.5)
    assert agreement(entries, start=start, end=end, vision_since=None) is None  # no camera view yet


# -- three factories through the real paths --------------------------------------------------

def _wait(condition, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _missing_colour(stock: dict) -> str:
    return next(t for t in ("BLUE", "RED", "WHITE") if t not in stock.values())


@pytest.fixture
def fleet(fdb, mqtt_broker):
    """Three simulated factories stored by the real ingester; factory-3's warehouse faulted by an
    order for a colour it lacks; the twins brought up to date; a camera view for factory-1
    (agreeing with its controller) and factory-2 (disagreeing); one order of ours for factory-2."""
    import paho.mqtt.client as mqtt

    from factory_assets.ingest.mqtt import MqttIngester
    from factory_assets.ingest.service import Ingestor
    from factory_assets.simulation.factory import FactorySimulator, Timings, iso_ms
    from factory_assets.simulation.fleet import fleet_plan, run_fleet
    from factory_assets.storage.frames import FrameSequence
    from factory_assets.twin import orders as tw
    from factory_assets.twin.live import LiveTwinUpdater
    from factory_assets.twin.state import COLOURS, Observation, TwinRules
    from factory_assets.twin.store import apply_observation

    plan = fleet_plan(3, seed=SEED)
    lacking = _missing_colour(FactorySimulator(plan[2].seed).stock)
    ingester = MqttIngester(Ingestor(fdb), mqtt_broker.url, progress_every=0, camera_fps=0,
                            prefixes=[m.prefix_spec for m in plan]).start()
    stop, out = threading.Event(), {}
    sims = threading.Thread(target=lambda: out.update(results=run_fleet(
        mqtt_broker.url, plan, stop_event=stop, fps=4, camera_on=True, customer=False, arrivals=False,
        timings=Timings(scale=0.01, fault_clear_s=None), sensor_interval_s=1.0)), daemon=True)
    try:
        assert ingester.subscribed.wait(20)
        sims.start()
        _wait(lambda: all(fdb.frames.count_documents({"factory_id": m.factory_id}) >= 4
                          and fdb.mqtt.count_documents({"factory_id": m.factory_id, "topic": "f/i/state/hbw"})
                          for m in plan), what="frames and station states from every factory")
        # an order for a colour factory-3 does not hold, stamped in its controller's clock: its warehouse faults
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        client.connect("127.0.0.1", mqtt_broker.port)
        client.loop_start()
        ts = iso_ms(datetime.now(timezone.utc) + timedelta(seconds=plan[2].clock_offset_s))
        order = json.dumps({"ts": ts, "type": lacking})
        client.publish(plan[2].prefix + "f/o/order", order, qos=1).wait_for_publish(10)
        client.disconnect()
        client.loop_stop()
        _wait(lambda: fdb.mqtt.find_one({"factory_id": "factory-3", "topic": "f/i/state/hbw", "payload.code": 4}),
              what="factory-3's warehouse fault")
    finally:
        stop.set()
        sims.join(30)
        ingester.stop()
    assert "results" in out
    # the live updater before any model (its cursor at the newest frame): stock, stations, order states
    fdb.counters.update_one({"_id": "cursor:twin-live"}, {"$set": {"seq": FrameSequence(fdb).horizon()}}, upsert=True)
    LiveTwinUpdater(fdb, predictor=None, change_stream=False).step()
    rules = TwinRules(settle_s=0, persist_frames=3, persist_s=0.5)
    for fid, wrong in (("factory-1", None), ("factory-2", "blue")):
        reported = fdb.twin.find_one({"_id": fid})["reported"]["present"]
        for frame in fdb.frames.find({"factory_id": fid}, {"image": 0}).sort("seq", 1):
            present = {c: (not reported[c]) if c == wrong else reported[c] for c in COLOURS}
            assert apply_observation(fdb, Observation(fid, frame["_id"], frame["ts"], f"model-{fid}",
                                                      {c: 0.9 if present[c] else 0.1 for c in COLOURS}, present,
                                                      {c: 0.5 for c in COLOURS}, "live", frame["seq"]), rules)
    kind = next(t for t in fdb.twin.find_one({"_id": "factory-2"})["reported"]["slots"].values() if t)
    tw.place_orders(fdb, "factory-2", [kind])
    return {"plan": plan, "lacking": lacking, "ordered": kind}


@pytest.fixture
def fleet_api(fdb, fleet):
    from factory_assets.api.app import TwinApiServer

    with TwinApiServer(fdb) as server:
        yield server


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_the_fleet_summary_gives_each_factory_its_twin_model_agreement_frame_faults_and_orders(fdb, fleet, fleet_api):
    data = _get(fleet_api.url + "/api/fleet")
    rows = {f["id"]: f for f in data["factories"]}
    assert list(rows) == ["factory-1", "factory-2", "factory-3"]
    for fid, row in rows.items():
        twin = fdb.twin.find_one({"_id": fid})
        assert row["twin"]["version"] == twin["version"] and row["twin"]["age_s"] >= 0
        newest = max(fdb.frames.find({"factory_id": fid}, {"seq": 1}), key=lambda d: d["seq"])
        assert row["frame"]["id"] == str(newest["_id"]) and row["frame"]["age_s"] >= 0
        assert row["link"] == f"/?factory={fid}"
    assert rows["factory-1"]["model"]["version"] == "model-factory-1"
    assert rows["factory-1"]["agreement"]["share"] == 1.0 and rows["factory-1"]["agreement"]["flags"] == 0
    assert rows["factory-2"]["agreement"]["share"] < 1.0 and rows["factory-2"]["agreement"]["flags"] == 1
    assert rows["factory-2"]["disagreeing_now"] is True
    assert rows["factory-3"]["model"] is None and rows["factory-3"]["agreement"] is None
    (fault,) = rows["factory-3"]["faults"]
    assert fault["station"] == "hbw" and fault["code"] == 4 and fleet["lacking"] in fault["description"]
    assert rows["factory-1"]["faults"] == [] and rows["factory-2"]["faults"] == []
    assert rows["factory-2"]["orders"]["in_progress"] == 1
    assert rows["factory-2"]["orders"]["ours"][0]["type"] == fleet["ordered"]
    assert rows["factory-2"]["orders"]["ours"][0]["state"] == "queued"
    # factory-3's controller still holds the order it could not fetch (ORDERED)
    assert rows["factory-3"]["orders"]["controller"]["state"] == "ORDERED"


def test_the_fleet_page_shows_every_factory_at_a_glance_at_1280_and_1920_px_and_links_each_twin(
        fdb, fleet, fleet_api, browser):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)

    def cell(fid, field):
        return browser.find_element(By.CSS_SELECTOR, f'tr[data-factory="{fid}"] td[data-field="{field}"]')

    for width in (1280, 1920):
        browser.set_window_size(width, 1000)
        browser.get(fleet_api.url + "/fleet")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-factories") == "3")
        assert browser.execute_script("return window.innerWidth") == width
        rows = browser.find_elements(By.CSS_SELECTOR, "#fleet tbody tr")
        assert [r.get_attribute("data-factory") for r in rows] == ["factory-1", "factory-2", "factory-3"]
        for fid in ("factory-1", "factory-2", "factory-3"):
            assert cell(fid, "twin").text.startswith(f"v{fdb.twin.find_one({'_id': fid})['version']}")
            assert "ago" in cell(fid, "frame").text or "just now" in cell(fid, "frame").text
        assert cell("factory-1", "agreement").text.startswith("100 %")
        assert float(cell("factory-2", "agreement").get_attribute("data-share")) < 1
        assert "disagreeing now" in cell("factory-2", "agreement").text
        assert cell("factory-3", "model").text == "no model yet"
        assert "high-bay warehouse: no " + fleet["lacking"] in cell("factory-3", "faults").text
        assert "fault" in rows[2].get_attribute("class") and "fault" not in rows[0].get_attribute("class")
        assert cell("factory-2", "orders").get_attribute("data-count") == "1"
        assert f"ours: {fleet['ordered']} queued" in cell("factory-2", "orders").text
        assert browser.find_element(By.ID, "faulty").text == "1 with faults"
        # nothing wider than the window, no cell's content spilling out of it
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        spills = browser.execute_script(
            "return [...document.querySelectorAll('th, td, header > *')]"
            ".filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.outerHTML.slice(0, 120))")
        assert spills == [], width
        SCREENSHOT_DIR.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(SCREENSHOT_DIR / f"fleet_page_{width}.png"))
    # each factory's name opens its twin
    cell("factory-2", "factory").find_element(By.TAG_NAME, "a").click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-version")
               == str(fdb.twin.find_one({"_id": "factory-2"})["version"]))
    assert browser.current_url.endswith("/?factory=factory-2")
    assert browser.find_element(By.ID, "factory").get_attribute("value") == "factory-2"
