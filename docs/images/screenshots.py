"""Retake the two pictures of the README and the docs from a running stack.

    FACTORY_HOME=$(mktemp -d) .venv/bin/factory-assets up      # in one terminal; wait for the first model
    .venv/bin/python docs/images/screenshots.py [--twin http://127.0.0.1:8000] [--dagster http://127.0.0.1:3000]

Writes docs/images/twin-page.png (the twin page once its frame and colour evidence are drawn) and
docs/images/dagster-graph.png (the Dagster UI's global asset lineage, every group expanded). Uses
Debian's chromium and chromium-driver, as the page test does. A tool, not a test: it is not run
by the suite, and mkdocs.yml leaves it out of the site.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

HERE = Path(__file__).resolve().parent


def browser(width: int, height: int):
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}",
                "--disable-gpu", "--no-first-run", "--hide-scrollbars"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)


def twin_page(url: str, out: Path) -> None:
    d = browser(1440, 900)
    try:
        d.get(url + "/")
        wait = WebDriverWait(d, 60)
        wait.until(lambda d: d.find_element(By.ID, "conn").get_attribute("data-state") == "live")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-frame"))
        wait.until(lambda d: not d.find_element(By.ID, "no-frame").is_displayed())
        # the colour evidence arrives by its own request: wait until the canvas has pixels
        wait.until(lambda d: d.execute_script(
            "const c = document.getElementById('evidence');"
            "const a = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "for (let i = 3; i < a.length; i += 4) { if (a[i]) return true; } return false;"))
        d.save_screenshot(str(out))
    finally:
        d.quit()


def _click(d, script: str) -> None:
    WebDriverWait(d, 30).until(lambda d: d.execute_script(script))


def _button(icon: str, last: bool = True) -> str:
    pick = "bs[bs.length - 1]" if last else "bs[0]"
    return (f"const bs = Array.from(document.querySelectorAll('button'))"
            f".filter(b => b.innerHTML.includes('aria-label=\"{icon}\"'));"
            f"if (!bs.length) return false; {pick}.click(); return true;")


def _menu(text: str) -> str:
    return ("const m = Array.from(document.querySelectorAll('[role=menuitem]'))"
            f".filter(e => e.innerText.startsWith('{text}'));"
            "if (!m.length) return false; m[0].click(); return true;")


def dagster_graph(url: str, out: Path) -> None:
    d = browser(1500, 760)
    try:
        d.get(url + "/asset-groups")
        wait = WebDriverWait(d, 60)
        wait.until(lambda d: "asset_group" in d.page_source)
        # the first visit shows a community dialog; the navigation takes room the graph can use
        d.execute_script("for (const b of document.querySelectorAll('button'))"
                         " if (['Skip', 'Hide navigation'].includes(b.innerText.trim())) b.click();")
        _click(d, _button("settings"))                 # the graph's own settings, bottom right
        _click(d, _menu("Expand all groups"))
        d.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        _click(d, _button("panel_show_right"))         # hide the asset list beside the graph
        wait.until(lambda d: "twin_state" in d.page_source and "model_endpoint" in d.page_source)
        time.sleep(3)  # the graph animates to its new fit after the panel closes
        d.save_screenshot(str(out))
    finally:
        d.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--twin", default="http://127.0.0.1:8000")
    parser.add_argument("--dagster", default="http://127.0.0.1:3000")
    args = parser.parse_args()
    twin_page(args.twin.rstrip("/"), HERE / "twin-page.png")
    dagster_graph(args.dagster.rstrip("/"), HERE / "dagster-graph.png")


if __name__ == "__main__":
    main()
