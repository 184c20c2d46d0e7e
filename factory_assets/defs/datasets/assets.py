"""Datasets domain: labelled frames per factory and day, and the SageMaker training manifests
(one dataset per factory and camera: a model learns one camera's view).

Both are partitioned by factory and day and backfill as one run per range
(``BackfillPolicy.single_run()``). Dagster turns a backfill over factories x days into ranges
grouped by the dimension with fewer selected keys (docs/dagster.md): "factory-7, the last 7
days" is one run, "3 factories x 7 days" one run per factory, "5 factories x 2 days" one run per
day spanning the factories. So a run may hold several factories: each is labelled, and each of
its cameras gets its own dataset, on its own."""
from datetime import timedelta, timezone

import dagster as dg
from dagster_aws.s3 import S3Resource

from factory_assets.defs.datasets.resources import DatasetTargetResource
from factory_assets.defs.metadata import png_markdown, table
from factory_assets.defs.partitions import days_by_factory, factory_days
from factory_assets.defs.pools import MONGODB_POOL
from factory_assets.defs.resources import MongoResource

PREVIEW_FRAMES = 8
MANIFEST_CHECK = "training_manifests_match_their_version"
# run tag: the cameras a run is for ("cam-2" or "cam-2,txt-cam"): a camera's first model leaves the others' as they are
CAMERAS_TAG = "factory/cameras"


def run_cameras(context) -> set[str] | None:
    """The cameras a run's datasets, models and deployments are limited to (``CAMERAS_TAG``); None: every camera."""
    try:
        tags = context.run.tags
    except dg.DagsterError:  # the asset's body invoked directly (no run): every camera
        return None
    value = (tags or {}).get(CAMERAS_TAG)
    return {c for c in value.split(",") if c} if value else None


def _bounds(days: list[str]):
    from factory_assets.vocabulary.clock import parse_day

    return parse_day(days[0]), parse_day(days[-1]) + timedelta(days=1)


def factory_labels(fdb, factory_id: str, days: list[str], camera_id: str | None = None) -> list[dict]:
    """The effective labels of ``factory_id``'s frames captured on ``days`` (one per frame): an index
    range of that factory's labels (``factory_frame_ts``)."""
    from factory_assets.datasets.labels import effective_labels

    start, end = _bounds(days)
    wanted = set(days)
    return [lab for lab in effective_labels(fdb, start, end, factory_id=factory_id, camera_id=camera_id)
            if lab["frame_ts"].astimezone(timezone.utc).strftime("%Y-%m-%d") in wanted]


def label_cameras(fdb, labels: list[dict]) -> dict:
    """camera_id -> number of labelled frames (the frames looked up by id, in batches)."""
    cameras: dict = {}
    ids = [lab["frame_id"] for lab in labels]
    for lo in range(0, len(ids), 2000):
        for f in fdb.frames.find({"_id": {"$in": ids[lo:lo + 2000]}}, {"camera_id": 1}):
            camera = str(f.get("camera_id") or "unknown")
            cameras[camera] = cameras.get(camera, 0) + 1
    return cameras


class LabeledImagesConfig(dg.Config):
    # a stock report at most this old labels a frame; None: any age (the controller reports only on events)
    window_seconds: float | None = None
    margin_seconds: float = 2.0   # no stock change this close to the frame
    # no stock change reported this long before the frame (the crane may still move);
    # None: FACTORY_SETTLE_S, default 25 s (docs/twin.md)
    settle_seconds: float | None = None


@dg.asset(
    deps=["raw_frames"],
    partitions_def=factory_days,
    backfill_policy=dg.BackfillPolicy.single_run(),
    group_name="datasets",
    kinds={"mongodb"},
    pool=MONGODB_POOL,  # reads and labels the days' frames in MongoDB (docs/scaling-out.md)
    owners=["team:factory-data"],
)
def labeled_images(context: dg.AssetExecutionContext, config: LabeledImagesConfig,
                   mongo: MongoResource) -> dg.MaterializeResult:
    """The labelled frames of a factory's day(s) in MongoDB ``labels``: one document per frame
    and label source (manual > import > auto). Materializing labels the factory's frames
    of those days from its own controller's ``f/i/stock`` reports where the stock was stable,
    then reports counts per class, per source, per label combination and per camera, with a
    preview."""
    from factory_assets.datasets.autolabel import AutoLabelSummary, auto_label
    from factory_assets.datasets.labels import combination
    from factory_assets.datasets.summary import label_tables
    from factory_assets.storage.frames import frame_image_bytes
    from factory_assets.vocabulary import CLASSES
    from factory_assets.vision.preview import grid_png

    fdb = mongo.fdb()
    summary, labels, per_factory = AutoLabelSummary(), [], {}
    for factory_id, days in days_by_factory(context.partition_keys).items():
        start, end = _bounds(days)
        got = auto_label(fdb, start, end, window_s=config.window_seconds, margin_s=config.margin_seconds,
                         settle_s=config.settle_seconds, factory_id=factory_id)
        for name in ("frames", "labelled", "unstable", "no_report", "unconfirmed"):
            setattr(summary, name, getattr(summary, name) + getattr(got, name))
        mine = factory_labels(fdb, factory_id, days)
        per_factory[factory_id] = len(mine)
        labels += mine
    tables = label_tables(labels, CLASSES)
    per_class = tables["per_class"].set_index("class")["present"]
    cameras = label_cameras(fdb, labels)
    metadata = {
        "factories": dg.MetadataValue.text(", ".join(per_factory)),
        "labelled_frames": dg.MetadataValue.int(len(labels)),
        "frames_seen_by_autolabel": dg.MetadataValue.int(summary.frames),
        "auto_labelled_now": dg.MetadataValue.int(summary.labelled),
        "skipped_unstable": dg.MetadataValue.int(summary.unstable),
        "skipped_no_report": dg.MetadataValue.int(summary.no_report),
        "skipped_unconfirmed": dg.MetadataValue.int(summary.unconfirmed),
        **{f"present_{c}": dg.MetadataValue.int(int(per_class[c])) for c in CLASSES},
        **{name: table(df) for name, df in tables.items()},
        "per_camera": dg.MetadataValue.json(cameras),
    }
    if len(per_factory) > 1:
        metadata["labelled_frames_per_factory"] = dg.MetadataValue.json(per_factory)
    if labels:
        step = max(1, len(labels) // PREVIEW_FRAMES)
        sample = labels[::step][:PREVIEW_FRAMES]
        frames = {f["_id"]: f for f in fdb.frames.find({"_id": {"$in": [lab["frame_id"] for lab in sample]}})}
        images, captions = [], []
        for lab in sample:
            if lab["frame_id"] in frames:
                images.append(frame_image_bytes(frames[lab["frame_id"]]))
                captions.append(f"{combination(lab['present'])} ({lab['source']})")
        if images:
            metadata["preview"] = png_markdown(grid_png(images, captions), "labelled frames")
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    deps=[labeled_images],
    partitions_def=factory_days,
    backfill_policy=dg.BackfillPolicy.single_run(),
    group_name="datasets",
    kinds={"python", "s3"},
    owners=["team:factory-data"],
)
def training_manifests(context: dg.AssetExecutionContext, mongo: MongoResource,
                       dataset_target: DatasetTargetResource, s3: S3Resource) -> dg.MaterializeResult:
    """Training datasets in the exact layout SageMaker's image classifier and the original
    project use (``train-imgs/``, ``valid-imgs/``, ``all-imgs/``, ``train-annots/train.lst``,
    ``valid-annots/valid.lst``; class columns blue, red, white), one per factory and camera
    (a model learns one camera's view), each built from the labelled frames of exactly the
    days materialized: a run over a range (a backfill, ``factory-assets retrain --factory F
    --from --to``, a retraining request) builds one dataset per camera from all its days.
    Deterministic, sticky splits; written to a temporary folder and moved into place when
    complete; the version is a content hash recorded in MongoDB ``datasets`` with its factory
    and camera, and the run that materialized it (what ``stock_model`` of that factory trains
    on). A camera whose labels cannot fill both splits gets no dataset (said in the metadata);
    the run fails only when no camera got one. A run tagged ``factory/cameras`` (a new camera's
    first model, ``bootstrap_model_sensor``) builds those cameras' datasets only."""
    from factory_assets.datasets.manifests import build_dataset, record_upload, upload_to_s3
    from factory_assets.datasets.summary import split_table
    from factory_assets.vocabulary import CLASSES
    from factory_assets.vocabulary.clock import utcnow

    fdb = mongo.fdb()
    built_rows, refused = [], {}
    wanted = run_cameras(context)
    for factory_id, days in days_by_factory(context.partition_keys).items():
        start, end = _bounds(days)
        cameras = label_cameras(fdb, factory_labels(fdb, factory_id, days))
        if wanted is not None:
            cameras = {c: n for c, n in cameras.items() if c in wanted}
            for camera_id in sorted(wanted - set(cameras)):
                refused[f"{factory_id} {camera_id}"] = f"no labelled frames on {days[0]}..{days[-1]}"
        elif not cameras:
            refused[factory_id] = f"no labelled frames on {days[0]}..{days[-1]} (materialize labeled_images first)"
        for camera_id in sorted(cameras):
            try:
                built = build_dataset(fdb, dataset_target.root(), start=start, end=end, days=days,
                                      factory_id=factory_id, camera_id=camera_id)
            except ValueError as exc:  # an empty split: the same input fails the same way
                refused[f"{factory_id} {camera_id}"] = str(exc)
                continue
            row = {"factory_id": factory_id, "camera_id": camera_id, "dataset_version": built.version,
                   "path": str(built.path), "first_day": days[0], "last_day": days[-1], "days": len(days),
                   "train_images": built.counts["train"]["images"], "valid_images": built.counts["valid"]["images"],
                   "reused_existing_version": built.reused}
            if dataset_target.s3_bucket:
                uri = upload_to_s3(s3.get_client(), built.path, dataset_target.s3_bucket, dataset_target.s3_prefix,
                                   built.version)
                record_upload(fdb, built.version, uri)
                row["s3_uri"] = uri
            # what stock_model of this factory trains on: this run's dataset of the camera, else its newest one
            fdb.datasets.update_one({"_id": built.version}, {"$set": {
                "factory_id": factory_id, "camera_id": camera_id,
                "materialized_by": {"run_id": context.run.run_id, "at": utcnow()}}})
            built_rows.append((row, built))
            context.log.info(f"dataset {built.version} of {factory_id} camera {camera_id} from "
                             f"{days[0]}..{days[-1]}: {built.counts}")
    for what, why in refused.items():
        context.log.warning(f"no dataset for {what}: {why}")
    if not built_rows:
        raise dg.Failure("No dataset could be built: " + "; ".join(f"{k}: {v}" for k, v in refused.items()),
                         allow_retries=False)
    metadata = {"datasets": dg.MetadataValue.json([row for row, _ in built_rows])}
    if refused:
        metadata["not_built"] = dg.MetadataValue.json(refused)
    if len(built_rows) == 1:  # the common case: one factory, one camera, its numbers at a glance
        row, built = built_rows[0]
        metadata.update({
            "factory_id": dg.MetadataValue.text(row["factory_id"]),
            "camera_id": dg.MetadataValue.text(row["camera_id"]),
            "dataset_version": dg.MetadataValue.text(built.version),
            "path": dg.MetadataValue.path(str(built.path)),
            "first_day": dg.MetadataValue.text(row["first_day"]),
            "last_day": dg.MetadataValue.text(row["last_day"]),
            "days": dg.MetadataValue.int(row["days"]),
            "train_images": dg.MetadataValue.int(row["train_images"]),
            "valid_images": dg.MetadataValue.int(row["valid_images"]),
            "per_split_and_class": table(split_table(built.counts, CLASSES)),
            "reused_existing_version": dg.MetadataValue.bool(built.reused),
        })
        if "s3_uri" in row:
            metadata["s3_uri"] = dg.MetadataValue.url(row["s3_uri"])
    return dg.MaterializeResult(metadata=metadata)


@dg.asset_check(asset=training_manifests, name=MANIFEST_CHECK, blocking=True,
                description="Every dataset of the latest materialization re-parses (every .lst line valid, every "
                            "image present), has both splits non-empty and its files hash to the recorded version.")
def training_manifests_match_their_version(context: dg.AssetCheckExecutionContext,
                                           mongo: MongoResource) -> dg.AssetCheckResult:
    from pathlib import Path

    from factory_assets.datasets.lst import ManifestError, read_lst
    from factory_assets.datasets.manifests import dataset_digest

    event = context.instance.get_latest_materialization_event(training_manifests.key)
    metadata = event.asset_materialization.metadata if event and event.asset_materialization else {}
    if "datasets" in metadata:
        rows = metadata["datasets"].value
    elif "path" in metadata:  # a materialization from before datasets per factory and camera
        rows = [{"path": metadata["path"].value, "dataset_version": metadata["dataset_version"].value}]
    else:
        return dg.AssetCheckResult(passed=False, metadata={"problem": "no materialization with a dataset"})
    results, passed = [], True
    for row in rows:
        path, version = Path(row["path"]), row["dataset_version"]
        try:
            sizes = {s: len(read_lst(path / f"{s}-annots" / f"{s}.lst", image_dir=path / f"{s}-imgs"))
                     for s in ("train", "valid")}
            actual = dataset_digest(path)
        except (ManifestError, OSError) as exc:
            results.append({"version": version, "problem": str(exc)})
            passed = False
            continue
        recorded = mongo.fdb().datasets.find_one({"_id": version}) is not None
        ok = actual == version and all(sizes.values()) and recorded
        passed = passed and ok
        results.append({"factory_id": row.get("factory_id"), "camera_id": row.get("camera_id"), "version": version,
                        "hash_of_files": actual, "train_rows": sizes["train"], "valid_rows": sizes["valid"],
                        "recorded_in_datasets": recorded})
    metadata = {"datasets": dg.MetadataValue.json(results)}
    if len(results) == 1:  # one dataset: its figures at a glance
        metadata.update({k: v for k, v in results[0].items() if v is not None and k not in ("factory_id",
                                                                                              "camera_id")})
    return dg.AssetCheckResult(passed=passed, metadata=metadata)
