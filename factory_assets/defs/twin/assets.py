"""Twin domain: stock inferences per frame and the digital twin's state."""
import contextlib

import dagster as dg

from factory_assets.defs.metadata import json_value, partition_bounds, png_markdown, table
from factory_assets.defs.models.resources import EndpointResource
from factory_assets.defs.partitions import daily_partitions
from factory_assets.defs.pools import MONGODB_POOL
from factory_assets.defs.resources import MongoResource

FETCH_BATCH = 200

# eager() also requires every upstream partition to exist (any_deps_missing): with a daily
# upstream and days without frames that is never true, so twin_state would never be requested.
TWIN_STATE_AUTOMATION = dg.AutomationCondition.eager().without(~dg.AutomationCondition.any_deps_missing())


class StockInferencesConfig(dg.Config):
    max_attempts_per_frame: int = 3  # a frame failing this often is quarantined and skipped


@dg.asset(
    # model_endpoint: the deployed model produces them (lineage; nothing automates stock_inferences,
    # so a deployment does not start runs: the live updater and new_frames_sensor infer new frames)
    deps=["raw_frames", "model_endpoint"],
    partitions_def=daily_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    # transient only: endpoint or database unreachable; "no model deployed" does not retry
    retry_policy=dg.RetryPolicy(max_retries=3, delay=2, backoff=dg.Backoff.EXPONENTIAL),
    group_name="twin",
    kinds={"mongodb"},
    owners=["team:factory-data"],
    pool=MONGODB_POOL,  # reads the days' frames, writes an inference per frame (docs/scaling-out.md)
)
def stock_inferences(context: dg.AssetExecutionContext, config: StockInferencesConfig, mongo: MongoResource,
                     endpoint: EndpointResource) -> dg.MaterializeResult:
    """Stock inferred from each frame of the day(s) by the deployed model, in MongoDB
    ``inferences``: one document per frame and model version (probabilities, present
    flags with the thresholds used, latency). Only frames not yet inferred by the
    deployed version are sent to the endpoint, so re-running is cheap and idempotent,
    and re-materializing after a new model is deployed re-infers with it. A frame that
    fails every time is quarantined after ``max_attempts_per_frame`` runs and skipped.
    Each inference also updates the twin (never with an older frame than it shows). It
    depends on ``model_endpoint`` (the deployed model produces them): after a deployment,
    materializing a day re-infers it with the new model."""
    from factory_assets.serving.predictor import EndpointUnavailable
    from factory_assets.storage.frames import assign_missing_seqs, day_query
    from factory_assets.storage.inferences import inferred_frame_ids
    from factory_assets.storage.models import served_version
    from factory_assets.storage.summaries import inferences_per_path
    from factory_assets.twin.batch import given_up_frame_ids, infer_frames
    from factory_assets.twin.live import apply_latest_stock

    fdb = mongo.fdb()
    assign_missing_seqs(fdb)
    start, end = partition_bounds(context)
    version = served_version(fdb, endpoint.name)
    if version is None:
        raise dg.Failure("No model is deployed on the endpoint yet: materialize model_endpoint first.",
                         allow_retries=False)
    frame_ids = [d["_id"] for d in fdb.frames.find(day_query(start, end), {"_id": 1})]
    done = inferred_frame_ids(fdb, frame_ids, version) if frame_ids else set()
    skipped = given_up_frame_ids(fdb, [i for i in frame_ids if i not in done], version)
    todo = [i for i in frame_ids if i not in done and i not in skipped]
    inferred = failed = 0
    given_up: list = []
    with endpoint.predictor() as predictor:  # its keep-alive socket is closed when the day is done
        for lo in range(0, len(todo), FETCH_BATCH):
            frames = fdb.frames.find({"_id": {"$in": todo[lo:lo + FETCH_BATCH]}}).sort("seq", 1)
            try:
                outcome = infer_frames(fdb, predictor, frames, model_version=version,
                                       max_attempts=config.max_attempts_per_frame)
            except EndpointUnavailable as exc:
                # Nothing half-written: every stored inference is complete; a retry resumes here.
                raise dg.Failure(f"Endpoint unavailable after {inferred} frames: {exc}") from exc
            inferred, failed, given_up = inferred + outcome.inferred, failed + outcome.failed, given_up + outcome.given_up
    if given_up:
        context.log.warning(f"{len(given_up)} frames quarantined after {config.max_attempts_per_frame} failed "
                            f"inferences: {', '.join(map(str, given_up[:10]))}")
    apply_latest_stock(fdb)
    by_path = inferences_per_path(fdb, start, end, version)
    total = int(by_path["inferences"].sum())
    metadata = {
        "model_version": dg.MetadataValue.text(version),
        "frames": dg.MetadataValue.int(len(frame_ids)),
        "inferred_now": dg.MetadataValue.int(inferred),
        "already_inferred": dg.MetadataValue.int(len(done)),
        "failed_attempts": dg.MetadataValue.int(failed),
        "quarantined_now": dg.MetadataValue.int(len(given_up)),
        "quarantined_before": dg.MetadataValue.int(len(skipped)),
        "inferences": dg.MetadataValue.int(total),
        "by_path": table(by_path),
    }
    if total:  # no sentinel for an empty day: the keys are absent
        metadata["mean_latency_ms"] = dg.MetadataValue.float(
            round(float((by_path["mean_latency_ms"] * by_path["inferences"]).sum()) / total, 3))
        metadata["low_confidence_share"] = dg.MetadataValue.float(
            round(float(by_path["low_confidence"].sum()) / total, 4))
    return dg.MaterializeResult(metadata=metadata)


class TwinStateConfig(dg.Config):
    reinfer_latest: bool = True  # heal: infer the newest frame again if the deployed model has not


def twin_metadata(doc: dict | None, picture: bool = True) -> dict:
    """The twin document as metadata: a small picture the UI shows inline (``twin``), version,
    presence table, delta and (optionally) the full picture (``twin_detail``, a PNG behind
    "[Show Markdown]": the UI shows Markdown inline only below 1,000 characters)."""
    import pandas as pd

    from factory_assets.defs.twin.picture import twin_markdown
    from factory_assets.twin.render import render_twin_png
    from factory_assets.twin.state import COLOURS

    doc = doc or {}
    observed = doc.get("observed") or {}
    reported = (doc.get("reported") or {}).get("present") or {}
    presence = pd.DataFrame({
        "colour": list(COLOURS),
        "observed": [(observed.get(c) or {}).get("present") for c in COLOURS],
        "probability": [(observed.get(c) or {}).get("probability") for c in COLOURS],
        "reported": [reported.get(c) for c in COLOURS],
    })
    metadata = {
        "twin": dg.MetadataValue.md(twin_markdown(doc)),
        "version": dg.MetadataValue.int(int(doc.get("version", 0))),
        "presence": table(presence),
        "delta": json_value(doc.get("delta") or {}),  # a flagged disagreement carries its since (a datetime)
    }
    if observed.get("frame_ts") is not None:
        metadata["observed_frame_ts"] = dg.MetadataValue.timestamp(observed["frame_ts"])
    if observed.get("model_version"):
        metadata["model_version"] = dg.MetadataValue.text(observed["model_version"])
    if picture:
        metadata["twin_detail"] = png_markdown(render_twin_png(doc), "digital twin")
    return metadata


@dg.asset(
    deps=[stock_inferences],
    group_name="twin",
    kinds={"mongodb"},
    owners=["team:factory-data"],
    automation_condition=TWIN_STATE_AUTOMATION,
    retry_policy=dg.RetryPolicy(max_retries=2, delay=2),
)
def twin_state(context: dg.AssetExecutionContext, config: TwinStateConfig, mongo: MongoResource,
               endpoint: EndpointResource) -> dg.MaterializeResult:
    """The digital twin of the warehouse, one document per factory in MongoDB
    ``digital_twin`` (observed from vision, reported from the controller's
    ``f/i/stock``, their delta, a monotonic version) and, for the existing Unity twin,
    the original ``sagemaker_stock_inference`` document (``_partition: DTPartition``).
    Materializing syncs it with the newest inference and stock report (re-inferring
    the newest frame when the deployed model has not seen it), never regressing. The
    small picture of the rack (``twin``) is shown inline on every event; the full one
    (``twin_detail``) is attached only when the twin changed since the last event."""
    from factory_assets.storage.models import served_version
    from factory_assets.twin.batch import sync_twin

    fdb = mongo.fdb()
    version = served_version(fdb, endpoint.name)
    with endpoint.predictor() if version else contextlib.nullcontext() as predictor:
        twin = sync_twin(fdb, predictor, version, reinfer_latest=config.reinfer_latest)
    last = context.instance.get_latest_materialization_event(context.asset_key)
    last_md = last.asset_materialization.metadata if last and last.asset_materialization else {}
    changed = "version" not in last_md or last_md["version"].value != int((twin or {}).get("version", 0))
    return dg.MaterializeResult(metadata=twin_metadata(twin, picture=changed))
