"""Ingest benchmark: MQTT publish -> stored frame document, against the database's own rate.

Starts a real broker (Mosquitto when installed, configured as ``up`` does), the real
``factory-assets ingest mqtt`` process and (unless MONGODB_URI is set) an embedded SecantusDB
in a temporary home. In the same run, on the same server:

1. **baseline**: the database's own journaled insert rate for the same frames: one pymongo
   client inserting complete frame documents (``build_frame``, ``seq`` set) in batches of 64
   with ``j=True`` into a collection with the frame indexes (``storage.indexes``), nothing else.
   Measured before the ingester phases and again after them; the mean is the reference.
   The same inserts into a collection with only ``_id`` are reported beside it (SecantusDB
   spends about three quarters of a frame's insert on the six frame indexes).
2. **burst**: after 20 frames of warm-up (imports, connections), N frames published as fast
   as the broker takes them (QoS 1 by default: the ingester acknowledges each after it is
   stored; ``--qos 0`` as the controller publishes), timed from the first publish until the
   sequence's horizon shows them all stored and readable. Meanwhile only the sequence's
   counter document is polled (every 20 ms, from 60 % of the time the database took for them).
3. **steady**: a camera-like rate, for the publish-to-readable latency (a reader follows the
   seq cursor and fetches each frame).

Prints one JSON object: frames/s, ``ratio_to_database`` (burst rate / baseline rate), the
latencies, the ingester's peak RSS, the image and payload sizes, and the load average at the
start and end (this machine is shared: figures taken under load are not comparable).

    .venv/bin/python benchmarks/ingest.py [--frames 1000] [--profile ingester.txt]

``--profile FILE`` records the ingester during the burst with py-spy (``pip install py-spy``;
``.svg`` a flame graph, ``.json`` speedscope, anything else collapsed stacks, one per line).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

BATCH = 64  # the ingester's default --batch-size, and the baseline's batches


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds a process has used so far."""
    if not pid:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def database_rate(client, database: str, images: list[bytes], n: int, t0: datetime,
                  db_pid: int | None = None, indexes: bool = True) -> tuple[float, float | None]:
    """Journaled inserts of ``n`` complete frame documents in batches of 64, one client: frames/s,
    and the database process's CPU milliseconds per frame. ``indexes``: the frame collection's
    (else ``_id`` only)."""
    from pymongo.write_concern import WriteConcern

    from factory_assets.storage.frames import build_frame
    from factory_assets.storage.indexes import ensure_indexes
    from factory_assets.storage.mongo import CollectionNames, FactoryDB

    fdb = FactoryDB(client[database], CollectionNames.from_env())
    if indexes:
        ensure_indexes(fdb)  # the frame indexes the ingester writes through
    frames = fdb.db.get_collection(fdb.names.frames, write_concern=WriteConcern(w=1, j=True))
    start_seq = (frames.estimated_document_count() or 0) + 1
    docs = []
    for i in range(n):
        doc = build_frame(images[i % len(images)], ts=t0 + timedelta(milliseconds=i), camera_id="txt-cam",
                          factory_id="factory-1", content_type="image/jpeg", width=320, height=240,
                          source={"kind": "mqtt", "topic": "i/cam", "broker": "127.0.0.1:1883"})
        doc["seq"] = start_seq + i
        docs.append(doc)
    cpu0 = cpu_seconds(db_pid)
    start = time.perf_counter()
    for i in range(0, n, BATCH):
        frames.insert_many(docs[i:i + BATCH], ordered=False)
    rate = n / (time.perf_counter() - start)
    cpu = cpu_seconds(db_pid)
    return rate, (round((cpu - cpu0) * 1000 / n, 3) if cpu is not None and cpu0 is not None else None)


def broker_process_pid(broker) -> int | None:
    """Mosquitto's pid (the broker wrapper runs it as its child)."""
    proc = getattr(broker, "_proc", None) or getattr(broker, "proc", None)
    if proc is None:
        return None
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    except OSError:
        return proc.pid
    return int(children[0]) if children else proc.pid


def start_profile(pid: int, path: str) -> subprocess.Popen | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy is not installed (pip install py-spy): no profile", file=sys.stderr)
        return None
    fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(Path(path).suffix, "raw")
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "200", "--threads", "--nonblocking",
                             "--format", fmt, "--output", path], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=1000, help="burst: published as fast as the broker takes them")
    parser.add_argument("--steady-frames", type=int, default=300)
    parser.add_argument("--steady-rate", type=float, default=25.0, help="steady phase frames per second")
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1,
                        help="QoS of the published frames (1: the ingester acknowledges each once stored; "
                             "0: as the TXT controller publishes i/cam)")
    parser.add_argument("--jpeg-quality", type=int, default=93, help="JPEG quality of the 320x240 test frames "
                                                                     "(93: about 35 KB each)")
    parser.add_argument("--batch-size", type=int, default=None, help="the ingester's --batch-size (default: its own)")
    parser.add_argument("--profile", default=None, metavar="FILE", help="py-spy the ingester during the burst")
    parser.add_argument("--profile-db", default=None, metavar="FILE",
                        help="py-spy the embedded SecantusDB during the burst")
    args = parser.parse_args()

    import numpy as np
    import paho.mqtt.client as mqtt

    from factory_assets.simulation.broker import start_broker
    from factory_assets.storage.embedded import EmbeddedMongo
    from factory_assets.storage.frames import read_frames_after
    from factory_assets.storage.mongo import connect
    from factory_assets_tests.helpers import cam_payload, jpeg_bytes

    load_start = load_average()
    home = tempfile.mkdtemp(prefix="bench-ingest-")
    embedded = db_pid = None
    database = f"bench_{int(time.time())}"
    env = dict(os.environ, MONGODB_DATABASE=database)
    if not env.get("MONGODB_URI"):
        embedded = EmbeddedMongo(Path(home))
        status = embedded.start(port=0)
        env["MONGODB_URI"], db_pid = status.uri, status.pid
    os.environ.update({"MONGODB_URI": env["MONGODB_URI"], "MONGODB_DATABASE": env["MONGODB_DATABASE"]})
    fdb = connect()
    client_db = fdb.db.client
    images = [jpeg_bytes(seed=i, quality=args.jpeg_quality) for i in range(50)]
    baseline = [database_rate(client_db, database + "_raw", images, args.frames,
                              datetime(2025, 1, 1, tzinfo=timezone.utc), db_pid)]
    plain = [database_rate(client_db, database + "_plain", images, args.frames,
                           datetime(2025, 1, 1, tzinfo=timezone.utc), db_pid, indexes=False)]
    broker = start_broker()
    broker_pid = broker_process_pid(broker)
    argv = [sys.executable, "-m", "factory_assets.cli", "ingest", "mqtt", "--url", broker.url,
            "--progress-every", "0", "--camera-fps", "0"]
    if args.batch_size:
        argv += ["--batch-size", str(args.batch_size)]
    ingester = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    profilers = []
    summary: dict = {}

    def drain() -> None:
        for line in ingester.stdout:
            if line.startswith("summary: "):
                summary.update(json.loads(line[len("summary: "):]))

    try:
        for line in ingester.stdout:  # connected and subscribed: nothing published from now on is missed
            if "MQTT subscribed" in line:
                break
        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        client.max_inflight_messages_set(100)
        client.connect(broker.host, broker.port)
        client.loop_start()
        cursor = [0]

        def payloads_for(n: int, t0: datetime) -> list[tuple[str, bytes]]:
            out = []
            for i in range(n):
                ts = (t0 + timedelta(milliseconds=i)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
                out.append((ts, cam_payload(images[i % len(images)], ts)))
            return out

        def burst_phase(n: int, t0: datetime) -> dict:
            """Publish n frames as fast as the broker takes them; time until all are readable. Only the
            sequence's counter is polled meanwhile (one small document): a reader fetching the frames
            would take the database's time from the ingester's writes."""
            from factory_assets.storage.frames import FrameSequence

            payloads = payloads_for(n, t0)
            sequence = FrameSequence(fdb)
            target = sequence.horizon() + n  # one number per frame: none of these is a duplicate
            pids = {"ingester": ingester.pid, "database": db_pid, "broker": broker_pid, "benchmark": os.getpid()}
            cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
            start = time.perf_counter()
            infos = [client.publish("i/cam", payload, qos=args.qos) for _, payload in payloads]
            # the database's own time for n frames first, then a look every 20 ms (each look is a query
            # the database answers instead of inserting; the rate is under-, never over-estimated)
            time.sleep(max(0.0, n / baseline[0][0] * 0.6 - (time.perf_counter() - start)))
            deadline = time.monotonic() + 300
            while sequence.horizon() < target and time.monotonic() < deadline:
                time.sleep(0.02)
            end = time.perf_counter()
            cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
            for info in infos:
                info.wait_for_publish(60)
            stored = fdb.frames.count_documents({"ts": {"$gte": t0, "$lt": t0 + timedelta(days=1)}})
            cursor[0] = sequence.horizon()
            return {"frames": n, "stored": stored, "lost": n - stored, "seconds": round(end - start, 3),
                    "frames_per_second": round(stored / (end - start), 1),
                    # CPU per frame of each process (the benchmark's: publishing and polling)
                    "cpu_ms_per_frame": {name: round((cpu[name] - cpu0[name]) * 1000 / n, 3) for name in pids
                                         if cpu[name] is not None and cpu0[name] is not None}}

        def phase(n: int, rate: float, t0: datetime) -> dict:
            """Publish n frames at ``rate`` per second; time each from its publication to readable."""
            payloads = payloads_for(n, t0)
            published: dict[str, float] = {}
            stored: dict[str, float] = {}

            def reader():
                deadline = time.monotonic() + 300
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
            for i, (ts, payload) in enumerate(payloads):
                time.sleep(max(0.0, start + i / rate - time.perf_counter()))
                published[ts] = time.perf_counter()
                infos.append(client.publish("i/cam", payload, qos=args.qos))
            for info in infos:
                info.wait_for_publish(60)
            r.join(timeout=310)
            end = max(stored.values()) if stored else time.perf_counter()
            lat = np.array([(stored[k] - published[k]) * 1000 for k in published if k in stored])
            return {"frames": n, "stored": len(stored), "lost": n - len(stored),
                    "frames_per_second": round(len(stored) / (end - start), 1),
                    "latency_ms_p50": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
                    "latency_ms_p95": round(float(np.percentile(lat, 95)), 1) if len(lat) else None}

        burst_phase(20, datetime(2025, 12, 31, tzinfo=timezone.utc))  # warm-up: imports, connections, caches
        profilers = [start_profile(pid, path) for pid, path in ((ingester.pid, args.profile),
                                                                 (db_pid, args.profile_db)) if pid and path]
        burst = burst_phase(args.frames, datetime(2026, 1, 1, tzinfo=timezone.utc))
        for profiler in filter(None, profilers):
            profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            profiler.wait(60)
        steady = phase(args.steady_frames, args.steady_rate, datetime(2026, 1, 2, tzinfo=timezone.utc))
        baseline.append(database_rate(client_db, database + "_raw", images, args.frames,
                                      datetime(2025, 1, 2, tzinfo=timezone.utc), db_pid))
        plain.append(database_rate(client_db, database + "_plain", images, args.frames,
                                   datetime(2025, 1, 2, tzinfo=timezone.utc), db_pid, indexes=False))
        reference = sum(rate for rate, _ in baseline) / len(baseline)
        plain_rate = sum(rate for rate, _ in plain) / len(plain)
        result = {
            "benchmark": "ingest_mqtt_to_mongodb",
            "database_frames_per_second": round(reference, 1),
            "database_runs": [round(rate, 1) for rate, _ in baseline],
            "database_cpu_ms_per_frame": [cpu for _, cpu in baseline],
            # the same inserts into a collection with no index but _id (not what the ingester writes through)
            "database_id_only_frames_per_second": round(plain_rate, 1),
            "database_id_only_cpu_ms_per_frame": [cpu for _, cpu in plain],
            "burst": {**burst, "qos": args.qos},
            "steady": {**steady, "rate_per_second": args.steady_rate},
            "frames_per_second": burst["frames_per_second"],
            "ratio_to_database": round(burst["frames_per_second"] / reference, 2),
            "ratio_to_database_id_only": round(burst["frames_per_second"] / plain_rate, 2),
            "latency_ms_p50": steady["latency_ms_p50"],
            "latency_ms_p95": steady["latency_ms_p95"],
            "frames_lost": burst["lost"] + steady["lost"],
            "ingester_peak_rss_mb": peak_rss_mb(ingester.pid),
            "jpeg_bytes_mean": round(sum(map(len, images)) / len(images)),
            "payload_bytes_mean": round(sum(len(cam_payload(im)) for im in images) / len(images)),
            "mongodb": "embedded SecantusDB" if embedded else "MONGODB_URI",
            "broker": broker.kind,
            "cpu_count": os.cpu_count(),
            "load_average_start": load_start,
            "load_average_end": load_average(),
        }
        client.loop_stop()
        ingester.terminate()
        ingester.wait(30)
        drainer.join(10)
        if summary.get("frame_batches"):
            result["ingester_frames_per_batch"] = round(summary["frames"] / summary["frame_batches"], 1)
    finally:
        for profiler in filter(None, profilers):
            if profiler.poll() is None:
                profiler.kill()
        ingester.terminate()
        ingester.wait(30)
        broker.stop()
        client_db.drop_database(database)
        client_db.drop_database(database + "_raw")
        client_db.drop_database(database + "_plain")
        if embedded:
            embedded.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
