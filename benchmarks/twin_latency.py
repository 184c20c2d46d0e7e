"""Publish-to-twin latency under the `make run` stack.

Starts the real stack with `factory-assets up` (embedded MongoDB in a temporary
home, MQTT broker, ingester, simulated factory, inference server, live twin
updater and dagster dev), deploys a first model trained on simulated frames (so
it does not wait for the bootstrap sensor), then listens to the simulator's
`i/cam` messages on the broker: the time a message is received is its publish
time (loopback, ~1 ms). A watcher polls the `digital_twin` document every 10 ms;
a frame is reflected when the twin shows that frame or a newer one. Prints one
JSON object: p50/p95/max latency over at least 200 frames and frames lost (a
published frame with no stored document or no inference).

    .venv/bin/python benchmarks/twin_latency.py [--frames 200] [--fps 4] [--no-dagster]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from factory_assets.cli.up import free_port, wait_port




def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--fps", type=float, default=4.0)
    parser.add_argument("--no-dagster", action="store_true", help="leave dagster dev out of the stack")
    args = parser.parse_args()

    import numpy as np
    import paho.mqtt.client as mqtt

    from factory_assets.simulation.datasets import write_simulated_dataset
    from factory_assets.storage.embedded import EmbeddedMongo
    from factory_assets.storage.frames import parse_ts
    from factory_assets.storage.models import register_model, set_endpoint_version
    from factory_assets.storage.mongo import connect
    from factory_assets.backends.local import LocalTrainer
    from factory_assets.vision.version import code_version

    home = Path(tempfile.mkdtemp(prefix="bench-twin-"))
    env = dict(os.environ, FACTORY_HOME=str(home), DAGSTER_HOME=str(home / "dagster_home"),
               MONGODB_DATABASE="bench_twin")
    embedded = None
    if not env.get("MONGODB_URI"):
        embedded = EmbeddedMongo(home)
        env["MONGODB_URI"] = embedded.start(port=0).uri
    os.environ.update({k: env[k] for k in ("MONGODB_URI", "MONGODB_DATABASE", "FACTORY_HOME")})
    fdb = connect()
    trained = LocalTrainer().train(write_simulated_dataset(home / "dataset", 400, 40, seed=1), home / "model", seed=0)
    register_model(fdb, trained.model, dataset_version="simulated", code_version=code_version(),
                   metrics=trained.metrics)
    mqtt_port, serve_port, ui_port = free_port(), free_port(), free_port()
    set_endpoint_version(fdb, "factory-stock", trained.version, url=f"http://127.0.0.1:{serve_port}")

    cmd = [sys.executable, "-m", "factory_assets.cli", "up", "--mqtt-port", str(mqtt_port), "--serve-port",
           str(serve_port), "--port", str(ui_port), "--fps", str(args.fps), "--seed", "7"]
    if args.no_dagster:
        cmd.append("--no-dagster")
    stack = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    published: dict = {}
    polls: list[tuple[float, object]] = []
    stop = threading.Event()
    try:
        if not wait_port(mqtt_port, 60) or not wait_port(serve_port, 120):
            raise SystemExit("the stack did not come up")

        def on_message(client, userdata, msg):
            ts = parse_ts(json.loads(msg.payload)["ts"])
            published.setdefault(ts, time.perf_counter())

        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        sub.on_message = on_message
        sub.connect("127.0.0.1", mqtt_port)
        sub.subscribe("i/cam", qos=0)
        sub.loop_start()

        def watch():
            while not stop.is_set():
                doc = fdb.twin.find_one({}, {"observed.frame_ts": 1})
                if doc and doc.get("observed"):
                    polls.append((time.perf_counter(), doc["observed"]["frame_ts"]))
                time.sleep(0.01)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        time.sleep(5.0)  # warm-up: model loaded, live updater past any backlog
        published.clear()
        deadline = time.monotonic() + args.frames / args.fps + 120
        while len(published) < args.frames and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3.0)  # let the last frames reach the twin
        stop.set()
        watcher.join()
        sub.loop_stop()
        measured = sorted(published.items())[: args.frames]
        latencies = []
        for ts, t_pub in measured:
            hit = next((t for t, seen in polls if t >= t_pub and seen >= ts), None)
            if hit is not None:
                latencies.append((hit - t_pub) * 1000)
        stamps = [ts for ts, _ in measured]
        stored = {d["ts"] for d in fdb.frames.find({"ts": {"$in": stamps}}, {"ts": 1})}
        inferred = {d["frame_ts"] for d in fdb.inferences.find({"frame_ts": {"$in": stamps}}, {"frame_ts": 1})}
        lat = np.array(latencies)
        result = {
            "benchmark": "publish_to_twin_latency",
            "frames": len(measured),
            "fps": args.fps,
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "latency_ms_p95": round(float(np.percentile(lat, 95)), 1) if len(lat) else None,
            "latency_ms_max": round(float(lat.max()), 1) if len(lat) else None,
            "frames_not_reflected": len(measured) - len(latencies),
            "frames_lost": len([s for s in stamps if s not in stored or s not in inferred]),
            "stack": "factory-assets up" + (" --no-dagster" if args.no_dagster else " (with dagster dev)"),
            "cpu_count": os.cpu_count(),
        }
    finally:
        stop.set()
        try:
            os.killpg(stack.pid, signal.SIGINT)
            stack.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(stack.pid, signal.SIGKILL)
        if embedded:
            embedded.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
