"""Inference benchmark: the real `factory-assets serve` process over HTTP.

Trains a model (on the shared real photos' train split when present, else on
simulated frames), starts `factory-assets serve --model DIR` as its own process
on 127.0.0.1, then measures with keep-alive HTTP clients:
  - in-process: p50 of the model's own ``predict_proba_bytes`` on the same image in
    this process (OpenCV on one thread, as the server runs it), in blocks alternating with
  - latency: p50/p99 of POST /invocations over N sequential requests of that image,
    and the ratio of the two p50s (target <= 1.1: HTTP costs at most 10 %);
    ``in_server_p50_ms`` is the model call inside the server (its X-Inference-Ms);
  - throughput: images/s with 4 concurrent clients;
  - with ``--stalled N``: N uploads that send their headers and then nothing; the
    server's thread count while they are held, the p50 of a normal client meanwhile,
    and how many of them were answered 408 and closed within the body deadline.
Prints one JSON object. Targets on the 2-core dev machine: p50 <= 10 ms,
p99 <= 30 ms, >= 150 images/s, HTTP/in-process p50 <= 1.1.

    .venv/bin/python benchmarks/inference.py [--requests 1000] [--clients 4] [--stalled 800]
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

from factory_assets.cli.up import free_port

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets" / "fischertechnik-warehouse"



def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def post(conn: http.client.HTTPConnection, body: bytes, server_ms: list | None = None) -> int:
    conn.request("POST", "/invocations", body=body, headers={"Content-Type": "image/jpeg"})
    resp = conn.getresponse()
    resp.read()
    if server_ms is not None and resp.status == 200:
        server_ms.append(float(resp.getheader("X-Inference-Ms")))
    return resp.status


def server_threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])


def measure_stalled(port: int, pid: int, image: bytes, n: int, body_timeout: float) -> dict:
    """N uploads send headers and 10 of 44 KB, then nothing; a normal client keeps posting meanwhile."""
    import selectors

    threads_before = server_threads(pid)
    head = (f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {len(image)}\r\n\r\n").encode()
    socks, opened_at = [], {}
    t_open = time.perf_counter()
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(head + image[:10])
        socks.append(s)
        opened_at[s] = time.perf_counter()
    opened_s = time.perf_counter() - t_open
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    latencies, statuses = [], []
    for _ in range(100):
        t0 = time.perf_counter()
        statuses.append(post(conn, image))
        latencies.append((time.perf_counter() - t0) * 1000)
    threads_held = server_threads(pid)
    # every stalled upload: answered 408 and closed by the server within the deadline (+ slack)
    sel = selectors.DefaultSelector()
    replies = {}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        replies[s] = b""
    closed, answered_408, held = 0, 0, []
    deadline = t_open + body_timeout + 10
    while closed < n and time.perf_counter() < deadline:
        for key, _ in sel.select(timeout=0.5):
            try:
                chunk = key.fileobj.recv(4096)
            except OSError:
                chunk = b""
            if chunk:
                replies[key.fileobj] += chunk
                continue
            sel.unregister(key.fileobj)
            held.append(time.perf_counter() - opened_at[key.fileobj])
            closed += 1
            answered_408 += replies[key.fileobj].startswith(b"HTTP/1.1 408")
    last_closed_s = time.perf_counter() - t_open
    for s in socks:
        s.close()
    return {"stalled": n, "server_threads_before": threads_before, "server_threads_while_held": threads_held,
            "others_ok": sum(st == 200 for st in statuses), "others_total": len(statuses),
            "others_p50_ms": round(percentile(latencies, 50), 2), "answered_408_and_closed": answered_408,
            "closed": closed, "opening_them_took_s": round(opened_s, 1),
            "held_s_min": round(min(held, default=0), 1), "held_s_max": round(max(held, default=0), 1),
            "all_closed_after_s": round(last_closed_s, 1), "body_timeout_s": body_timeout}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--throughput-requests", type=int, default=2000)
    parser.add_argument("--predict-threads", type=int, default=None, help="the server's --predict-threads")
    parser.add_argument("--stalled", type=int, default=0, help="stalled uploads to hold open (0: skip)")
    parser.add_argument("--body-timeout", type=float, default=5.0, help="the server's body deadline")
    args = parser.parse_args()

    from factory_assets.backends.local import LocalTrainer

    work = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    if (SHARED / "train-annots" / "train.lst").is_file():
        dataset, data_source = SHARED, "shared real photos (train split)"
        image = sorted((SHARED / "train-imgs").glob("*.jp*g"))[0].read_bytes()
    else:
        from factory_assets.simulation.datasets import write_simulated_dataset

        dataset, data_source = write_simulated_dataset(work / "dataset", 120, 40, seed=0), "simulated frames"
        image = sorted((dataset / "train-imgs").rglob("*.jp*g"))[0].read_bytes()
    result = LocalTrainer().train(dataset, work / "model", seed=0)

    port = free_port()
    command = [sys.executable, "-m", "factory_assets.cli", "serve", "--model", str(work / "model"),
               "--port", str(port), "--body-timeout", str(args.body_timeout)]
    if args.predict_threads is not None:
        command += ["--predict-threads", str(args.predict_threads)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
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
                server.kill()  # reading stderr of a live process would block
                raise SystemExit(f"server did not start: {server.communicate()[1].decode()[-2000:]}")
            time.sleep(0.1)

        from factory_assets.vision.model import StockModel

        from factory_assets.serving.server import _limit_threads

        _limit_threads()  # OpenCV on one thread and the heap kept, as the server runs the model
        model = StockModel.load(work / "model")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for _ in range(50):  # warm-up
            post(conn, image)
            model.predict_proba_bytes(image)
        latencies, in_process, in_server, errors = [], [], [], 0
        # Alternating blocks of 100, so both see the same machine load; within a block requests are
        # back to back (alternating every request would leave the server idle during each in-process
        # call and add a wake-up to every request that a steady stream does not pay).
        for block in range(0, args.requests, 100):
            n = min(100, args.requests - block)
            for _ in range(n):
                t0 = time.perf_counter()
                model.predict_proba_bytes(image)
                in_process.append((time.perf_counter() - t0) * 1000)
            for _ in range(n):
                t0 = time.perf_counter()
                errors += post(conn, image, in_server) != 200
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
        stalled = measure_stalled(port, server.pid, image, args.stalled, args.body_timeout) if args.stalled else None
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
        "in_process_p50_ms": round(percentile(in_process, 50), 2),
        "in_server_p50_ms": round(percentile(in_server, 50), 2),  # the model call inside the server (X-Inference-Ms)
        "http_over_in_process_p50": round(percentile(latencies, 50) / percentile(in_process, 50), 3),
        "errors": errors + sum(failures),
        "predict_threads": args.predict_threads,
        "concurrent_clients": args.clients,
        "throughput_images_per_s": round(sum(counts) / elapsed, 1),
        "stalled_uploads": stalled,
        "targets": {"p50_ms": 10, "p99_ms": 30, "images_per_s": 150, "http_over_in_process_p50": 1.1},
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),  # other work on the machine: latency is noise above ~1
    }))


if __name__ == "__main__":
    main()
