"""Automation for the twin: new frames, live-twin visibility, model bootstrap."""
import json

import dagster as dg

from factory_assets.defs.models.resources import EndpointResource
from factory_assets.defs.resources import MongoResource
from factory_assets.defs.twin.assets import served_model_version, twin_metadata
from factory_assets.defs.twin.jobs import retrain_job, stock_inference_job

MAX_RUN_ATTEMPTS = 10


def run_key_for(instance, base: str) -> str | None:
    """``base`` unless a run with that key failed; then the next ``base:retryN``."""
    for attempt in range(MAX_RUN_ATTEMPTS):
        key = base if attempt == 0 else f"{base}:retry{attempt}"
        runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/run_key": key}), limit=1)
        if not runs or runs[0].status not in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED):
            return key
    return None


@dg.sensor(job=stock_inference_job, minimum_interval_seconds=5, default_status=dg.DefaultSensorStatus.RUNNING)
def new_frames_sensor(context: dg.SensorEvaluationContext, mongo: MongoResource, endpoint: EndpointResource):
    """Reacts to new frames in MongoDB ``factory_camera``. Cursor: the frame ``seq``
    (never skips a frame, even with concurrent ingesters). Frames the live updater
    already inferred are reported as ``stock_inferences`` events; frames nobody
    inferred get a run for their day, with a deterministic run key."""
    from factory_assets.twin.planning import plan_frames

    fdb = mongo.fdb()
    cursor = int(context.cursor or 0)
    version = served_model_version(fdb, endpoint.name)
    if version is None:
        return dg.SkipReason("No model deployed yet: frames wait for the first model.")
    plan = plan_frames(fdb, cursor, version)
    events = []
    by_day: dict[str, list] = {}
    for f in plan.inferred:
        by_day.setdefault(f["ts"].strftime("%Y-%m-%d"), []).append(f)
    for day, frames in sorted(by_day.items()):
        events.append(dg.AssetMaterialization(
            asset_key="stock_inferences", partition=day,
            metadata={"path": "live updater", "frames": len(frames), "model_version": version,
                      "first_seq": frames[0]["seq"], "last_seq": frames[-1]["seq"]}))
    run_requests = []
    for day, frames in sorted(plan.pending_by_day().items()):
        key = run_key_for(context.instance, f"infer:{version}:{day}:{frames[0]['seq']}")
        if key is None:
            context.log.error(f"{len(frames)} frames of {day} failed inference {MAX_RUN_ATTEMPTS} times")
            continue
        run_requests.append(dg.RunRequest(run_key=key, partition_key=day,
                                          tags={"factory/frames": str(len(frames))}))
    if not events and not run_requests:
        return dg.SensorResult(skip_reason=dg.SkipReason(
            f"No new frames to infer ({plan.waiting} just arrived, left to the live updater)."),
            cursor=str(plan.cursor))
    return dg.SensorResult(run_requests=run_requests, asset_events=events, cursor=str(plan.cursor))


@dg.sensor(minimum_interval_seconds=5, default_status=dg.DefaultSensorStatus.RUNNING,
           asset_selection=["twin_state"])
def twin_live_sensor(context: dg.SensorEvaluationContext, mongo: MongoResource):
    """Makes every change the live updater made to the twin visible in Dagster: one
    ``twin_state`` event per ``twin_history`` entry, with its provenance (frame, model,
    path). Cursor: the last twin version reported per factory."""
    fdb = mongo.fdb()
    cursor = json.loads(context.cursor) if context.cursor else {}
    events = []
    for factory_id in fdb.twin.distinct("_id"):
        last = int(cursor.get(str(factory_id), 0))
        for h in fdb.twin_history.find({"factory_id": factory_id, "version": {"$gt": last}}).sort("version", 1).limit(50):
            metadata = {"factory_id": str(factory_id), "version": h["version"], "kind": h["kind"],
                        "changed": ", ".join(h.get("changed", [])), "source": h.get("source", "controller"),
                        "delta": dg.MetadataValue.json(h.get("delta") or {})}
            if h["kind"] == "observed":
                metadata.update({"frame_id": str(h["frame_id"]), "frame_ts": str(h["frame_ts"]),
                                 "model_version": h["model_version"],
                                 "present": dg.MetadataValue.json(h["present"])})
            events.append(dg.AssetMaterialization(asset_key="twin_state", metadata=metadata))
            cursor[str(factory_id)] = h["version"]
    if events:
        twin = fdb.twin.find_one(sort=[("updated_at", -1)])
        last = events[-1]
        events[-1] = dg.AssetMaterialization(asset_key="twin_state",
                                             metadata={**last.metadata, **twin_metadata(twin)})
        return dg.SensorResult(asset_events=events, cursor=json.dumps(cursor))
    return dg.SensorResult(skip_reason=dg.SkipReason("The twin has not changed."), cursor=json.dumps(cursor))


DRIFT_WINDOW = 100           # latest inferences compared with the controller's stock reports
DRIFT_MAX_DISAGREEMENT = 0.2  # above this share, retrain on the newer labelled frames


def controller_disagreement(fdb, model_version: str, n: int = DRIFT_WINDOW) -> tuple[float, int]:
    """Share of the deployed model's latest ``n`` inferences whose presence differs
    from the stock the controller reported at that frame's time (and how many were compared)."""
    from bisect import bisect_right

    from factory_assets.twin.state import reported_presence, stock_slots

    recent = list(fdb.inferences.find({"model_version": model_version}, {"frame_ts": 1, "present": 1})
                  .sort("frame_ts", -1).limit(n))
    if not recent:
        return 0.0, 0
    lo, hi = recent[-1]["frame_ts"], recent[0]["frame_ts"]
    first = fdb.mqtt.find_one({"topic": "f/i/stock", "ts": {"$lte": lo}}, sort=[("ts", -1)])
    reports = ([first] if first else []) + list(fdb.mqtt.find({"topic": "f/i/stock", "ts": {"$gt": lo, "$lte": hi}})
                                                 .sort("ts", 1))
    times = [r["ts"] for r in reports]
    compared = differing = 0
    for inf in recent:
        i = bisect_right(times, inf["frame_ts"]) - 1
        if i < 0:
            continue
        compared += 1
        differing += reported_presence(stock_slots(reports[i]["payload"])) != inf["present"]
    return (differing / compared if compared else 0.0), compared


@dg.sensor(job=retrain_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def bootstrap_model_sensor(context: dg.SensorEvaluationContext, mongo: MongoResource, endpoint: EndpointResource):
    """Keeps a model on the endpoint with no clicks. On a fresh start (no model), once the
    factory has reported enough different stock situations - every colour seen both in
    stock and absent - and the camera delivered enough frames, it trains the first model
    from automatic labels and deploys it. Afterwards, when the deployed model disagrees
    with the controller's stock reports on more than 20% of its latest 100 frames (the
    stock moved into situations it never saw), it retrains on the newer labelled frames.
    A new run key every 300 frames, so a model that fails its checks is retried with more data."""
    from datetime import datetime, timezone

    from factory_assets.twin.state import reported_presence, stock_slots

    fdb = mongo.fdb()
    active = context.instance.get_runs(filters=dg.RunsFilter(job_name=retrain_job.name, statuses=[
        dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]), limit=1)
    if active:
        return dg.SkipReason("A retraining run is in progress.")
    frames = fdb.frames.estimated_document_count()
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    deployed = served_model_version(fdb, endpoint.name)
    if deployed:
        share, compared = controller_disagreement(fdb, deployed)
        if compared < DRIFT_WINDOW or share <= DRIFT_MAX_DISAGREEMENT:
            return dg.SkipReason(f"Model {deployed} is deployed; it disagrees with the controller on "
                                 f"{share:.0%} of its latest {compared} frames.")
        return dg.RunRequest(run_key=f"drift:{deployed}:{frames // 300}", partition_key=today,
                             tags={"factory/reason": f"disagrees with the controller on {share:.0%}"})
    combos, seen = set(), {c: set() for c in ("blue", "red", "white")}
    for msg in fdb.mqtt.find({"topic": "f/i/stock"}, {"payload.stockItems": 1}).sort("ts", -1).limit(500):
        present = reported_presence(stock_slots(msg.get("payload")))
        combos.add(tuple(sorted(c for c, v in present.items() if v)))
        for c, v in present.items():
            seen[c].add(v)
    both = sum(len(v) == 2 for v in seen.values())
    if frames < 120 or len(combos) < 4 or both < 3:
        return dg.SkipReason(f"Waiting for data: {frames} frames, {len(combos)} distinct stock situations, "
                             f"{both} of 3 colours seen both in stock and absent (need 120, 4 and 3).")
    return dg.RunRequest(run_key=f"bootstrap:{frames // 300}", partition_key=today)
