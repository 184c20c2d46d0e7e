"""/docs (Swagger UI) and /redoc (ReDoc) render in a real headless Chromium with the network off:
every name but 127.0.0.1 fails to resolve, and every request the browser makes is listed."""
from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest
import requests

from factory_assets_tests.fixtures.chromium import SCREENSHOT_DIR, offline_browser  # noqa: F401


def _requests_made(driver) -> list[str]:
    """Every URL the page asked for since the last call (the DevTools network log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def _assert_only_local(driver, base: str) -> list[str]:
    urls = _requests_made(driver)
    foreign = [u for u in urls if urlsplit(u).scheme in ("http", "https", "ws", "wss")
               and urlsplit(u).netloc != urlsplit(base).netloc]
    assert foreign == [], f"the page reached beyond the server: {foreign}"
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors
    return urls


def _operations(base: str) -> set[tuple[str, str]]:
    doc = requests.get(base + "/openapi.json", timeout=10).json()
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item}


def test_swagger_ui_renders_every_operation_offline_from_assets_the_package_ships(api, offline_browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    expected = _operations(api.url)
    offline_browser.get(api.url + "/docs")
    wait = WebDriverWait(offline_browser, 30)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= len(expected))
    shown = {(b.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text,
              b.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path"))
             for b in offline_browser.find_elements(By.CSS_SELECTOR, ".opblock")}
    assert shown == expected

    # an operation opened shows the statuses it answers, with the error body
    twin = offline_browser.find_element(By.ID, "operations-default-get_twin_api_factories__factory_id__twin_get")
    twin.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait.until(lambda d: twin.find_elements(By.CSS_SELECTOR, 'tr.response[data-code="404"]'))
    codes = {r.get_attribute("data-code") for r in twin.find_elements(By.CSS_SELECTOR, "tr.response")}
    assert {"200", "304", "401", "404", "422"} <= codes
    urls = _assert_only_local(offline_browser, api.url)
    assert api.url + "/docs-assets/swagger-ui-bundle.js" in urls
    assert api.url + "/docs-assets/favicon.png" in urls
    SCREENSHOT_DIR.mkdir(exist_ok=True)
    assert offline_browser.save_screenshot(str(SCREENSHOT_DIR / "api_docs.png"))


def test_redoc_renders_every_operation_offline_from_assets_the_package_ships(api, offline_browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    expected = _operations(api.url)
    offline_browser.get(api.url + "/redoc")
    wait = WebDriverWait(offline_browser, 30)
    operation = '[data-section-id*="operation/"]'
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, operation)) >= len(expected))
    assert len(offline_browser.find_elements(By.CSS_SELECTOR, operation)) == len(expected)
    # the declared answers are listed (ReDoc shows each response's status as a button)
    text = offline_browser.find_element(By.TAG_NAME, "body").text
    for status in ("304", "412", "428"):
        assert status in text
    urls = _assert_only_local(offline_browser, api.url)
    assert api.url + "/docs-assets/redoc.standalone.js" in urls
    SCREENSHOT_DIR.mkdir(exist_ok=True)
    assert offline_browser.save_screenshot(str(SCREENSHOT_DIR / "api_redoc.png"))
