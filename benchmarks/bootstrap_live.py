"""`make run` from an empty database, measured on the real stack (not a replay).

Starts `factory-assets up` (embedded MongoDB, broker, simulated factory, ingester,
inference server, live updater, twin API and `dagster dev` with its sensors) in a
fresh FACTORY_HOME, lets it run for ``--minutes``, then reads MongoDB and prints JSON:

- time from the first stored frame to the first inference made by each deployed model
  version (its deployment, as the twin sees it);
- per model version, agreement of its inferences with the controller's own `f/i/stock`
  report on *stable* frames (no stock change reported from 2 s after the frame back to the
  settle time before it, ``FACTORY_SETTLE_S``, default 25 s: the crane may still move): exact
  (all three colours equal) and per slot where the inference carries slots.

    .venv/bin/python benchmarks/bootstrap_live.py [--minutes 12] [--seed 0]
    .venv/bin/python benchmarks/bootstrap_live.py --measure-uri mongodb://... (an existing run)
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STABLE_S = 2.0  # a change reported this soon after a frame makes it unstable too


def measure(fdb, settle_s: float | None = None) -> dict:
    from factory_assets.config import settle_seconds
    from factory_assets.vocabulary import STOCK_TOPIC, parse_ts, reported_presence, stock_slots

    settle_s = settle_seconds() if settle_s is None else settle_s

    first_frame = fdb.frames.find_one({}, {"received_at": 1, "ts": 1}, sort=[("seq", 1)])
    if first_frame is None:
        return {"error": "no frames stored"}
    t0 = parse_ts(first_frame["received_at"])
    reports = [(parse_ts(m["ts"]), stock_slots(m["payload"]))
               for m in fdb.mqtt.find({"topic": STOCK_TOPIC}, {"ts": 1, "payload": 1}).sort("ts", 1)]
    times = [t for t, _ in reports]
    changes = [t for i, (t, s) in enumerate(reports) if i and s != reports[i - 1][1]]
    versions: dict[str, dict] = {}
    for inf in fdb.inferences.find({}, {"frame_ts": 1, "present": 1, "model_version": 1, "slots": 1,
                                       "created_at": 1}).sort("frame_ts", 1):
        ts = parse_ts(inf["frame_ts"])
        made = parse_ts(inf["created_at"])
        v = versions.setdefault(inf["model_version"], {"deployed": made, "frames": 0, "stable": 0,
                                                       "exact": 0, "slot_readings": 0, "slots_right": 0})
        v["frames"] += 1
        v["deployed"] = min(v["deployed"], made)
        k = bisect.bisect_right(times, ts) - 1
        if k < 0:
            continue
        j = bisect.bisect_left(changes, ts - _td(max(settle_s, STABLE_S)))
        if j < len(changes) and changes[j] <= ts + _td(STABLE_S):
            continue  # the crane may still move (or is about to): not a stable frame
        slots = reports[k][1]
        v["stable"] += 1
        v["exact"] += int(reported_presence(slots) == {c: bool(p) for c, p in inf["present"].items()})
        for slot, seen in (inf.get("slots") or {}).items():
            v["slot_readings"] += 1
            v["slots_right"] += int((seen or {}).get("type") == slots.get(slot))
    out = []
    for version, v in sorted(versions.items(), key=lambda kv: kv[1]["deployed"]):
        out.append({"model_version": version,
                    "first_inference_s_after_first_frame": round((v["deployed"] - t0).total_seconds(), 1),
                    "inferences": v["frames"], "stable_frames": v["stable"],
                    "agreement_exact": round(v["exact"] / v["stable"], 4) if v["stable"] else None,
                    "per_slot_accuracy": round(v["slots_right"] / v["slot_readings"], 4)
                    if v["slot_readings"] else None})
    return {"frames": fdb.frames.estimated_document_count(), "stock_reports": len(reports), "settle_s": settle_s,
            "stock_changes": len(changes), "models": out,
            "time_to_first_model_s": out[0]["first_inference_s_after_first_frame"] if out else None}


def _td(seconds: float):
    from datetime import timedelta

    return timedelta(seconds=seconds)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=12.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure-uri", default=None, help="measure an existing database instead")
    parser.add_argument("--database", default="smart_factory")
    args = parser.parse_args()
    from factory_assets.storage.mongo import connect

    if args.measure_uri:
        print(json.dumps(measure(connect(args.measure_uri, args.database)), default=str))
        return 0
    root = Path(__file__).resolve().parents[1]
    home = Path(tempfile.mkdtemp(prefix="bootstrap-live-"))
    env = {**os.environ, "FACTORY_HOME": str(home)}
    env.pop("MONGODB_URI", None)
    cmd = [sys.executable, "-m", "factory_assets.cli", "up", "--keep-db", "--seed", str(args.seed),
           "--port", "3311", "--mqtt-port", "18911", "--serve-port", "18191"]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        time.sleep(args.minutes * 60)  # a benchmark's measurement window, not a test wait
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(120)
    from factory_assets.storage.embedded import EmbeddedMongo

    embedded = EmbeddedMongo(home)
    embedded.start()
    try:
        result = measure(connect(embedded.uri(), args.database))
    finally:
        embedded.stop()
    result["minutes"] = args.minutes
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
