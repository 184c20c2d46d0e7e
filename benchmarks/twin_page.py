"""Twin page and SSE fan-out figures; prints JSON.

1. MQTT publish of a camera frame -> the live page (headless Chromium) shows it:
   the real broker, the real ingester, the real ``factory-assets api`` process; p50/p95
   over ``--frames`` frames published one after the other (target p95 <= 500 ms).
2. SSE fan-out: ``--subscribers`` clients follow the twin; the controller's stock
   changes ``--changes`` times; delivery latency (write -> event received) p50/p95
   (target p95 <= 100 ms), and the API process's CPU time and peak RSS.

    .venv/bin/python benchmarks/twin_page.py [--frames 200] [--subscribers 200] [--changes 30]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path


def pct(xs, q):
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))], 1) if xs else None


def proc_stats(pid: int) -> dict:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    cpu = (int(parts[11]) + int(parts[12])) / tick
    rss = hwm = None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return {"cpu_s": cpu, "rss_mb": rss, "peak_rss_mb": hwm}


def wait_http(url: str, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def frame_latency(api_url: str, broker_url: str, n: int) -> dict:
    import base64

    import paho.mqtt.client as mqtt
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from factory_assets.ingest.mqtt import parse_mqtt_url
    from factory_assets.simulation.factory import FactorySimulator, iso_ms

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)
    host, port = parse_mqtt_url(broker_url)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect(host, port)
    client.loop_start()
    sim = FactorySimulator(seed=0)
    latencies = []
    try:
        driver.get(api_url + "/")
        wait = WebDriverWait(driver, 20, poll_frequency=0.005)
        wait.until(lambda d: d.find_element(By.ID, "conn").get_attribute("data-state") == "live")
        body = driver.find_element(By.TAG_NAME, "body")
        for k in range(n):
            jpeg, _ = sim.frame(k * 0.5)
            ts = datetime.now(timezone.utc)
            msg = {"ts": iso_ms(ts), "data": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()}
            before = body.get_attribute("data-frame")
            t0 = time.perf_counter()
            client.publish("i/cam", json.dumps(msg), qos=1).wait_for_publish(5)
            wait.until(lambda d: body.get_attribute("data-frame") not in (None, before))
            latencies.append((time.perf_counter() - t0) * 1000)
    finally:
        client.loop_stop()
        client.disconnect()
        driver.quit()
    return {"frames": len(latencies), "p50_ms": pct(latencies, 0.5), "p95_ms": pct(latencies, 0.95),
            "max_ms": pct(latencies, 1.0)}


async def fan_out(api_url: str, fdb, subscribers: int, changes: int, api_pid: int) -> dict:
    import httpx

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from factory_assets_tests.api.conftest import report

    url = f"{api_url}/api/factories/factory-1/twin/events"
    arrivals: dict[int, list[float]] = {}
    ready = asyncio.Event()
    connected = 0

    async def subscriber(client):
        nonlocal connected
        async with client.stream("GET", url) as r:
            async for line in r.aiter_lines():
                if line.startswith("id: "):
                    v = int(line[4:])
                    arrivals.setdefault(v, []).append(time.perf_counter())
                    if line and v == start_version:
                        connected += 1
                        if connected == subscribers:
                            ready.set()

    start_version = fdb.twin.find_one({"_id": "factory-1"})["version"]
    limits = httpx.Limits(max_connections=subscribers + 10)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        tasks = [asyncio.create_task(subscriber(client)) for _ in range(subscribers)]
        await asyncio.wait_for(ready.wait(), 120)
        before = proc_stats(api_pid)
        written = {}
        for k in range(changes):
            t = time.perf_counter()
            await asyncio.to_thread(report, fdb, 100 + k)
            written[fdb.twin.find_one({"_id": "factory-1"}, {"version": 1})["version"]] = t
            await asyncio.sleep(0.2)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(len(arrivals.get(v, [])) >= subscribers for v in written):
            await asyncio.sleep(0.05)
        after = proc_stats(api_pid)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    lat = [(a - written[v]) * 1000 for v in written for a in arrivals.get(v, [])]
    missing = sum(subscribers - len(arrivals.get(v, [])) for v in written)
    elapsed = changes * 0.2
    return {"subscribers": subscribers, "changes": changes, "deliveries": len(lat), "missing": missing,
            "p50_ms": pct(lat, 0.5), "p95_ms": pct(lat, 0.95), "max_ms": pct(lat, 1.0),
            "api_cpu_percent_during": round(100 * (after["cpu_s"] - before["cpu_s"]) / elapsed, 1),
            "api_rss_mb": round(after["rss_mb"], 1), "api_peak_rss_mb": round(after["peak_rss_mb"], 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--subscribers", type=int, default=200)
    p.add_argument("--changes", type=int, default=30)
    p.add_argument("--poll", action="store_true", help="API reader polls instead of a change stream")
    args = p.parse_args()

    from factory_assets.simulation.broker import start_broker
    from factory_assets.ingest.mqtt import MqttIngester
    from factory_assets.ingest.service import Ingestor
    from factory_assets.storage.embedded import EmbeddedMongo
    from factory_assets.storage.mongo import connect

    tmp = Path(tempfile.mkdtemp(prefix="twin-page-bench-"))
    mongo = EmbeddedMongo(tmp / "home")
    uri = mongo.start(port=0).uri
    db = f"bench_{uuid.uuid4().hex[:8]}"
    fdb = connect(uri, db)
    broker = start_broker(port=0)
    ingester = MqttIngester(Ingestor(fdb), broker.url, progress_every=0, log=lambda *_: None).start()
    api = None
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from factory_assets_tests.api.conftest import report

        report(fdb, 0)
        env = {**os.environ, "MONGODB_URI": uri, "MONGODB_DATABASE": db}
        port = 18000 + os.getpid() % 1000
        api = subprocess.Popen([sys.executable, "-m", "factory_assets.cli", "api", "--port", str(port),
                                *(["--poll"] if args.poll else [])], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        api_url = f"http://127.0.0.1:{port}"
        wait_http(api_url + "/api/health")
        ingester.subscribed.wait(20)
        out = {"reader": json.loads(__import__("httpx").get(api_url + "/api/health").text)["reader"]}
        out["frame_to_page"] = frame_latency(api_url, broker.url, args.frames) if args.frames else None
        out["sse_fan_out"] = asyncio.run(fan_out(api_url, fdb, args.subscribers, args.changes, api.pid))
        out["targets"] = {"frame_to_page_p95_ms": 500, "sse_delivery_p95_ms": 100}
        print(json.dumps(out, indent=2))
    finally:
        if api is not None:
            api.terminate()
            api.wait(15)
        ingester.stop()
        broker.close()
        mongo.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
