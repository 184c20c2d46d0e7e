"""Automation for the twin: new frames, live-twin visibility, model bootstrap and drift.

The event log stays readable: what the live path did is reported as one aggregated
event per interval (``REPORT_INTERVAL``), not one per sensor tick, and without the full
PNG of the twin (only its small inline picture, under 1 KB).
"""
import json
from datetime import datetime, timedelta, timezone

import dagster as dg

from factory_assets.defs.metadata import json_value
from factory_assets.defs.models.resources import EndpointResource
from factory_assets.defs.partitions import FIRST_DAY, within_partitions
from factory_assets.defs.pools import factory_tags
from factory_assets.defs.resources import MongoResource
from factory_assets.defs.twin.jobs import retrain_job, stock_inference_job
from factory_assets.defs.twin.picture import twin_markdown

MAX_RUN_ATTEMPTS = 10
BOOTSTRAP_INTERVAL_S = 15  # bootstrap and drift look this often (each look: a few index ranges)
REPORT_INTERVAL = timedelta(minutes=10)


class RetrainWindow(dg.ConfigurableResource):
    """How many recent UTC days a drift or bootstrap retraining uses (today included)."""

    days: int = 7


def run_key_for(instance, base: str) -> str | None:
    """``base`` unless a run with that key failed; then the next ``base:retryN``."""
    for attempt in range(MAX_RUN_ATTEMPTS):
        key = base if attempt == 0 else f"{base}:retry{attempt}"
        runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/run_key": key}), limit=1)
        if not runs or runs[0].status not in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED):
            return key
    return None


def _bucket(ts: datetime) -> datetime:
    ts = ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    return epoch + ((ts - epoch) // REPORT_INTERVAL) * REPORT_INTERVAL


def load_frames_cursor(text: str | None) -> dict:
    """``{"seq": int, "live": {day: {frames, first_seq, last_seq, first_ts}}}``; an old integer cursor is its seq."""
    if not text:
        return {"seq": 0, "live": {}}
    value = json.loads(text)
    return {"seq": int(value), "live": {}} if isinstance(value, int) else value


@dg.sensor(job=stock_inference_job, minimum_interval_seconds=5, default_status=dg.DefaultSensorStatus.RUNNING)
def new_frames_sensor(context: dg.SensorEvaluationContext, mongo: MongoResource, endpoint: EndpointResource):
    """Reacts to new frames in MongoDB ``factory_camera``. Cursor: the frame ``seq``
    (never skips a frame, even with concurrent ingesters). Frames nobody inferred get a
    ``stock_inferences`` run for their day, with a deterministic run key (which counts
    the failed attempts of its first frame, so a frame that keeps failing gets a new run
    until it is quarantined). Frames the live updater inferred are reported as one
    ``stock_inferences`` event per day and ``REPORT_INTERVAL``."""
    from factory_assets.vocabulary.clock import day_key, utcnow
    from factory_assets.storage.frames import frame_ts
    from factory_assets.storage.models import served_version
    from factory_assets.twin.batch import failed_attempts
    from factory_assets.twin.planning import plan_frames

    fdb = mongo.fdb()
    cursor = load_frames_cursor(context.cursor)
    version = served_version(fdb, endpoint.name)
    if version is None:
        return dg.SkipReason("No model deployed yet: frames wait for the first model.")
    plan = plan_frames(fdb, cursor["seq"], version)
    live = cursor["live"]
    for f in plan.inferred:
        day = day_key(frame_ts(f))
        agg = live.setdefault(day, {"frames": 0, "first_seq": f["seq"], "first_ts": frame_ts(f).isoformat()})
        agg["frames"] += 1
        agg["last_seq"] = f["seq"]
    now = utcnow()
    events = []
    for day in sorted(live):
        agg = live[day]
        if now - datetime.fromisoformat(agg["first_ts"]) >= REPORT_INTERVAL or day < day_key(now):
            events.append(dg.AssetMaterialization(
                asset_key="stock_inferences", partition=day,
                metadata={"path": "live updater", "frames": agg["frames"], "model_version": version,
                          "first_seq": agg["first_seq"], "last_seq": agg["last_seq"]}))
            del live[day]
    run_requests = []
    for day, frames in sorted(plan.pending_by_day().items()):
        attempts = failed_attempts(fdb, frames[0]["_id"], version)
        base = f"infer:{version}:{day}:{frames[0]['seq']}" + (f":attempt{attempts + 1}" if attempts else "")
        key = run_key_for(context.instance, base)
        if key is None:
            context.log.error(f"{len(frames)} frames of {day}: {MAX_RUN_ATTEMPTS} runs failed")
            continue
        factories = fdb.frames.distinct("factory_id", {"_id": {"$in": [f["_id"] for f in frames]}})
        run_requests.append(dg.RunRequest(run_key=key, partition_key=day, tags={"factory/frames": str(len(frames)),
                                                                                 **factory_tags(factories)}))
    new_cursor = json.dumps({"seq": plan.cursor, "live": live})
    if not events and not run_requests:
        return dg.SensorResult(skip_reason=dg.SkipReason(
            f"No frames to infer ({plan.waiting} just arrived, left to the live updater)."), cursor=new_cursor)
    return dg.SensorResult(run_requests=run_requests, asset_events=events, cursor=new_cursor)


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           asset_selection=["twin_state"])
def twin_live_sensor(context: dg.SensorEvaluationContext, mongo: MongoResource):
    """Makes the live updater's changes to the twin visible in Dagster: one ``twin_state``
    event per factory and ended ``REPORT_INTERVAL`` that had changes (``twin_history``),
    with the number of changes, the version range and the last observation's provenance
    (frame, frame time, model); a factory's newest event of a tick also carries ``twin``,
    the small inline picture of the twin as it is when reported (the full PNG is left to
    ``twin_state`` runs). Cursor: the last twin version reported per factory."""
    from factory_assets.vocabulary.clock import utcnow

    fdb = mongo.fdb()
    cursor = json.loads(context.cursor) if context.cursor else {}
    closed_before = _bucket(utcnow())  # only intervals that have ended
    events = []
    for factory_id in sorted(fdb.twin.distinct("_id"), key=str):
        last = int(cursor.get(str(factory_id), 0))
        history = fdb.twin_history.find({"factory_id": factory_id, "version": {"$gt": last}}
                                        ).sort("version", 1).limit(5000)
        buckets: dict = {}
        for h in history:
            # In version order, up to the first change of an open interval: a writer that took its
            # ``at`` early and won its swap late holds a higher version with an earlier ``at``, and
            # filtering on ``at`` would move the cursor past the version of an open interval.
            if h["at"] >= closed_before:
                break
            buckets.setdefault(_bucket(h["at"]), []).append(h)
        for start, entries in sorted(buckets.items()):
            observed = [h for h in entries if h["kind"] == "observed"]
            metadata = {}
            if start == max(buckets):  # the asset page shows the latest event's metadata: a picture there
                metadata["twin"] = dg.MetadataValue.md(twin_markdown(fdb.twin.find_one({"_id": factory_id})))
            metadata |= {"factory_id": str(factory_id),
                        "interval_start": dg.MetadataValue.timestamp(start),
                        "interval_minutes": int(REPORT_INTERVAL.total_seconds() // 60),
                        "changes": len(entries), "observed_changes": len(observed),
                        "reported_changes": len(entries) - len(observed),
                        "first_version": entries[0]["version"], "last_version": entries[-1]["version"],
                        "delta": json_value(entries[-1].get("delta") or {})}
            if observed:
                h = observed[-1]
                metadata.update({"frame_id": str(h["frame_id"]), "frame_ts": dg.MetadataValue.timestamp(h["frame_ts"]),
                                 "model_version": h["model_version"], "source": h.get("source", "live"),
                                 "present": json_value(h["present"])})
            events.append(dg.AssetMaterialization(asset_key="twin_state", metadata=metadata))
            cursor[str(factory_id)] = entries[-1]["version"]
    if events:
        return dg.SensorResult(asset_events=events, cursor=json.dumps(cursor))
    return dg.SensorResult(skip_reason=dg.SkipReason("No ended interval with twin changes."),
                           cursor=json.dumps(cursor))


def _range_request(run_key: str, days: list[str], reason: str) -> dg.RunRequest:
    return dg.RunRequest(run_key=run_key, tags={"dagster/asset_partition_range_start": days[0],
                                                "dagster/asset_partition_range_end": days[-1],
                                                "factory/reason": reason})


@dg.sensor(job=retrain_job, minimum_interval_seconds=BOOTSTRAP_INTERVAL_S,
           default_status=dg.DefaultSensorStatus.RUNNING)
def bootstrap_model_sensor(context: dg.SensorEvaluationContext, mongo: MongoResource, endpoint: EndpointResource,
                           retrain_window: RetrainWindow):
    """Keeps a model on the endpoint with no clicks. On a fresh start (no model), once the
    frames auto-labels would label can train a model worth deploying (``twin.drift.Readiness``:
    train situations whose changed slots span two rows and two columns, so the per-slot model
    can place the rack, or every colour seen both in stock and absent; validation frames to
    check it on), it trains the first model from automatic labels and deploys it. Afterwards,
    when the deployed model disagrees with the controller's stock reports on more than 20% of
    its latest 100 stable frames, it retrains. Both use the last ``retrain_window.days`` days (one run over that partition
    range). A new run key every 300 frames, so a model that fails its checks is retried
    with more data."""
    from factory_assets.vocabulary.clock import recent_days
    from factory_assets.storage.models import served_version
    from factory_assets.twin.drift import bootstrap_readiness, controller_disagreement

    fdb = mongo.fdb()
    active = context.instance.get_runs(filters=dg.RunsFilter(job_name=retrain_job.name, statuses=[
        dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]), limit=1)
    if active:
        return dg.SkipReason("A retraining run is in progress.")
    # never before the first partition day (FACTORY_PARTITIONS_START): such a range could not run
    days = within_partitions(recent_days(retrain_window.days))
    if not days:
        return dg.SkipReason(f"No partition day in the last {retrain_window.days} days: the partitions start "
                             f"{FIRST_DAY} (FACTORY_PARTITIONS_START).")
    frames = fdb.frames.estimated_document_count()
    deployed = served_version(fdb, endpoint.name)
    if deployed:
        drift = controller_disagreement(fdb, deployed)
        if not drift.drifted:
            return dg.SkipReason(f"Model {deployed} is deployed; it disagrees with the controller on "
                                 f"{drift.share:.0%} of {_what(drift)}.")
        return _range_request(f"drift:{deployed}:{frames // 300}", days,
                              f"disagrees with the controller on {drift.share:.0%} of {_what(drift)}")
    readiness = bootstrap_readiness(fdb)
    if not readiness.ready:
        return dg.SkipReason(f"Waiting for data: {readiness.describe()}.")
    return _range_request(f"bootstrap:{frames // 300}", days,
                          f"no model deployed yet; a {readiness.model} model can be trained from "
                          f"{readiness.train_frames} frames (slots that changed: {', '.join(readiness.slots_varied)})")


def _what(drift) -> str:
    """What the drift share counts: slot readings (per-slot model) or frames (presence model)."""
    if drift.basis == "slots":
        return f"the slot readings of its latest stable frames ({drift.compared} compared)"
    return f"its latest {drift.compared} frames"
