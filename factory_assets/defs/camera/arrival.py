"""raw_frames kept honest without a click: the ingesters write frames, Dagster is told.

``raw_frames_sensor`` reads the frames stored since its last tick (by ``seq``, a bounded
index range whatever the history) and reports one ``raw_frames`` materialization per factory
and day that received frames (partition ``<day>|<factory_id>``): the day's frames, the new
ones, the newest frame's capture time and the capture rate (frames/s). A factory it reports
on for the first time is registered as a partition in the same tick (as
``factory_discovery_sensor`` would on its next one). So the root of the graph is green, shows when frames last
arrived, and a downstream launch no longer warns that its upstream day is missing.

``frames_are_arriving`` (a check on ``raw_frames``) fails when no frame has been stored for
``STALE_AFTER`` (or none ever): the sensor reports it whenever its state changes, and it can
be executed from the UI like any check. No event carries a picture (the asset's own
materialization, a stock-taking of one day, shows the day's latest frame).
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import dagster as dg

from factory_assets.defs.camera.assets import raw_frames
from factory_assets.defs.resources import MongoResource

FRAMES_ARRIVING_CHECK = "frames_are_arriving"
STALE_AFTER = timedelta(minutes=5)  # no frame stored for this long: the camera (or its ingester) is not delivering
PAGE = 5000                          # frames read per query (seq, ts, received_at and camera only)
MAX_PAGES = 10                       # per tick; a longer backlog is read over the next ticks
KEEP_DAYS = 7                        # days whose running frame count the cursor keeps (per factory)

_PROJECTION = {"seq": 1, "ts": 1, "received_at": 1, "camera_id": 1, "factory_id": 1}


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _arrived_at(doc: dict, ts: datetime) -> datetime:
    """When the frame was stored: ``received_at`` (our clock), else its capture time."""
    received = doc.get("received_at")
    return _utc(received) if isinstance(received, datetime) else ts


def arrival_check(newest_arrival: datetime | None, now: datetime,
                  stale_after: timedelta = STALE_AFTER) -> dg.AssetCheckEvaluation:
    """The ``frames_are_arriving`` verdict for the newest frame's arrival time."""
    if newest_arrival is None:
        return dg.AssetCheckEvaluation(
            asset_key=raw_frames.key, check_name=FRAMES_ARRIVING_CHECK, passed=False,
            severity=dg.AssetCheckSeverity.ERROR,
            description="No frame stored yet: is the camera publishing and `factory-assets ingest` running?",
            metadata={"stale_after_seconds": stale_after.total_seconds()})
    age = max(0.0, (now - newest_arrival).total_seconds())
    passed = age <= stale_after.total_seconds()
    return dg.AssetCheckEvaluation(
        asset_key=raw_frames.key, check_name=FRAMES_ARRIVING_CHECK, passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(f"The newest frame was stored {age:.0f} s ago." if passed else
                     f"No frame stored for {age / 60:.1f} min (more than {stale_after.total_seconds() / 60:.0f} "
                     "min): is the camera publishing and the ingester running? (see its log)"),
        metadata={"newest_frame_stored_at": dg.MetadataValue.timestamp(newest_arrival),
                  "seconds_since_newest_frame": round(age, 1),
                  "stale_after_seconds": stale_after.total_seconds()})


@dg.asset_check(asset=raw_frames, name=FRAMES_ARRIVING_CHECK,
                description=f"A frame was stored in the last {STALE_AFTER.total_seconds() / 60:.0f} minutes. "
                            "raw_frames_sensor reports it whenever it changes.")
def frames_are_arriving(mongo: MongoResource) -> dg.AssetCheckResult:
    from factory_assets.storage.frames import frame_ts, latest_frame
    from factory_assets.vocabulary.clock import utcnow

    newest = latest_frame(mongo.fdb(), projection=_PROJECTION, by="seq")
    verdict = arrival_check(_arrived_at(newest, frame_ts(newest)) if newest else None, utcnow())
    return dg.AssetCheckResult(passed=verdict.passed, severity=verdict.severity, description=verdict.description,
                               metadata=verdict.metadata)


def load_cursor(text: str | None) -> dict:
    """``{"seq", "days": {"<day>|<factory>": {"frames", "newest_ts"}}, "newest_arrival", "arriving"}``."""
    cursor = {"seq": None, "days": {}, "newest_arrival": None, "arriving": None}
    if text:
        cursor.update(json.loads(text))
    # a cursor of the days before factories were partitions restarts its running counts
    cursor["days"] = {k: v for k, v in cursor["days"].items() if "|" in k}
    return cursor


def _count_day(fdb, factory_id: str, day: str, up_to_seq: int) -> int:
    """Frames of the factory's ``day`` already sequenced up to ``up_to_seq``: once per factory
    and day the cursor does not know (an index range of that factory's day)."""
    from factory_assets.defs.fleet import factory_queries
    from factory_assets.vocabulary.clock import parse_day

    start = parse_day(day)
    return sum(fdb.frames.count_documents({**q, "seq": {"$lte": up_to_seq}})
               for q in factory_queries(factory_id, start, start + timedelta(days=1)))


@dg.sensor(minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
           asset_selection=[raw_frames])
def raw_frames_sensor(context: dg.SensorEvaluationContext, mongo: MongoResource):
    """Reports the frames the ingesters stored as ``raw_frames`` materializations, one per
    factory and day that received frames since the last tick (frames of the day, new frames,
    newest capture time, frames/s), and ``frames_are_arriving`` whenever it changes. Runs
    nothing. Cursor: the last ``seq`` read and a running count per factory's recent day; a
    fresh cursor starts at most ``PAGE * MAX_PAGES`` frames back (older days: materialize
    raw_frames for them)."""
    from factory_assets.defs.fleet import factory_of, unregistered, valid_factory_id
    from factory_assets.defs.partitions import factory_day_key, factory_partitions
    from factory_assets.storage.frames import FrameSequence, frame_ts, read_frames_after
    from factory_assets.vocabulary.clock import day_key, utcnow

    fdb = mongo.fdb()
    cursor = load_cursor(context.cursor)
    sequence = FrameSequence(fdb)
    seq = cursor["seq"]
    if seq is None:
        seq = max(0, sequence.horizon() - PAGE * MAX_PAGES)
    newest_arrival = datetime.fromisoformat(cursor["newest_arrival"]) if cursor["newest_arrival"] else None
    new: dict[str, dict] = {}
    valid: dict[str, bool] = {}
    for _ in range(MAX_PAGES):
        page = read_frames_after(fdb, seq, limit=PAGE, projection=_PROJECTION, sequence=sequence)
        for f in page.frames:
            try:
                ts = frame_ts(f)
            except (KeyError, TypeError, ValueError):  # no readable capture time: not a day's frame
                continue
            fid = factory_of(f)
            if fid not in valid:
                valid[fid] = valid_factory_id(fid)
            if not valid[fid]:  # not a partition (factory_discovery_sensor says why)
                continue
            key = str(factory_day_key(fid, day_key(ts)))
            day = new.setdefault(key, {"frames": 0, "first": ts, "newest": ts, "cameras": set()})
            day["frames"] += 1
            day["first"], day["newest"] = min(day["first"], ts), max(day["newest"], ts)
            day["cameras"].add(str(f.get("camera_id") or "unknown"))
            arrived = _arrived_at(f, ts)
            newest_arrival = arrived if newest_arrival is None else max(newest_arrival, arrived)
        seq = page.cursor
        if not page.has_more:
            break
    events: list = []
    days = cursor["days"]
    for key in sorted(new):
        got = new[key]
        known = days.get(key)
        day, factory_id = key.split("|")
        total = known["frames"] + got["frames"] if known else _count_day(fdb, factory_id, day, seq)
        previous = datetime.fromisoformat(known["newest_ts"]) if known else None
        since = previous if previous is not None and previous < got["newest"] else got["first"]
        span = (got["newest"] - since).total_seconds()
        count = got["frames"] if since is previous else got["frames"] - 1
        metadata = {"factory_id": dg.MetadataValue.text(factory_id),
                    "frames": dg.MetadataValue.int(total), "new_frames": dg.MetadataValue.int(got["frames"]),
                    "newest_frame_ts": dg.MetadataValue.timestamp(got["newest"]),
                    "cameras": dg.MetadataValue.text(", ".join(sorted(got["cameras"])))}
        if span > 0:
            metadata["frames_per_second"] = dg.MetadataValue.float(round(count / span, 3))
        events.append(dg.AssetMaterialization(asset_key=raw_frames.key, partition=key, metadata=metadata,
                                              description="frames stored by the ingesters (raw_frames_sensor)"))
        newest = max(got["newest"], previous) if previous else got["newest"]
        days[key] = {"frames": total, "newest_ts": newest.isoformat()}
    recent = sorted({k.split("|")[0] for k in days})[-KEEP_DAYS:]
    for key in [k for k in days if k.split("|")[0] not in recent]:
        del days[key]
    verdict = arrival_check(newest_arrival, utcnow())
    if verdict.passed != cursor["arriving"]:
        events.append(verdict)
    new_cursor = json.dumps({"seq": seq, "days": days, "arriving": verdict.passed,
                             "newest_arrival": newest_arrival.isoformat() if newest_arrival else None})
    if not events:
        return dg.SensorResult(skip_reason=dg.SkipReason("No new frame since the last tick."), cursor=new_cursor)
    # the factories reported on are partitions by the end of this tick (their events name them)
    new_factories = unregistered(context.instance, {k.split("|")[1] for k in new})
    requests = [factory_partitions.build_add_request(new_factories)] if new_factories else []
    return dg.SensorResult(asset_events=events, cursor=new_cursor, dynamic_partitions_requests=requests)
