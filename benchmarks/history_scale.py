"""Cost as history grows: the hot paths with 1,000 / 10,000 / 100,000 real-size frames stored.

For each size, a fresh embedded SecantusDB (its own temporary home) is bulk-loaded with
that many 320x240 JPEG frames rendered by the simulator (``insert_many`` in batches,
with seqs), an inference per frame, a stock report every 6 s of frame time and auto
labels' inputs. The history spans several days; the newest day holds a fixed 1,000
frames, so ``labeled_images`` for one day measures the day's work, not the history's.
Then it measures:

* ``idle_poll_ms`` — one idle poll of the live path: ``assign_missing_seqs`` +
  ``read_frames_after`` at the horizon (median of 30);
* ``sensor_tick_ms`` — ``plan_frames`` as ``new_frames_sensor`` calls it, with the four
  newest frames new since its cursor (median of 10);
* ``labeled_images_day_ms`` — ``auto_label`` (the domain function behind ``labeled_images``)
  over the newest day;
* ``twin_p95_ms`` — insert of a frame (``insert_frames``, as the ingester does) to the
  ``digital_twin`` showing it, at 4 frames/s, through the real ``factory-assets twin live``
  process and a real ``factory-assets serve`` inference server;
* ``idle_cpu_percent_of_core`` — CPU seconds of the live updater plus the database over an
  idle window (nothing arriving), as a share of one core;
* ``live_rss_mb`` — the live updater's resident memory at the end.

    .venv/bin/python benchmarks/history_scale.py [--sizes 1000,10000,100000] [--idle-seconds 30]

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from factory_assets.cli.up import free_port, wait_port

FPS = 4.0
DAY_FRAMES = 1_000
DAY = datetime(2026, 6, 30, tzinfo=timezone.utc)  # the newest day of the history
MODEL_VERSION = "bench-history"




def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def frame_times(n: int) -> list[datetime]:
    """The newest DAY_FRAMES frames at 4 frames/s on DAY; older ones 10 per minute on the days before."""
    newest = [DAY + timedelta(hours=1, seconds=i / FPS) for i in range(min(n, DAY_FRAMES))]
    older = [DAY - timedelta(seconds=6 * (i + 1)) for i in range(max(0, n - DAY_FRAMES))]
    return sorted(older) + newest


def load(fdb, n: int, images: list[bytes]) -> None:
    from factory_assets.storage.frames import FrameSequence, build_frame
    from factory_assets.storage.inferences import build_inference

    seq = FrameSequence(fdb)
    times = frame_times(n)
    batch = 1000
    for lo in range(0, n, batch):
        chunk = times[lo:lo + batch]
        alloc = seq.allocate(len(chunk))
        docs = []
        for i, ts in enumerate(chunk):
            doc = build_frame(images[(lo + i) % len(images)], ts=ts, camera_id="txt-cam", factory_id="factory-1",
                              content_type="image/jpeg", width=320, height=240, source={"kind": "bench"},
                              received_at=ts)
            doc["seq"] = alloc.lo + i
            docs.append(doc)
        fdb.frames.insert_many(docs, ordered=False)
        seq.release(alloc)
        fdb.inferences.insert_many([build_inference(d, probabilities={"blue": 0.9, "red": 0.1, "white": 0.1},
                                                    thresholds={}, model_version=MODEL_VERSION, latency_ms=2.0,
                                                    source="batch") for d in docs], ordered=False)
    # a stock report every 6 s of frame time (the simulator changes stock about that often)
    first, last = times[0], times[-1] + timedelta(seconds=60)
    reports, t, i = [], first - timedelta(seconds=30), 0
    while t <= last:
        reports.append({"topic": "f/i/stock", "ts": t, "factory_id": "factory-1", "message_id": f"bench-{i}",
                        "payload": {"ts": t.isoformat(), "stockItems": [
                            {"location": "A1", "workpiece": {"type": "BLUE", "state": "RAW", "id": "1"}}]}})
        t, i = t + timedelta(seconds=6), i + 1
        if len(reports) == 5000:
            fdb.mqtt.insert_many(reports, ordered=False)
            reports = []
    if reports:
        fdb.mqtt.insert_many(reports, ordered=False)


def median_ms(fn, reps: int) -> float:
    fn()  # warm
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 2)


def measure(n: int, images: list[bytes], model_dir: Path, args) -> dict:
    import numpy as np

    from factory_assets.datasets.autolabel import auto_label
    from factory_assets.storage.embedded import EmbeddedMongo
    from factory_assets.storage.frames import (FrameSequence, assign_missing_seqs, build_frame, insert_frames,
                                               read_frames_after)
    from factory_assets.storage.mongo import connect
    from factory_assets.twin.planning import plan_frames

    home = Path(tempfile.mkdtemp(prefix=f"bench-history-{n}-"))
    embedded = EmbeddedMongo(home)
    status = embedded.start(port=0)
    env = dict(os.environ, FACTORY_HOME=str(home), MONGODB_URI=status.uri, MONGODB_DATABASE="bench_history")
    fdb = connect(status.uri, "bench_history")
    procs: list[subprocess.Popen] = []
    result: dict = {"frames_stored": n}
    try:
        t0 = time.perf_counter()
        load(fdb, n, images)
        result["load_s"] = round(time.perf_counter() - t0, 1)
        horizon = FrameSequence(fdb).horizon()

        def idle_poll():
            assign_missing_seqs(fdb)
            read_frames_after(fdb, horizon)

        result["idle_poll_ms"] = median_ms(idle_poll, 30)
        result["sensor_tick_ms"] = median_ms(lambda: plan_frames(fdb, horizon - 4, MODEL_VERSION,
                                                                 now=DAY + timedelta(days=1)), 10)
        t0 = time.perf_counter()
        summary = auto_label(fdb, DAY, DAY + timedelta(days=1))
        result["labeled_images_day_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        result["labeled_images_day_frames"] = summary.frames

        # the live path as `make run` starts it: inference server + `factory-assets twin live`
        fdb.counters.update_one({"_id": "cursor:twin-live"}, {"$set": {"seq": horizon}}, upsert=True)
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "factory_assets.cli", "serve", "--model", str(model_dir),
                                       "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
        if not wait_port(port, 120):
            raise SystemExit("the inference server did not come up")
        live = subprocess.Popen([sys.executable, "-m", "factory_assets.cli", "twin", "live", "--endpoint-url",
                                 f"http://127.0.0.1:{port}"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(live)

        latencies = []
        rng = np.random.default_rng(n)
        sent_at: dict = {}
        seen: list = []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                doc = fdb.twin.find_one({"_id": "factory-1"}, {"observed.frame_ts": 1})
                if doc and doc.get("observed"):
                    seen.append((time.perf_counter(), doc["observed"]["frame_ts"]))
                time.sleep(0.005)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        base = datetime.now(timezone.utc)
        total = args.warmup + args.frames
        for i in range(total):
            ts = base + timedelta(seconds=i / FPS)
            doc = build_frame(images[int(rng.integers(len(images)))], ts=ts, camera_id="txt-cam",
                              factory_id="factory-1", content_type="image/jpeg", width=320, height=240,
                              source={"kind": "bench-live"})
            t_sent = time.perf_counter()
            insert_frames(fdb, [doc])
            if i >= args.warmup:
                sent_at[doc["ts"]] = t_sent
            time.sleep(max(0.0, 1 / FPS - (time.perf_counter() - t_sent)))
        time.sleep(3.0)  # the last frames reach the twin
        stop.set()
        watcher.join()
        for ts, t_sent in sent_at.items():
            hit = next((t for t, shown in seen if t >= t_sent and shown >= ts), None)
            if hit is not None:
                latencies.append((hit - t_sent) * 1000)
        lat = np.array(latencies)
        result["twin_frames"] = len(sent_at)
        result["twin_not_reflected"] = len(sent_at) - len(latencies)
        result["twin_p50_ms"] = round(float(np.percentile(lat, 50)), 1) if len(lat) else None
        result["twin_p95_ms"] = round(float(np.percentile(lat, 95)), 1) if len(lat) else None

        time.sleep(2.0)  # settle: nothing arrives from here on
        pids = [live.pid, status.pid]
        c0, w0 = sum(cpu_seconds(p) for p in pids), time.monotonic()
        time.sleep(args.idle_seconds)
        c1, w1 = sum(cpu_seconds(p) for p in pids), time.monotonic()
        result["idle_cpu_seconds"] = round(c1 - c0, 2)
        result["idle_window_s"] = round(w1 - w0, 1)
        result["idle_cpu_percent_of_core"] = round(100 * (c1 - c0) / (w1 - w0), 1)
        result["live_rss_mb"] = round(rss_mb(live.pid), 1)
        return result
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGINT)
                p.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)
        embedded.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated numbers of stored frames")
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--frames", type=int, default=120, help="frames measured for the twin latency (4/s)")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the temporary homes")
    args = parser.parse_args()

    import numpy as np

    from factory_assets.simulation.render import encode_jpeg, render_warehouse
    from factory_assets.simulation.datasets import random_stock, write_simulated_dataset
    from factory_assets.backends.local import LocalTrainer

    rng = np.random.default_rng(0)
    images = [encode_jpeg(render_warehouse(random_stock(rng), rng=rng)) for _ in range(64)]
    work = Path(tempfile.mkdtemp(prefix="bench-history-model-"))
    LocalTrainer().train(write_simulated_dataset(work / "dataset", 120, 24, seed=1), work / "model", seed=0)
    try:
        runs = [measure(int(s), images, work / "model", args) for s in args.sizes.split(",") if s.strip()]
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    first, last = runs[0], runs[-1]
    out = {
        "benchmark": "history_scale",
        "frame_jpeg_bytes_mean": round(sum(map(len, images)) / len(images)),
        "runs": runs,
        "poll_ratio_last_vs_first": round(last["idle_poll_ms"] / first["idle_poll_ms"], 2),
        "tick_ratio_last_vs_first": round(last["sensor_tick_ms"] / first["sensor_tick_ms"], 2),
        "targets": {"poll_and_tick_ratio_max": 1.5, "twin_p95_ms_max": 200, "idle_cpu_percent_max": 5},
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
