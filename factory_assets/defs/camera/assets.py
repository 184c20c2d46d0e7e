"""Camera domain: what the factory's camera has delivered to MongoDB."""

import dagster as dg

from factory_assets.defs.metadata import png_markdown, table
from factory_assets.defs.partitions import factory_days
from factory_assets.defs.pools import MONGODB_POOL
from factory_assets.defs.resources import MongoResource


@dg.asset(
    partitions_def=factory_days,
    group_name="camera",
    kinds={"mongodb"},
    pool=MONGODB_POOL,  # a day's frames read from MongoDB (docs/scaling-out.md)
    owners=["team:factory-data"],
    tags={"domain": "camera"},
)
def raw_frames(context: dg.AssetExecutionContext, mongo: MongoResource) -> dg.MaterializeResult:
    """One factory's camera frames of one UTC day in MongoDB ``factory_camera``: one document
    per frame (BSON image, capture ``ts``, camera, sha256), written by the ingesters.
    Partitioned by factory and day (``<day>|<factory_id>``).

    Nobody needs to materialize it: ``raw_frames_sensor`` reports each day's frames as they
    arrive (frames, new frames, newest frame time, frames/s) and the check
    ``frames_are_arriving`` fails when none has been stored for 5 minutes. Materializing a
    day yourself does not copy pixels either: it takes stock of the factory's day (frames,
    cameras, bytes, its clock; inputs quarantined that day in the whole fleet, which carry no
    factory before they are read) and shows the day's latest frame."""
    from datetime import timedelta

    import pandas as pd

    from factory_assets.defs.fleet import factory_queries
    from factory_assets.defs.partitions import days_by_factory
    from factory_assets.storage.frames import frame_image_bytes, frame_ts
    from factory_assets.vision.preview import thumbnail_png
    from factory_assets.vocabulary.clock import parse_day

    fdb = mongo.fdb()
    [(factory_id, days)] = days_by_factory(context.partition_keys).items()  # one partition: no backfill policy
    start = parse_day(days[0])
    end = parse_day(days[-1]) + timedelta(days=1)
    queries = factory_queries(factory_id, start, end)
    counts: dict = {}
    for query in queries:  # each an index range of this factory's frames
        for row in fdb.frames.aggregate([{"$match": query}, {"$group": {
                "_id": {"$ifNull": ["$camera_id", "unknown"]}, "frames": {"$sum": 1},
                "bytes": {"$sum": {"$ifNull": ["$size", 0]}}}}]):
            got = counts.setdefault(str(row["_id"]), [0, 0])
            got[0] += int(row["frames"])
            got[1] += int(row["bytes"])
    per_camera = pd.DataFrame({"camera": sorted(counts), "frames": [counts[c][0] for c in sorted(counts)],
                               "bytes": [counts[c][1] for c in sorted(counts)]})
    frames = int(per_camera["frames"].sum()) if len(per_camera) else 0
    # quarantined inputs carry no factory before they are read: the day's of the whole fleet
    quarantined = fdb.quarantine.count_documents({"received_at": {"$gte": start, "$lt": end}})
    metadata = {
        "factory_id": dg.MetadataValue.text(factory_id),
        "frames": dg.MetadataValue.int(frames),
        "cameras": dg.MetadataValue.int(len(per_camera)),
        "bytes": dg.MetadataValue.int(int(per_camera["bytes"].sum()) if len(per_camera) else 0),
        "quarantined": dg.MetadataValue.int(quarantined),
        "per_camera": table(per_camera),
        "collection": dg.MetadataValue.text(f"{fdb.db.name}.{fdb.names.frames}"),
    }
    from factory_assets.storage.clocks import clock_info  # the factory's clock minus ours, from the ingester

    clock = clock_info(fdb, factory_id)
    if clock and clock.get("offset_s") is not None:
        metadata["clock_offset_s"] = dg.MetadataValue.json({factory_id: round(clock["offset_s"], 3)})
        metadata["factory_clock"] = dg.MetadataValue.md(
            "| clock minus ours (s) | spread (s) | messages | estimated |\n|---|---|---|---|\n"
            f"| {clock['offset_s']:+.3f} | {clock.get('spread_s') or 0:.3f} | {clock.get('samples')} "
            f"| {clock.get('updated_at')} |\n")
    latest = None
    # the newest frame stored with a date, else one of the original documents (ts as text), as MongoDB sorts them
    for branch in (0, 1):
        for query in queries[branch::2]:
            candidate = fdb.frames.find_one(query, sort=[("ts", -1), ("_id", -1)])
            if candidate is not None and (latest is None or frame_ts(candidate) > frame_ts(latest)):
                latest = candidate
        if latest is not None:
            break
    if latest is not None:
        try:
            metadata["latest_frame"] = png_markdown(thumbnail_png(frame_image_bytes(latest)),
                                                    f"latest frame {latest['ts']}")
            metadata["latest_frame_ts"] = dg.MetadataValue.timestamp(frame_ts(latest))
        except ValueError as exc:  # a stored frame that no longer decodes: say so, do not fail the day
            context.log.warning(f"latest frame {latest['_id']} has no preview: {exc}")
    context.log.info(f"{factory_id} {days[0]}: {frames} frames from {len(per_camera)} cameras")
    return dg.MaterializeResult(metadata=metadata)
