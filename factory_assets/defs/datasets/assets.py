"""Datasets domain: labelled frames per day and the SageMaker training manifests."""
import dagster as dg
from dagster_aws.s3 import S3Resource

from factory_assets.defs.datasets.resources import DatasetTargetResource
from factory_assets.defs.metadata import partition_bounds, png_markdown, table
from factory_assets.defs.partitions import daily_partitions
from factory_assets.defs.pools import MONGODB_POOL
from factory_assets.defs.resources import MongoResource

PREVIEW_FRAMES = 8
MANIFEST_CHECK = "training_manifests_match_their_version"


class LabeledImagesConfig(dg.Config):
    # a stock report at most this old labels a frame; None: any age (the controller reports only on events)
    window_seconds: float | None = None
    margin_seconds: float = 2.0   # no stock change this close to the frame
    # no stock change reported this long before the frame (the crane may still move);
    # None: FACTORY_SETTLE_S, default 25 s (docs/twin.md)
    settle_seconds: float | None = None


@dg.asset(
    deps=["raw_frames"],
    partitions_def=daily_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    group_name="datasets",
    kinds={"mongodb"},
    pool=MONGODB_POOL,  # reads and labels the days' frames in MongoDB (docs/scaling-out.md)
    owners=["team:factory-data"],
)
def labeled_images(context: dg.AssetExecutionContext, config: LabeledImagesConfig,
                   mongo: MongoResource) -> dg.MaterializeResult:
    """The labelled frames of the day(s) in MongoDB ``labels``: one document per frame
    and label source (manual > import > auto). Materializing labels the day's frames
    from the controller's ``f/i/stock`` reports where the stock was stable, then
    reports counts per class, per source and per label combination, with a preview."""
    from factory_assets.datasets.autolabel import auto_label
    from factory_assets.datasets.labels import combination, effective_labels
    from factory_assets.datasets.summary import label_tables
    from factory_assets.storage.frames import frame_image_bytes
    from factory_assets.vocabulary import CLASSES
    from factory_assets.vision.preview import grid_png

    fdb = mongo.fdb()
    start, end = partition_bounds(context)
    summary = auto_label(fdb, start, end, window_s=config.window_seconds, margin_s=config.margin_seconds,
                         settle_s=config.settle_seconds)
    labels = effective_labels(fdb, start, end)
    tables = label_tables(labels, CLASSES)
    per_class = tables["per_class"].set_index("class")["present"]
    metadata = {
        "labelled_frames": dg.MetadataValue.int(len(labels)),
        "frames_seen_by_autolabel": dg.MetadataValue.int(summary.frames),
        "auto_labelled_now": dg.MetadataValue.int(summary.labelled),
        "skipped_unstable": dg.MetadataValue.int(summary.unstable),
        "skipped_no_report": dg.MetadataValue.int(summary.no_report),
        "skipped_unconfirmed": dg.MetadataValue.int(summary.unconfirmed),
        **{f"present_{c}": dg.MetadataValue.int(int(per_class[c])) for c in CLASSES},
        **{name: table(df) for name, df in tables.items()},
    }
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
    partitions_def=daily_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    group_name="datasets",
    kinds={"python", "s3"},
    owners=["team:factory-data"],
)
def training_manifests(context: dg.AssetExecutionContext, mongo: MongoResource,
                       dataset_target: DatasetTargetResource, s3: S3Resource) -> dg.MaterializeResult:
    """A training dataset in the exact layout SageMaker's image classifier and the
    original project use (``train-imgs/``, ``valid-imgs/``, ``all-imgs/``,
    ``train-annots/train.lst``, ``valid-annots/valid.lst``; class columns blue, red,
    white), built from the labelled frames of exactly the days materialized: a run
    over a partition range (a backfill, ``factory-assets retrain --from --to``, a
    retraining request) builds one dataset from all its days. Deterministic, sticky
    splits; written to a temporary folder and moved into place when complete; the
    version is a content hash recorded in MongoDB ``datasets``."""
    from factory_assets.datasets.manifests import build_dataset, record_upload, upload_to_s3
    from factory_assets.datasets.summary import split_table
    from factory_assets.vocabulary import CLASSES

    fdb = mongo.fdb()
    days = sorted(context.partition_keys)
    start, end = partition_bounds(context)
    try:
        built = build_dataset(fdb, dataset_target.root(), start=start, end=end, days=days)
    except ValueError as exc:  # no labels, an empty split: the same input fails the same way
        raise dg.Failure(str(exc), allow_retries=False) from exc
    metadata = {
        "dataset_version": dg.MetadataValue.text(built.version),
        "path": dg.MetadataValue.path(str(built.path)),
        "first_day": dg.MetadataValue.text(days[0]),
        "last_day": dg.MetadataValue.text(days[-1]),
        "days": dg.MetadataValue.int(len(days)),
        "train_images": dg.MetadataValue.int(built.counts["train"]["images"]),
        "valid_images": dg.MetadataValue.int(built.counts["valid"]["images"]),
        "per_split_and_class": table(split_table(built.counts, CLASSES)),
        "reused_existing_version": dg.MetadataValue.bool(built.reused),
    }
    if dataset_target.s3_bucket:
        uri = upload_to_s3(s3.get_client(), built.path, dataset_target.s3_bucket, dataset_target.s3_prefix,
                           built.version)
        record_upload(fdb, built.version, uri)
        metadata["s3_uri"] = dg.MetadataValue.url(uri)
    context.log.info(f"dataset {built.version} from {days[0]}..{days[-1]}: {built.counts}")
    return dg.MaterializeResult(metadata=metadata)


@dg.asset_check(asset=training_manifests, name=MANIFEST_CHECK, blocking=True,
                description="The written dataset re-parses (every .lst line valid, every image present), "
                            "both splits are non-empty and its files hash to the recorded version.")
def training_manifests_match_their_version(context: dg.AssetCheckExecutionContext,
                                           mongo: MongoResource) -> dg.AssetCheckResult:
    from pathlib import Path

    from factory_assets.datasets.lst import ManifestError, read_lst
    from factory_assets.datasets.manifests import dataset_digest

    event = context.instance.get_latest_materialization_event(training_manifests.key)
    metadata = event.asset_materialization.metadata if event and event.asset_materialization else {}
    if "path" not in metadata:
        return dg.AssetCheckResult(passed=False, metadata={"problem": "no materialization with a path"})
    path, version = Path(metadata["path"].value), metadata["dataset_version"].value
    try:
        sizes = {s: len(read_lst(path / f"{s}-annots" / f"{s}.lst", image_dir=path / f"{s}-imgs"))
                 for s in ("train", "valid")}
        actual = dataset_digest(path)
    except (ManifestError, OSError) as exc:
        return dg.AssetCheckResult(passed=False, metadata={"problem": str(exc)})
    recorded = mongo.fdb().datasets.find_one({"_id": version}) is not None
    passed = actual == version and all(sizes.values()) and recorded
    return dg.AssetCheckResult(passed=passed, metadata={
        "version": version, "hash_of_files": actual, "train_rows": sizes["train"], "valid_rows": sizes["valid"],
        "recorded_in_datasets": recorded})
