"""Automation for the twin: new frames, live-twin visibility, model bootstrap and drift.

The event log stays readable: what the live path did is reported as one aggregated
event per interval (``REPORT_INTERVAL``), not one per sensor tick, and without the full
PNG of the twin (only its small inline picture, under 1 KB).
"""
import json
from datetime import datetime, timedelta, timezone

import dagster as dg

from factory_assets.defs.datasets.assets import CAMERAS_TAG
from factory_assets.defs.metadata import json_value
from factory_assets.defs.models.resources import EndpointResource
from factory_assets.defs.partitions import FIRST_DAY, factory_day_range_tags, within_partitions
from factory_assets.defs.pools import FACTORY_TAG, FLEET
from factory_assets.defs.resources import MongoResource
from factory_assets.defs.twin.jobs import model_job, retrain_job, stock_inference_job
from factory_assets.defs.twin.picture import twin_markdown

MAX_RUN_ATTEMPTS = 10
BOOTSTRAP_INTERVAL_S = 15  # bootstrap and drift look this often (each look: a few index ranges)
REPORT_INTERVAL = timedelta(minutes=10)
LOOKED_AT = "@looked_at"  # twin_live_sensor's cursor: when it last looked (no factory id holds "@")


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
    """``{"seq": int, "live": {"<day>|<factory>": {frames, first_seq, last_seq, first_ts, model_version}},
    "owed": {"<factory>|<camera>": first day}}``; an old integer cursor is its seq."""
    cursor: dict = {"seq": 0, "live": {}, "owed": {}}
    if text:
        value = json.loads(text)
        cursor.update({"seq": int(value)} if isinstance(value, int) else value)
    cursor["live"] = {k: v for k, v in cursor["live"].items() if "|" in k}  # days before factories were partitions
    cursor.setdefault("owed", {})
    return cursor


@dg.sensor(job=stock_inference_job, minimum_interval_seconds=5, default_status=dg.DefaultSensorStatus.RUNNING)
def new_frames_sensor(context: dg.SensorEvaluationContext, mongo: MongoResource, endpoint: EndpointResource):
    """Reacts to new frames in MongoDB ``factory_camera``, each with its own factory's model.
    Cursor: the frame ``seq`` (never skips a frame, even with concurrent ingesters). Frames
    nobody inferred get a ``stock_inferences`` run for their factory's day (partition
    ``<day>|<factory>``, tag ``factory``), with a deterministic run key (which counts the failed
    attempts of its first frame, so a frame that keeps failing gets a new run until it is
    quarantined). Frames of a factory or camera with no model yet do not hold the cursor: the
    first day they were seen is kept (``owed``) and, once that camera's model is deployed, its
    factory's days from then are requested. Frames the live updater inferred are reported as one
    ``stock_inferences`` event per factory's day and ``REPORT_INTERVAL``. Cost: a page of the frames
    that arrived, their inferences, and the deployments of their factories (one query), however
    many factories are registered."""
    from factory_assets.defs.fleet import unregistered, valid_factory_id
    from factory_assets.defs.partitions import factory_day_key, factory_partitions
    from factory_assets.storage.frames import frame_ts
    from factory_assets.storage.models import served_version
    from factory_assets.twin.batch import failed_attempts
    from factory_assets.twin.live import ModelRouter, frame_owner
    from factory_assets.twin.planning import plan_frames
    from factory_assets.vocabulary.clock import day_key, day_range, utcnow

    fdb = mongo.fdb()
    cursor = load_frames_cursor(context.cursor)
    router = ModelRouter(fdb, endpoint.name)
    if not router.per_factory and served_version(fdb, endpoint.name) is None:
        return dg.SkipReason("No model deployed yet: frames wait for the first model.")

    def version_of(frame: dict) -> str | None:
        factory_id, camera_id = frame_owner(frame)
        choice = router.choice(factory_id, camera_id) if valid_factory_id(factory_id) else None
        return choice.version if choice is not None else None

    plan = plan_frames(fdb, cursor["seq"], version_of,
                       prepare=lambda frames: router.prepare({frame_owner(f)[0] for f in frames}))
    owed = cursor["owed"]
    for f in plan.unmodelled:
        key = "|".join(frame_owner(f))
        owed[key] = min(owed.get(key, "9999-99-99"), day_key(frame_ts(f)))
    live = cursor["live"]
    for f in plan.inferred:
        partition = str(factory_day_key(frame_owner(f)[0], day_key(frame_ts(f))))
        agg = live.setdefault(partition, {"frames": 0, "first_seq": f["seq"], "first_ts": frame_ts(f).isoformat()})
        agg["frames"] += 1
        agg["last_seq"] = f["seq"]
        agg["model_version"] = version_of(f)
    now = utcnow()
    events = []
    for partition in sorted(live):
        agg = live[partition]
        if now - datetime.fromisoformat(agg["first_ts"]) >= REPORT_INTERVAL or partition.split("|")[0] < day_key(now):
            events.append(dg.AssetMaterialization(
                asset_key="stock_inferences", partition=partition,
                metadata={"path": "live updater", "factory_id": partition.split("|")[1], "frames": agg["frames"],
                          "model_version": agg.get("model_version") or "", "first_seq": agg["first_seq"],
                          "last_seq": agg["last_seq"]}))
            del live[partition]
    run_requests = []
    for (factory_id, day), frames in sorted(plan.pending_by_factory_day().items()):
        version = version_of(frames[0])
        attempts = failed_attempts(fdb, frames[0]["_id"], version)
        base = f"infer:{factory_id}:{version}:{day}:{frames[0]['seq']}" + (
            f":attempt{attempts + 1}" if attempts else "")
        key = run_key_for(context.instance, base)
        if key is None:
            context.log.error(f"{len(frames)} frames of {factory_id} on {day}: {MAX_RUN_ATTEMPTS} runs failed")
            continue
        run_requests.append(dg.RunRequest(run_key=key, partition_key=str(factory_day_key(factory_id, day)),
                                          tags={"factory/frames": str(len(frames)), FACTORY_TAG: factory_id}))
    if owed:  # frames passed while their camera had no model: its factory's days, once it has one
        router.prepare({k.split("|")[0] for k in owed})
        for key in sorted(owed):
            factory_id, camera_id = key.split("|")
            version = router.deployed(factory_id, camera_id)
            if version is None:
                continue
            for day in within_partitions(day_range(owed[key], day_key(now))):
                run_requests.append(dg.RunRequest(
                    run_key=f"infer-owed:{factory_id}:{camera_id}:{version}:{day}",
                    partition_key=str(factory_day_key(factory_id, day)),
                    tags={FACTORY_TAG: factory_id, "factory/reason": f"frames of {camera_id} from before its model"}))
            del owed[key]
    new_cursor = json.dumps({"seq": plan.cursor, "live": live, "owed": owed})
    if not events and not run_requests:
        waiting = f"{plan.waiting} just arrived, left to the live updater"
        if plan.unmodelled:
            waiting += f"; {len(plan.unmodelled)} of factories without a model yet"
        return dg.SensorResult(skip_reason=dg.SkipReason(f"No frames to infer ({waiting})."), cursor=new_cursor)
    # the factories named are partitions by the end of this tick
    new_factories = unregistered(context.instance, {str(r.partition_key).split("|")[1] for r in run_requests}
                                 | {e.partition.split("|")[1] for e in events})
    return dg.SensorResult(run_requests=run_requests, asset_events=events, cursor=new_cursor,
                           dynamic_partitions_requests=[factory_partitions.build_add_request(new_factories)]
                           if new_factories else [])


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           asset_selection=["twin_state"])
def twin_live_sensor(context: dg.SensorEvaluationContext, mongo: MongoResource):
    """Makes the live updater's changes to the twin visible in Dagster: one ``twin_state``
    event per factory and ended ``REPORT_INTERVAL`` that had changes (``twin_history``),
    with the number of changes, the version range and the last observation's provenance
    (frame, frame time, model); a factory's newest event of a tick also carries ``twin``,
    the small inline picture of the twin as it is when reported (the full PNG is left to
    ``twin_state`` runs). Cursor: the last twin version reported per factory, and when it last
    looked. Only the twins updated since two intervals before its last look are looked at (the
    ``updated_at`` index), so a tick costs the factories whose twin changed, not every factory."""
    from factory_assets.vocabulary.clock import utcnow

    fdb = mongo.fdb()
    cursor = json.loads(context.cursor) if context.cursor else {}
    now = utcnow()
    looked = cursor.pop(LOOKED_AT, None)
    # an interval ends REPORT_INTERVAL after its first change: a twin last updated before
    # (last look - 2 intervals) has no open interval left that the last look did not report
    query = {} if looked is None else {"updated_at": {"$gte": datetime.fromisoformat(looked) - 2 * REPORT_INTERVAL}}
    changed = [d["_id"] for d in fdb.twin.find(query, {"_id": 1, "version": 1})
               if int(d.get("version") or 0) > int(cursor.get(str(d["_id"]), 0))]
    closed_before = _bucket(now)  # only intervals that have ended
    events = []
    for factory_id in sorted(changed, key=str):
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
    cursor[LOOKED_AT] = now.isoformat()
    if events:
        return dg.SensorResult(asset_events=events, cursor=json.dumps(cursor))
    return dg.SensorResult(skip_reason=dg.SkipReason("No ended interval with twin changes."),
                           cursor=json.dumps(cursor))


def _range_request(run_key: str, factory_id: str, days: list[str], reason: str,
                   cameras: list[str] | None = None) -> dg.RunRequest:
    """One ``retrain_job`` run over ``days`` of one factory (a single-run range of ``factory_days``);
    ``cameras``: for those cameras only (``factory/cameras``: their datasets, models and deployments)."""
    tags = {**factory_day_range_tags(factory_id, days), FACTORY_TAG: factory_id, "factory/reason": reason}
    if cameras:
        tags[CAMERAS_TAG] = ",".join(cameras)
    return dg.RunRequest(run_key=run_key, tags=tags)


SEQ_WINDOW = 200_000  # frame seqs one bootstrap tick looks at; a longer backlog is read over the next ticks
DRIFT_CHECK_FRAMES = 60  # a factory's drift is looked at again after this many of its new frames


def _load_bootstrap_cursor(text: str | None) -> dict:
    """``{"seq", "frames": {factory: frames seen}, "unchecked": {factory: frames since its last drift look}}``."""
    cursor: dict = {"seq": None, "frames": {}, "unchecked": {}}
    if text:
        cursor.update(json.loads(text))
    return cursor


def _busy_factories(instance) -> set[str]:
    """Factories with a retraining or model run queued or in progress (two run-storage queries)."""
    busy = set()
    for job in (retrain_job.name, model_job.name):
        for run in instance.get_runs(filters=dg.RunsFilter(job_name=job, statuses=[
                dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                dg.DagsterRunStatus.STARTED]), limit=1000):
            busy.add(run.tags.get(FACTORY_TAG, FLEET))
    return busy


@dg.sensor(job=retrain_job, minimum_interval_seconds=BOOTSTRAP_INTERVAL_S,
           default_status=dg.DefaultSensorStatus.RUNNING)
def bootstrap_model_sensor(context: dg.SensorEvaluationContext, mongo: MongoResource, endpoint: EndpointResource,
                           retrain_window: RetrainWindow):
    """Keeps every factory's cameras on a model of their own with no clicks, camera by camera.
    It looks at the factories and cameras whose frames arrived since its last tick (one
    aggregation over the ``seq`` range of what arrived: the cost of a tick follows what arrived,
    not the number of factories or the history). A camera with no deployed model of its own (a
    new factory's, or one added to a factory that has models): once the frames of that camera
    auto-labels would label can train a model worth deploying (``twin.drift.Readiness`` counted on
    its own frames: train situations whose changed slots span two rows and two columns, so the
    per-slot model can place the rack, or every colour seen both in stock and absent; validation
    frames to check it on), its first model is trained from automatic labels, by a run tagged
    ``factory/cameras`` with it (the factory's cameras ready in the same tick share one run):
    that run builds, trains and deploys those cameras' datasets, models and deployments only, the
    factory's other cameras keep theirs untouched. A factory with deployed models: when one
    disagrees with its own controller's stock reports on more than 20% of its latest 100 stable
    frames (looked at every ``DRIFT_CHECK_FRAMES`` new frames of that factory), it is retrained,
    every camera. Each request is one ``retrain_job`` run over that factory's last
    ``retrain_window.days`` days, tagged ``factory``; ``retrained_model_sensor`` then trains and
    deploys its models. Run keys: ``bootstrap:<factory>:<cameras>:<n>`` and
    ``drift:<factory>:<version>:<n>``, a new ``n`` every 300 frames, so a model that fails its
    checks is retried with more data; a factory with a retraining run in progress is left alone."""
    from factory_assets.defs.fleet import valid_factory_id
    from factory_assets.storage.frames import FrameSequence
    from factory_assets.twin.drift import bootstrap_readiness
    from factory_assets.twin.live import ModelRouter, frame_owner
    from factory_assets.vocabulary.clock import recent_days

    fdb = mongo.fdb()
    cursor = _load_bootstrap_cursor(context.cursor)
    horizon = FrameSequence(fdb).horizon()
    after = horizon - 1000 if cursor["seq"] is None else int(cursor["seq"])  # a fresh cursor: the recent frames
    upto = min(horizon, max(after, 0) + SEQ_WINDOW)
    arrived: dict[str, dict[str, int]] = {}  # factory -> camera -> frames that arrived
    if upto > after:  # per factory and camera, how many frames arrived: one aggregation over the seq range
        for row in fdb.frames.aggregate([{"$match": {"seq": {"$gt": after, "$lte": upto}}},
                                         {"$group": {"_id": {"factory": "$factory_id", "camera": "$camera_id"},
                                                     "n": {"$sum": 1}}}]):
            owner = {f"{k}_id": v for k, v in (row["_id"] or {}).items() if isinstance(v, str)}
            factory_id, camera_id = frame_owner(owner)  # stored without ids: the default factory's, camera's
            cameras = arrived.setdefault(factory_id, {})
            cameras[camera_id] = cameras.get(camera_id, 0) + int(row["n"])
    frames, unchecked = cursor["frames"], cursor["unchecked"]
    for factory_id, cameras in arrived.items():
        frames[factory_id] = frames.get(factory_id, 0) + sum(cameras.values())
        unchecked[factory_id] = unchecked.get(factory_id, 0) + sum(cameras.values())
    new_cursor = json.dumps({"seq": upto, "frames": frames, "unchecked": unchecked})
    if not arrived:
        return dg.SensorResult(skip_reason=dg.SkipReason("No new frame since the last look."), cursor=new_cursor)
    # never before the first partition day (FACTORY_PARTITIONS_START): such a range could not run
    days = within_partitions(recent_days(retrain_window.days))
    if not days:
        return dg.SensorResult(cursor=new_cursor, skip_reason=dg.SkipReason(
            f"No partition day in the last {retrain_window.days} days: the partitions start {FIRST_DAY} "
            "(FACTORY_PARTITIONS_START)."))
    router = ModelRouter(fdb, endpoint.name)
    router.prepare(arrived)
    busy = _busy_factories(context.instance)
    requests, notes = [], []
    for factory_id in sorted(arrived):
        if not valid_factory_id(factory_id):
            continue
        if factory_id in busy:
            notes.append(f"{factory_id}: a retraining run is in progress")
            continue
        deployed = router.cameras(factory_id)
        if deployed and unchecked.get(factory_id, 0) >= DRIFT_CHECK_FRAMES:
            unchecked[factory_id] = 0
            request = _drift_request(fdb, factory_id, deployed, frames[factory_id], days, notes)
            if request is not None:  # one retraining covers every camera of the factory
                requests.append(request)
                continue
        # each camera with frames and no model of its own: its first model, once its own frames can train one
        ready = []
        for camera_id in sorted(c for c in arrived[factory_id] if c not in deployed):
            if not _nameable(factory_id, camera_id):
                notes.append(f"{factory_id}: camera {camera_id!r} cannot be part of a model name")
                continue
            readiness = bootstrap_readiness(fdb, factory_id=factory_id, camera_id=camera_id)
            if readiness.ready:
                ready.append((camera_id, readiness))
            else:
                notes.append(f"{factory_id}: waiting for data of camera {camera_id}: {readiness.describe()}")
        if ready:
            cameras = [c for c, _ in ready]
            requests.append(_range_request(
                f"bootstrap:{factory_id}:{'+'.join(cameras)}:{min(r.train_frames for _, r in ready) // 300}",
                factory_id, days, "; ".join(
                    f"no model deployed for {factory_id} camera {c} yet; a {r.model} model can be trained from "
                    f"{r.train_frames} of its frames (slots that changed: {', '.join(r.slots_varied) or 'none'})"
                    for c, r in ready), cameras=cameras))
    new_cursor = json.dumps({"seq": upto, "frames": frames, "unchecked": unchecked})
    for note in notes:
        context.log.info(note)
    if not requests:
        return dg.SensorResult(cursor=new_cursor, skip_reason=dg.SkipReason("; ".join(notes)[:1000] or
                                                                           "Nothing to (re)train."))
    return dg.SensorResult(run_requests=requests, cursor=new_cursor)


@dg.run_status_sensor(run_status=dg.DagsterRunStatus.SUCCESS, monitored_jobs=[retrain_job], request_job=model_job,
                      default_status=dg.DefaultSensorStatus.RUNNING, minimum_interval_seconds=BOOTSTRAP_INTERVAL_S)
def retrained_model_sensor(context: dg.RunStatusSensorContext):
    """When a ``retrain_job`` run succeeded, one ``model_job`` run per factory it built datasets
    for: trains that factory's models on them and deploys those that pass their checks. Run key
    ``model:<factory>:<run id>``, tag ``factory`` (and ``factory/cameras`` when the retraining
    run was for some cameras only: their models only)."""
    from factory_assets.defs.partitions import days_by_factory, factory_days

    tags = context.dagster_run.tags
    if "dagster/asset_partition_range_start" in tags:
        keys = factory_days.get_partition_keys_in_range(
            dg.PartitionKeyRange(tags["dagster/asset_partition_range_start"],
                                 tags["dagster/asset_partition_range_end"]),
            dynamic_partitions_store=context.instance)
    elif "dagster/partition" in tags:
        keys = [tags["dagster/partition"]]
    else:
        return dg.SkipReason(f"run {context.dagster_run.run_id} names no partition")
    run_id = context.dagster_run.run_id
    cameras = {CAMERAS_TAG: tags[CAMERAS_TAG]} if tags.get(CAMERAS_TAG) else {}  # a new camera's: its model only
    return [dg.RunRequest(run_key=f"model:{factory_id}:{run_id}", partition_key=factory_id,
                          tags={FACTORY_TAG: factory_id, **cameras,
                                "factory/reason": f"retrain_job run {run_id[:8]} built its datasets from "
                                                  f"{days[0]}..{days[-1]}"})
            for factory_id, days in days_by_factory(keys).items()]


def _drift_request(fdb, factory_id: str, deployed: dict, frames: int, days: list[str],
                   notes: list) -> dg.RunRequest | None:
    """A retraining of the factory when one of its cameras' deployed models disagrees with its
    own controller (``twin.drift.controller_disagreement`` on that model's inferences, factory first)."""
    from factory_assets.twin.drift import controller_disagreement

    for camera_id, version in sorted(deployed.items()):
        drift = controller_disagreement(fdb, version, factory_id=factory_id)
        if not drift.drifted:
            notes.append(f"{factory_id} {camera_id}: model {version} disagrees with the controller on "
                         f"{drift.share:.0%} of {_what(drift)}")
            continue
        return _range_request(f"drift:{factory_id}:{version}:{frames // 300}", factory_id, days,
                              f"{camera_id}'s model {version} disagrees with the controller on {drift.share:.0%} "
                              f"of {_what(drift)}")
    return None


def _nameable(factory_id: str, camera_id: str) -> bool:
    """Whether the camera's models can be named (``<factory_id>--<camera_id>--<version>``)."""
    from factory_assets.serving.models import InvalidModelName, model_name

    try:
        model_name(factory_id, camera_id, "v")
    except InvalidModelName:
        return False
    return True


def _what(drift) -> str:
    """What the drift share counts: slot readings (per-slot model) or frames (presence model)."""
    if drift.basis == "slots":
        return f"the slot readings of its latest stable frames ({drift.compared} compared)"
    return f"its latest {drift.compared} frames"
