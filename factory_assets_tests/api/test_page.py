"""The live page in a real headless Chromium (Debian's chromium + chromium-driver, nothing downloaded)."""
from __future__ import annotations

from datetime import timedelta

import pytest

from factory_assets_tests.api.conftest import BASE_TS, report
from factory_assets_tests.fixtures.chromium import SCREENSHOT_DIR, browser  # noqa: F401


def _seed_frame_and_observation(fdb, seconds=(30, 31, 32)):
    """Simulated camera frames, stored by the real ingest path, and the camera's view of each
    (three frames over two seconds: a disagreement that persists). Returns the newest frame."""
    from factory_assets.ingest.service import Ingestor
    from factory_assets.simulation.factory import FactorySimulator
    from factory_assets.twin.state import Observation
    from factory_assets.twin.store import apply_observation

    sim = FactorySimulator(seed=2, start=BASE_TS)
    jpeg, _ = sim.frame(0.0)
    ingestor = Ingestor(fdb)
    for t in seconds:
        assert ingestor.add_image(jpeg, ts=BASE_TS + timedelta(seconds=t), source={"kind": "test"})
    ingestor.flush()
    for frame in fdb.frames.find({}, {"image": 0}).sort("ts", 1):
        # the camera misses the white piece the controller reports: the page must highlight it
        apply_observation(fdb, Observation("factory-1", frame["_id"], frame["ts"], "model-abc123",
                                           {"blue": 0.91, "red": 0.84, "white": 0.31},
                                           {"blue": True, "red": True, "white": False},
                                           {"blue": 0.5, "red": 0.5, "white": 0.6}, "live", frame.get("seq")))
    return frame


def test_the_page_shows_the_twin_and_follows_a_stock_change_live(api, fdb, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    report(fdb, 5)  # the controller: pieces of every colour
    frame = _seed_frame_and_observation(fdb)
    version = fdb.twin.find_one({"_id": "factory-1"})["version"]
    browser.get(api.url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-version") == str(version))
    wait.until(lambda d: d.find_element(By.ID, "conn").get_attribute("data-state") == "live")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-frame") == str(frame["_id"]))
    assert "model-abc123"[:12] in browser.find_element(By.ID, "model").text
    disagree = [r.get_attribute("data-colour") for r in browser.find_elements(By.CSS_SELECTOR, "#colours tr.disagree")]
    twin = fdb.twin.find_one({"_id": "factory-1"})
    assert disagree == sorted(twin["delta"]) == ["white"]
    assert browser.find_element(By.ID, "delta-note").get_attribute("data-state") == "disagree"

    # the controller reports a new stock: the page shows it without a reload
    report(fdb, 6)
    new = fdb.twin.find_one({"_id": "factory-1"})
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-version") == str(new["version"]))
    shown = {e.get_attribute("data-slot"): e.get_attribute("data-type")
             for e in browser.find_elements(By.CSS_SELECTOR, "#rack .slot")}
    assert shown == {s: (t or "EMPTY") for s, t in new["reported"]["slots"].items()}
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#timeline li[data-version="{new["version"]}"]'))
    SCREENSHOT_DIR.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT_DIR / "twin_page.png"))


def test_the_ship_button_posts_an_order_and_the_list_follows_its_state_live(api, fdb, browser, write_token):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from factory_assets.twin import orders as tw

    browser.get(f"{api.url}/#token={write_token}")  # the controller reports one red piece, nothing else
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-version") == "1")
    button = {c: browser.find_element(By.CSS_SELECTOR, f'button[data-order="{c}"]') for c in ("red", "blue")}
    wait.until(lambda d: button["blue"].get_attribute("disabled") and button["red"].is_enabled())
    assert "no blue piece to ship" in button["blue"].get_attribute("title")
    assert "ship one red" in button["red"].text
    button["red"].click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-version") == "2")
    wait.until(lambda d: "shipping one red" in d.find_element(By.ID, "order-msg").text)
    (order,) = fdb.db["twin_orders"].find({"factory_id": "factory-1", "type": "RED"})
    assert order["state"] == "queued" and order["idempotency_key"]
    oid = order["_id"]
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#orders li[data-order-id="{oid}"][data-state="queued"]'))
    wait.until(lambda d: button["red"].get_attribute("disabled"))  # the one red piece is on order
    assert "not sent: this API has no --mqtt broker" in browser.find_element(By.ID, "order-wait").text
    # the controller takes the order: its state reaches the page through the twin's live stream
    fdb.db["twin_orders"].update_one({"_id": oid}, {"$set": {"state": "ordered"}})
    assert tw.sync_twin(fdb, "factory-1")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#orders li[data-order-id="{oid}"][data-state="ordered"]'))
    wait.until(lambda d: any("order: RED ordered" in li.text for li in d.find_elements(By.CSS_SELECTOR, "#timeline li")))


def _wait_for_version(browser, fdb, factory_id: str = "factory-1"):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    version = fdb.twin.find_one({"_id": factory_id})["version"]
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-version") == str(version))


def test_before_any_model_the_page_says_so_and_a_disagreement_while_the_crane_moves_is_no_alarm(api, fdb, browser):
    from selenium.webdriver.common.by import By

    browser.get(api.url + "/")
    _wait_for_version(browser, fdb)
    note = browser.find_element(By.ID, "delta-note")
    assert note.get_attribute("data-state") == "no-model" and "no model yet" in note.text
    assert "agree" not in note.text
    # a stock change reported at 20 s: the crane moves until 45 s; the camera's frames at 30-32 s
    # still show the old rack
    report(fdb, 20)
    _seed_frame_and_observation(fdb)
    _wait_for_version(browser, fdb)
    twin = fdb.twin.find_one({"_id": "factory-1"})
    assert twin["delta"] == {} and twin["in_transit"]["active"] is True
    note = browser.find_element(By.ID, "delta-note")
    assert note.get_attribute("data-state") == "in-transit" and "crane moving" in note.text
    assert not browser.find_elements(By.CSS_SELECTOR, "#colours tr.disagree")
    assert [r.get_attribute("data-colour") for r in browser.find_elements(By.CSS_SELECTOR, "#colours tr.transit")] \
        == sorted(twin["in_transit"]["colours"])
    assert not any("⚠" in li.text for li in browser.find_elements(By.CSS_SELECTOR, "#timeline li"))


def test_the_page_shows_a_warehouse_fault_prominently_and_the_controllers_clock(api, fdb, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from factory_assets.storage.clocks import record_offset
    from factory_assets.twin.live import LiveTwinUpdater
    from factory_assets.vocabulary.formats import problems

    browser.get(api.url + "/")
    _wait_for_version(browser, fdb)
    assert browser.find_element(By.ID, "faults").is_displayed() is False
    # an order for a colour the warehouse does not hold: its state says error (code 4)
    fault = {"ts": "2026-11-23T10:01:00.000Z", "station": "hbw", "code": 4,
             "description": "no WHITE workpiece in stock", "active": 0}
    assert problems("f/i/state/hbw", fault) == []
    fdb.mqtt.insert_one({"topic": "f/i/state/hbw", "ts": BASE_TS + timedelta(seconds=60), "factory_id": "factory-1",
                         "received_at": BASE_TS + timedelta(seconds=57), "payload": fault, "message_id": "hbw-fault"})
    record_offset(fdb, "factory-1", 3.2, samples=25, spread_s=0.003)
    LiveTwinUpdater(fdb, predictor=None, change_stream=False).step()
    assert fdb.twin.find_one({"_id": "factory-1"})["reported"]["stations"]["hbw"]["fault"] is True
    _wait_for_version(browser, fdb)
    banner = browser.find_element(By.ID, "faults")
    assert banner.is_displayed() and "no WHITE workpiece in stock" in banner.text and "high-bay warehouse" in banner.text
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-faults") == "hbw"
    assert browser.find_element(By.CSS_SELECTOR, '#stations li[data-station="hbw"]').get_attribute("class") == "fault"
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "clock").text == "controller clock +3.2 s")
    assert browser.find_element(By.CSS_SELECTOR, "#timeline li").text.count("hbw error") == 1
