"""`make run` from an empty database, measured on the real stack (not a replay).

Starts `factory-assets up` (embedded MongoDB, broker, simulated factory, ingester,
inference server, live updater, twin API and `dagster dev` with its sensors) in a
fresh FACTORY_HOME, lets it run for ``--minutes``, then reads MongoDB and prints JSON:

- time from the first stored frame to the first inference made by each deployed model
  version (its deployment, as the twin sees it), and its kind (per-slot or presence);
- per model version, agreement of its inferences with the controller's own `f/i/stock`
  report on *stable* frames (no stock change of its factory reported from 2 s after the frame
  back to the settle time before it, ``FACTORY_SETTLE_S``, default 25 s: the crane may still
  move; the first report counts as a change): exact
  (all three colours equal) and per slot where the inference carries slots.

The simulator runs at the rates ``up`` gives it (``cli/up.py``: ``SIMULATOR_CHANGE_EVERY_S``,
``SIMULATOR_TIME_SCALE``). Prints the load average at the end: the machine is shared.

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
    reports: dict = {}  # per factory: (ts, slots) in time order
    for m in fdb.mqtt.find({"topic": STOCK_TOPIC}, {"ts": 1, "payload": 1, "factory_id": 1}).sort("ts", 1):
        reports.setdefault(m.get("factory_id"), []).append((parse_ts(m["ts"]), stock_slots(m["payload"])))
    times = {f: [t for t, _ in r] for f, r in reports.items()}
    # the first report counts as a change, as for auto-labels (what came before is unknown)
    changes = {f: [t for i, (t, s) in enumerate(r) if not i or s != r[i - 1][1]] for f, r in reports.items()}
    versions: dict[str, dict] = {}
    for inf in fdb.inferences.find({}, {"frame_ts": 1, "present": 1, "model_version": 1, "slots": 1,
                                       "created_at": 1, "factory_id": 1, "model_kind": 1}).sort("frame_ts", 1):
        ts = parse_ts(inf["frame_ts"])
        made = parse_ts(inf["created_at"])
        v = versions.setdefault(inf["model_version"], {"deployed": made, "frames": 0, "stable": 0,
                                                       "exact": 0, "slot_readings": 0, "slots_right": 0,
                                                       "kind": inf.get("model_kind") or "presence"})
        v["frames"] += 1
        v["deployed"] = min(v["deployed"], made)
        factory = inf.get("factory_id")
        k = bisect.bisect_right(times.get(factory, []), ts) - 1
        if k < 0:
            continue
        ch = changes[factory]
        j = bisect.bisect_left(ch, ts - _td(max(settle_s, STABLE_S)))
        if j < len(ch) and ch[j] <= ts + _td(STABLE_S):
            continue  # the crane may still move (or is about to): not a stable frame
        slots = reports[factory][k][1]
        v["stable"] += 1
        v["exact"] += int(reported_presence(slots) == {c: bool(p) for c, p in inf["present"].items()})
        for slot, seen in (inf.get("slots") or {}).items():
            v["slot_readings"] += 1
            v["slots_right"] += int((seen or {}).get("type") == slots.get(slot))
    out = []
    for version, v in sorted(versions.items(), key=lambda kv: kv[1]["deployed"]):
        out.append({"model_version": version, "kind": v["kind"],
                    "first_inference_s_after_first_frame": round((v["deployed"] - t0).total_seconds(), 1),
                    "inferences": v["frames"], "stable_frames": v["stable"],
                    "agreement_exact": round(v["exact"] / v["stable"], 4) if v["stable"] else None,
                    "per_slot_accuracy": round(v["slots_right"] / v["slot_readings"], 4)
                    if v["slot_readings"] else None})
    return {"frames": fdb.frames.estimated_document_count(), "settle_s": settle_s, "first_frame_at": t0.timestamp(),
            "stock_reports": sum(len(r) for r in reports.values()),
            "stock_changes": sum(len(c) - 1 for c in changes.values()), "models": out,
            "time_to_first_model_s": out[0]["first_inference_s_after_first_frame"] if out else None}


def retrain_runs(dagster_home: Path) -> list:
    """The stack's retraining runs (bootstrap and drift): key, reason, status, start and end."""
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(dagster_home))
    try:
        runs = instance.get_runs(filters=dg.RunsFilter(job_name="retrain_job"))
        out = []
        for run in sorted(runs, key=lambda r: r.run_id):
            record = instance.get_run_record_by_id(run.run_id)
            out.append({"run_key": run.tags.get("dagster/run_key"), "reason": run.tags.get("factory/reason"),
                        "status": run.status.value,
                        "start": record.start_time, "end": record.end_time,
                        "seconds": round(record.end_time - record.start_time, 1)
                        if record.start_time and record.end_time else None})
        return sorted(out, key=lambda r: r["start"] or 0)
    finally:
        instance.dispose()


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
    result["retrain_runs"] = retrain_runs(home / "dagster_home")
    for run in result["retrain_runs"]:  # when each run started and ended, after the first frame
        for k in ("start", "end"):
            if run[k] and result.get("first_frame_at"):
                run[f"{k}_s_after_first_frame"] = round(run[k] - result["first_frame_at"], 1)
    result["minutes"] = args.minutes
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
