"""Inference benchmark: the real `factory-assets serve` process over HTTP.

Trains a model (on the shared real photos' train split when present, else on
simulated frames), starts `factory-assets serve --model DIR` as its own process
on 127.0.0.1, then measures with keep-alive HTTP clients:
  - latency: p50/p99 of POST /invocations over N sequential requests of a 320x240 JPEG;
  - throughput: images/s with 4 concurrent clients.
Prints one JSON object. Targets on the 2-core dev machine: p50 <= 10 ms,
p99 <= 30 ms, >= 150 images/s.

    .venv/bin/python benchmarks/inference.py [--requests 1000] [--clients 4]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets" / "fischertechnik-warehouse"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def post(conn: http.client.HTTPConnection, body: bytes) -> int:
    conn.request("POST", "/invocations", body=body, headers={"Content-Type": "image/jpeg"})
    resp = conn.getresponse()
    resp.read()
    return resp.status


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--throughput-requests", type=int, default=2000)
    args = parser.parse_args()

    from factory_assets.vision.train import LocalTrainer

    work = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    if (SHARED / "train-annots" / "train.lst").is_file():
        dataset, data_source = SHARED, "shared real photos (train split)"
        image = sorted((SHARED / "train-imgs").glob("*.jp*g"))[0].read_bytes()
    else:
        from factory_assets.ingest.simdata import write_simulated_dataset

        dataset, data_source = write_simulated_dataset(work / "dataset", 120, 40, seed=0), "simulated frames"
        image = sorted((dataset / "train-imgs").rglob("*.jp*g"))[0].read_bytes()
    result = LocalTrainer().train(dataset, work / "model", seed=0)

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "factory_assets.cli", "serve", "--model", str(work / "model"),
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=dict(os.environ))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/ping")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"server did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for _ in range(50):  # warm-up
            post(conn, image)
        latencies, errors = [], 0
        for _ in range(args.requests):
            t0 = time.perf_counter()
            errors += post(conn, image) != 200
            latencies.append((time.perf_counter() - t0) * 1000)

        per_client = args.throughput_requests // args.clients
        counts = [0] * args.clients
        failures = [0] * args.clients

        def client(i: int) -> None:
            cc = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            for _ in range(per_client):
                if post(cc, image) == 200:
                    counts[i] += 1
                else:
                    failures[i] += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=10)

    print(json.dumps({
        "benchmark": "inference",
        "model_version": result.version,
        "trained_on": data_source,
        "image_bytes": len(image),
        "requests": args.requests,
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "max_ms": round(max(latencies), 2),
        "errors": errors + sum(failures),
        "concurrent_clients": args.clients,
        "throughput_images_per_s": round(sum(counts) / elapsed, 1),
        "targets": {"p50_ms": 10, "p99_ms": 30, "images_per_s": 150},
        "cpu_count": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
