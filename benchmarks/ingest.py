"""Ingest benchmark: MQTT publish -> stored frame document.

Starts a real amqtt broker, the real `factory-assets ingest mqtt` process and
(unless MONGODB_URI is set) an embedded MongoDB in a temporary home; publishes
a burst of N 320x240 JPEG frames as fast as QoS 1 allows (throughput),
then a steady stream at a camera-like rate (latency); a reader follows
the seq cursor to time when each frame becomes readable. Prints one JSON object:
frames/s, p50/p95 publish-to-stored latency, peak RSS of the ingester.

    .venv/bin/python benchmarks/ingest.py [--frames 2000]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=2000, help="burst: published as fast as QoS 1 allows")
    parser.add_argument("--steady-frames", type=int, default=300)
    parser.add_argument("--steady-rate", type=float, default=25.0, help="steady phase frames per second")
    args = parser.parse_args()

    import numpy as np
    import paho.mqtt.client as mqtt

    from factory_assets.simulation.broker import start_broker
    from factory_assets.storage.embedded import EmbeddedMongo
    from factory_assets.storage.mongo import connect
    from factory_assets.storage.frames import read_frames_after
    from factory_assets_tests.helpers import cam_payload, jpeg_bytes

    home = tempfile.mkdtemp(prefix="bench-ingest-")
    embedded = None
    env = dict(os.environ, MONGODB_DATABASE=f"bench_{int(time.time())}")
    if not env.get("MONGODB_URI"):
        embedded = EmbeddedMongo(Path(home))
        env["MONGODB_URI"] = embedded.start(port=0).uri
    os.environ.update({"MONGODB_URI": env["MONGODB_URI"], "MONGODB_DATABASE": env["MONGODB_DATABASE"]})
    fdb = connect()
    broker = start_broker()
    ingester = subprocess.Popen([sys.executable, "-m", "factory_assets.cli", "ingest", "mqtt", "--url", broker.url,
                                 "--progress-every", "0"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        time.sleep(3.0)  # connect + subscribe
        images = [jpeg_bytes(seed=i) for i in range(50)]
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        client.max_inflight_messages_set(100)
        client.connect(broker.host, broker.port)
        client.loop_start()
        cursor = [0]

        def phase(n: int, rate: float | None, t0: datetime) -> dict:
            """Publish n frames (as fast as possible, or at ``rate`` per second); time each to readable."""
            published: dict[str, float] = {}
            stored: dict[str, float] = {}

            def reader():
                deadline = time.monotonic() + 120
                while len(stored) < n and time.monotonic() < deadline:
                    page = read_frames_after(fdb, cursor[0], limit=500, projection={"ts": 1})
                    now = time.perf_counter()
                    for d in page.frames:
                        stored[d["ts"].strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"] = now
                    cursor[0] = page.cursor
                    if not page.frames:
                        time.sleep(0.005)

            r = threading.Thread(target=reader, daemon=True)
            r.start()
            start = time.perf_counter()
            infos = []
            for i in range(n):
                if rate:
                    time.sleep(max(0.0, start + i / rate - time.perf_counter()))
                ts = (t0 + timedelta(milliseconds=i)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
                payload = cam_payload(images[i % 50], ts)
                published[ts] = time.perf_counter()
                infos.append(client.publish("i/cam", payload, qos=1))
            for info in infos:
                info.wait_for_publish(30)
            r.join(timeout=130)
            end = max(stored.values()) if stored else time.perf_counter()
            lat = np.array([(stored[k] - published[k]) * 1000 for k in published if k in stored])
            return {"frames": n, "stored": len(stored), "lost": n - len(stored),
                    "frames_per_second": round(len(stored) / (end - start), 1),
                    "latency_ms_p50": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
                    "latency_ms_p95": round(float(np.percentile(lat, 95)), 1) if len(lat) else None}

        burst = phase(args.frames, None, datetime(2026, 1, 1, tzinfo=timezone.utc))
        steady = phase(args.steady_frames, args.steady_rate, datetime(2026, 1, 2, tzinfo=timezone.utc))
        result = {
            "benchmark": "ingest_mqtt_to_mongodb",
            "burst": burst,
            "steady": {**steady, "rate_per_second": args.steady_rate},
            "frames_per_second": burst["frames_per_second"],
            "latency_ms_p50": steady["latency_ms_p50"],
            "latency_ms_p95": steady["latency_ms_p95"],
            "frames_lost": burst["lost"] + steady["lost"],
            "ingester_peak_rss_mb": peak_rss_mb(ingester.pid),
            "mongodb": "embedded SecantusDB" if embedded else "MONGODB_URI",
            "cpu_count": os.cpu_count(),
        }
        client.loop_stop()
    finally:
        ingester.terminate()
        ingester.wait(30)
        broker.stop()
        fdb.db.client.drop_database(fdb.db.name)
        if embedded:
            embedded.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
