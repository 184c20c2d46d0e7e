"""Camera domain: what the factory's camera has delivered to MongoDB."""

import dagster as dg

from factory_assets.defs.metadata import partition_bounds, png_markdown, table
from factory_assets.defs.partitions import daily_partitions
from factory_assets.defs.pools import MONGODB_POOL
from factory_assets.defs.resources import MongoResource


@dg.asset(
    partitions_def=daily_partitions,
    group_name="camera",
    kinds={"mongodb"},
    pool=MONGODB_POOL,  # a day's frames read from MongoDB (docs/scaling-out.md)
    owners=["team:factory-data"],
    tags={"domain": "camera"},
)
def raw_frames(context: dg.AssetExecutionContext, mongo: MongoResource) -> dg.MaterializeResult:
    """Camera frames of one UTC day in MongoDB ``factory_camera``: one document per
    frame (BSON image, capture ``ts``, camera, sha256), written by the ingesters.

    Nobody needs to materialize it: ``raw_frames_sensor`` reports each day's frames as they
    arrive (frames, new frames, newest frame time, frames/s) and the check
    ``frames_are_arriving`` fails when none has been stored for 5 minutes. Materializing a
    day yourself does not copy pixels either: it takes stock of the day (frames, cameras,
    bytes, quarantined inputs) and shows the day's latest frame."""
    from factory_assets.storage.frames import day_query, frame_image_bytes, frame_ts
    from factory_assets.storage.summaries import frames_per_camera
    from factory_assets.vision.preview import thumbnail_png

    fdb = mongo.fdb()
    start, end = partition_bounds(context)
    query = day_query(start, end)
    per_camera = frames_per_camera(fdb, start, end)
    frames = int(per_camera["frames"].sum())
    quarantined = fdb.quarantine.count_documents({"received_at": {"$gte": start, "$lt": end}})
    metadata = {
        "frames": dg.MetadataValue.int(frames),
        "cameras": dg.MetadataValue.int(len(per_camera)),
        "bytes": dg.MetadataValue.int(int(per_camera["bytes"].sum())),
        "quarantined": dg.MetadataValue.int(quarantined),
        "per_camera": table(per_camera),
        "collection": dg.MetadataValue.text(f"{fdb.db.name}.{fdb.names.frames}"),
    }
    from factory_assets.storage.clocks import clocks  # each factory's clock minus ours, from the ingester

    offsets = {d["_id"]: d for d in clocks(fdb).find() if d.get("offset_s") is not None}
    if offsets:
        metadata["clock_offset_s"] = dg.MetadataValue.json({f: round(d["offset_s"], 3) for f, d in offsets.items()})
        metadata["factory_clocks"] = dg.MetadataValue.md(
            "| factory | clock minus ours (s) | spread (s) | messages | estimated |\n|---|---|---|---|---|\n"
            + "".join(f"| {f} | {d['offset_s']:+.3f} | {d.get('spread_s') or 0:.3f} | {d.get('samples')} "
                      f"| {d.get('updated_at')} |\n" for f, d in sorted(offsets.items())))
    latest = fdb.frames.find_one(query, sort=[("ts", -1), ("_id", -1)])
    if latest is not None:
        try:
            metadata["latest_frame"] = png_markdown(thumbnail_png(frame_image_bytes(latest)),
                                                    f"latest frame {latest['ts']}")
            metadata["latest_frame_ts"] = dg.MetadataValue.timestamp(frame_ts(latest))
        except ValueError as exc:  # a stored frame that no longer decodes: say so, do not fail the day
            context.log.warning(f"latest frame {latest['_id']} has no preview: {exc}")
    context.log.info(f"{frames} frames from {len(per_camera)} cameras, {quarantined} quarantined")
    return dg.MaterializeResult(metadata=metadata)
