"""Twin domain: stock inferences per frame and the digital twin's state."""
import dagster as dg

from factory_assets.defs.metadata import partition_bounds, png_markdown, table_markdown
from factory_assets.defs.models.resources import EndpointResource
from factory_assets.defs.partitions import daily_partitions
from factory_assets.defs.resources import MongoResource

LOW_CONFIDENCE_MARGIN = 0.15


def served_model_version(fdb, endpoint_name: str) -> str | None:
    from factory_assets.storage.models import get_endpoint

    doc = get_endpoint(fdb, endpoint_name) or {}
    return doc.get("served_version") or doc.get("model_version")


@dg.asset(
    deps=["raw_frames"],
    partitions_def=daily_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    retry_policy=dg.RetryPolicy(max_retries=3, delay=2, backoff=dg.Backoff.EXPONENTIAL),
    group_name="twin",
    kinds={"mongodb"},
    owners=["team:factory-data"],
)
def stock_inferences(context: dg.AssetExecutionContext, mongo: MongoResource,
                     endpoint: EndpointResource) -> dg.MaterializeResult:
    """Stock inferred from each frame of the day(s) by the deployed model, in MongoDB
    ``inferences``: one document per frame and model version (probabilities, present
    flags with the thresholds used, latency). Only frames not yet inferred by the
    deployed version are sent to the endpoint, so re-running is cheap and idempotent,
    and re-materializing after a new model is deployed re-infers with it. Each
    inference also updates the twin (never with an older frame than it shows)."""
    from factory_assets.serving.predictor import EndpointUnavailable
    from factory_assets.storage.frames import day_query, assign_missing_seqs
    from factory_assets.storage.inferences import inferred_frame_ids
    from factory_assets.twin.live import apply_latest_stock, infer_frame

    fdb = mongo.fdb()
    assign_missing_seqs(fdb)
    start, end = partition_bounds(context)
    predictor = endpoint.predictor()
    version = served_model_version(fdb, endpoint.name)
    if version is None:
        raise dg.Failure("No model is deployed on the endpoint yet: materialize model_endpoint first.")
    frame_ids = [d["_id"] for d in fdb.frames.find(day_query(start, end), {"_id": 1})]
    done = inferred_frame_ids(fdb, frame_ids, version) if frame_ids else set()
    todo = [i for i in frame_ids if i not in done]
    inferred = rejected = 0
    cache: dict = {}
    for chunk_start in range(0, len(todo), 200):
        for frame in fdb.frames.find({"_id": {"$in": todo[chunk_start:chunk_start + 200]}}).sort("seq", 1):
            try:
                doc = infer_frame(fdb, predictor, frame, source="batch", thresholds_cache=cache)
            except EndpointUnavailable as exc:
                # Nothing half-written: every stored inference is complete; a retry resumes here.
                raise dg.Failure(f"Endpoint unavailable after {inferred} frames: {exc}") from exc
            if doc is None:
                rejected += 1
            else:
                inferred += 1
    apply_latest_stock(fdb)
    stats = list(fdb.inferences.aggregate([
        {"$match": {"frame_ts": {"$gte": start, "$lt": end}, "model_version": version}},
        {"$project": {"latency_ms": 1, "source": 1, "low": {"$anyElementTrue": [{"$map": {
            "input": {"$objectToArray": "$probabilities"}, "as": "p",
            "in": {"$lt": [{"$abs": {"$subtract": ["$$p.v", 0.5]}}, LOW_CONFIDENCE_MARGIN]}}}]}}},
        {"$group": {"_id": "$source", "n": {"$sum": 1}, "latency": {"$avg": "$latency_ms"},
                    "low": {"$sum": {"$cond": ["$low", 1, 0]}}}},
    ]))
    total = sum(s["n"] for s in stats)
    return dg.MaterializeResult(metadata={
        "model_version": dg.MetadataValue.text(version),
        "frames": dg.MetadataValue.int(len(frame_ids)),
        "inferred_now": dg.MetadataValue.int(inferred),
        "already_inferred": dg.MetadataValue.int(len(done)),
        "rejected": dg.MetadataValue.int(rejected),
        "inferences": dg.MetadataValue.int(total),
        "mean_latency_ms": dg.MetadataValue.float(
            round(sum(s["latency"] * s["n"] for s in stats) / total, 2) if total else 0.0),
        "low_confidence_share": dg.MetadataValue.float(
            round(sum(s["low"] for s in stats) / total, 4) if total else 0.0),
        "by_path": table_markdown(["path", "inferences", "mean latency ms", "low confidence"],
                                  [[s["_id"], s["n"], round(s["latency"], 2), s["low"]] for s in stats]),
    })


class TwinStateConfig(dg.Config):
    reinfer_latest: bool = True  # heal: infer the newest frame again if the deployed model has not


def twin_metadata(doc: dict | None) -> dict:
    from factory_assets.twin.render import render_twin_png
    from factory_assets.twin.state import COLOURS

    doc = doc or {}
    observed = doc.get("observed") or {}
    rows = [[c, (observed.get(c) or {}).get("present"), round((observed.get(c) or {}).get("probability", 0.0), 3),
             ((doc.get("reported") or {}).get("present") or {}).get(c)] for c in COLOURS]
    return {
        "twin": png_markdown(render_twin_png(doc), "digital twin"),
        "version": dg.MetadataValue.int(int(doc.get("version", 0))),
        "observed_frame_ts": dg.MetadataValue.text(str(observed.get("frame_ts"))),
        "model_version": dg.MetadataValue.text(str(observed.get("model_version"))),
        "presence": table_markdown(["colour", "observed", "probability", "reported"], rows),
        "delta": dg.MetadataValue.json(doc.get("delta") or {}),
    }


@dg.asset(
    deps=[stock_inferences],
    group_name="twin",
    kinds={"mongodb"},
    owners=["team:factory-data"],
    automation_condition=dg.AutomationCondition.eager(),
    retry_policy=dg.RetryPolicy(max_retries=2, delay=2),
)
def twin_state(context: dg.AssetExecutionContext, config: TwinStateConfig, mongo: MongoResource,
               endpoint: EndpointResource) -> dg.MaterializeResult:
    """The digital twin of the warehouse, one document per factory in MongoDB
    ``digital_twin`` (observed from vision, reported from the controller's
    ``f/i/stock``, their delta, a monotonic version) and, for the existing Unity twin,
    the original ``sagemaker_stock_inference`` document (``_partition: DTPartition``).
    Materializing syncs it with the newest inference and stock report (re-inferring
    the newest frame when the deployed model has not seen it), never regressing."""
    from factory_assets.storage.frames import frame_ts
    from factory_assets.storage.inferences import inferred_frame_ids
    from factory_assets.twin.live import apply_latest_stock, infer_frame
    from factory_assets.twin.state import Observation
    from factory_assets.twin.store import apply_observation, get_twin

    fdb = mongo.fdb()
    version = served_model_version(fdb, endpoint.name)
    latest = fdb.frames.find_one({"seq": {"$exists": True}}, sort=[("ts", -1)])
    if config.reinfer_latest and latest is not None and version is not None:
        if not inferred_frame_ids(fdb, [latest["_id"]], version):
            infer_frame(fdb, endpoint.predictor(), latest, source="schedule", thresholds_cache={})
    if version is not None:
        newest = fdb.inferences.find_one({"model_version": version}, sort=[("frame_ts", -1)])
        if newest is not None:
            apply_observation(fdb, Observation.from_inference(newest, "batch"))
    apply_latest_stock(fdb)
    twin = get_twin(fdb)
    if twin and latest is not None:
        lag = (frame_ts(latest) - twin["observed"]["frame_ts"]).total_seconds() if twin.get("observed") else None
        if lag:
            context.log.info(f"twin shows a frame {lag:.1f}s older than the newest frame")
    return dg.MaterializeResult(metadata=twin_metadata(twin))
