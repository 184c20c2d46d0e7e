"""Twin domain: stock inferences per frame (per factory and day) and the digital twins' state."""
from datetime import timedelta

import dagster as dg

from factory_assets.defs.metadata import json_value, png_markdown, table
from factory_assets.defs.models.resources import EndpointResource
from factory_assets.defs.partitions import days_by_factory, factory_days
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
    partitions_def=factory_days,
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
    """Stock inferred from each frame of a factory's day(s) by the model deployed for that
    factory's camera (asked for by name on the fleet's endpoint:
    ``<factory_id>--<camera_id>--<version>``), in MongoDB ``inferences``: one document per frame
    and model version (probabilities, present flags with the thresholds used, latency). Only
    frames not yet inferred by that version are sent, so re-running is cheap and idempotent,
    and re-materializing after a new model is deployed re-infers with it. Frames of a camera
    with no model are left (counted in ``frames_without_model``); a model of one factory never
    infers another's frames. A frame that fails every time is quarantined after
    ``max_attempts_per_frame`` runs and skipped. Each inference also updates the factory's twin
    (never with an older frame than it shows)."""
    import pandas as pd

    from factory_assets.defs.fleet import factory_queries
    from factory_assets.serving.predictor import EndpointUnavailable, UnknownModel
    from factory_assets.storage.frames import assign_missing_seqs
    from factory_assets.storage.inferences import inferred_frame_ids
    from factory_assets.storage.summaries import inferences_per_path
    from factory_assets.twin.batch import given_up_frame_ids, infer_frames
    from factory_assets.twin.live import ModelRouter, apply_latest_stock, frame_owner
    from factory_assets.vocabulary.clock import parse_day

    fdb = mongo.fdb()
    assign_missing_seqs(fdb)
    router = ModelRouter(fdb, endpoint.name)
    totals = {"frames": 0, "inferred": 0, "done": 0, "failed": 0, "skipped": 0, "no_model": 0}
    given_up: list = []
    versions, tables = {}, []
    with endpoint.predictor() as predictor:  # its keep-alive socket is closed when the days are done
        for factory_id, days in days_by_factory(context.partition_keys).items():
            start, end = parse_day(days[0]), parse_day(days[-1]) + timedelta(days=1)
            by_camera: dict = {}  # the factory's frames of its days (one contiguous range per run), by camera
            for query in factory_queries(factory_id, start, end):
                for f in fdb.frames.find(query, {"_id": 1, "camera_id": 1}):
                    by_camera.setdefault(frame_owner(f)[1], []).append(f["_id"])
            router.prepare([factory_id])
            for camera_id, frame_ids in sorted(by_camera.items()):
                totals["frames"] += len(frame_ids)
                choice = router.choice(factory_id, camera_id)
                if choice is None or choice.version is None:
                    totals["no_model"] += len(frame_ids)
                    context.log.warning(f"{len(frame_ids)} frames of {factory_id} camera {camera_id}: no model is "
                                        "deployed for that camera yet")
                    continue
                version = choice.version
                versions[f"{factory_id}/{camera_id}"] = version
                done = inferred_frame_ids(fdb, frame_ids, version)
                skipped = given_up_frame_ids(fdb, [i for i in frame_ids if i not in done], version)
                todo = [i for i in frame_ids if i not in done and i not in skipped]
                totals["done"] += len(done)
                totals["skipped"] += len(skipped)
                for lo in range(0, len(todo), FETCH_BATCH):
                    frames = fdb.frames.find({"_id": {"$in": todo[lo:lo + FETCH_BATCH]}}).sort("seq", 1)
                    try:
                        outcome = infer_frames(fdb, predictor, frames, model_version=version,
                                               max_attempts=config.max_attempts_per_frame,
                                               target_model=choice.target_model, router=router)
                    except UnknownModel as exc:
                        raise dg.Failure(f"The endpoint has no model {choice.target_model} for {factory_id} camera "
                                         f"{camera_id}: {exc}") from exc
                    except EndpointUnavailable as exc:
                        # Nothing half-written: every stored inference is complete; a retry resumes here.
                        raise dg.Failure(f"Endpoint unavailable after {totals['inferred']} frames: {exc}") from exc
                    totals["inferred"] += outcome.inferred
                    totals["failed"] += outcome.failed
                    given_up += outcome.given_up
                tables.append(inferences_per_path(fdb, start, end, version))
            apply_latest_stock(fdb, factory_id)
    if totals["frames"] and totals["no_model"] == totals["frames"]:
        raise dg.Failure(f"No model is deployed for {', '.join(days_by_factory(context.partition_keys))} yet: "
                         "materialize model_endpoint for it first.", allow_retries=False)
    if given_up:
        context.log.warning(f"{len(given_up)} frames quarantined after {config.max_attempts_per_frame} failed "
                            f"inferences: {', '.join(map(str, given_up[:10]))}")
    by_path = (pd.concat(tables).groupby("path", as_index=False).agg(
        {"inferences": "sum", "mean_latency_ms": "mean", "low_confidence": "sum"}) if tables
        else pd.DataFrame({"path": [], "inferences": [], "mean_latency_ms": [], "low_confidence": []}))
    total = int(by_path["inferences"].sum()) if len(by_path) else 0
    metadata = {
        "factory_id": dg.MetadataValue.text(", ".join(days_by_factory(context.partition_keys))),
        "frames": dg.MetadataValue.int(totals["frames"]),
        "inferred_now": dg.MetadataValue.int(totals["inferred"]),
        "already_inferred": dg.MetadataValue.int(totals["done"]),
        "failed_attempts": dg.MetadataValue.int(totals["failed"]),
        "quarantined_now": dg.MetadataValue.int(len(given_up)),
        "quarantined_before": dg.MetadataValue.int(totals["skipped"]),
        "frames_without_model": dg.MetadataValue.int(totals["no_model"]),
        "inferences": dg.MetadataValue.int(total),
        "by_path": table(by_path),
    }
    if len(set(versions.values())) == 1:
        metadata["model_version"] = dg.MetadataValue.text(next(iter(versions.values())))
    if versions:
        metadata["models"] = dg.MetadataValue.json(versions)
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
    """The digital twins of the warehouses, one document per factory in MongoDB
    ``digital_twin`` (observed from vision, reported from the controller's
    ``f/i/stock``, their delta, a monotonic version) and, for the existing Unity twin,
    the original ``sagemaker_stock_inference`` document (``_partition: DTPartition``).
    Materializing syncs each factory's twin with the newest inference of its own model and its
    newest stock report (re-inferring a factory's newest frame when its model has not seen it),
    never regressing. The metadata shows the default factory's twin: the small picture of the
    rack (``twin``) inline on every event, the full one (``twin_detail``) only when it changed;
    and every factory as a table (``factories``: factory, version, updated, in stock, model), the
    ``RECENT_TWINS`` most recently updated, so the metadata does not grow with the fleet."""
    import pandas as pd

    from factory_assets.twin.batch import RECENT_TWINS, recent_twins, sync_twin
    from factory_assets.twin.live import ModelRouter

    fdb = mongo.fdb()
    with endpoint.predictor() as predictor:
        twin = sync_twin(fdb, predictor, reinfer_latest=config.reinfer_latest, router=ModelRouter(fdb, endpoint.name))
    last = context.instance.get_latest_materialization_event(context.asset_key)
    last_md = last.asset_materialization.metadata if last and last.asset_materialization else {}
    changed = "version" not in last_md or last_md["version"].value != int((twin or {}).get("version", 0))
    metadata = twin_metadata(twin, picture=changed)
    rows = recent_twins(fdb, RECENT_TWINS)
    columns = ["factory", "version", "updated", "in_stock", "model"]
    metadata["factories"] = table(pd.DataFrame(rows, columns=columns).astype(
        {"factory": str, "version": int, "updated": object, "in_stock": object, "model": object}),
        f"the {RECENT_TWINS} most recently updated twins")
    metadata["factories_total"] = dg.MetadataValue.int(fdb.twin.estimated_document_count())
    return dg.MaterializeResult(metadata=metadata)
