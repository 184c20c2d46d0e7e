"""labeled_images, training_manifests and their check through Dagster, per factory and day, with
a real MongoDB (the embedded server of the fixtures) and real files."""
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import pytest

from factory_assets.datasets.lst import read_lst
from factory_assets.datasets.manifests import current_dataset
from factory_assets.defs.datasets import asset_checks, assets
from factory_assets.defs.datasets.assets import (labeled_images, training_manifests,
                                                 training_manifests_match_their_version)
from factory_assets.defs.datasets.resources import DatasetTargetResource
from factory_assets.defs.resources import MongoResource
from factory_assets_tests.datasets.test_labels import T0, simulate_day
from factory_assets_tests.defs.fleet import instance_with, key, range_tags

F1 = "factory-1"  # simulate_day's frames and reports are the default factory's

CHECK_KEY = dg.AssetCheckKey(training_manifests.key, "training_manifests_match_their_version")


def _day(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%d")


@pytest.fixture
def resources(mongo_uri, database_name, tmp_path):
    from dagster_aws.s3 import S3Resource

    return {"mongo": MongoResource(uri=mongo_uri, database=database_name),
            "dataset_target": DatasetTargetResource(local_root=str(tmp_path / "datasets")),
            "s3": S3Resource(region_name="us-east-1")}  # unused: no bucket configured


def _manifest_md(result) -> dict:
    return result.asset_materializations_for_node("training_manifests")[0].metadata


def test_a_factory_day_job_bootstraps_a_dataset_of_its_camera_from_todays_stock_reports(fdb, resources):
    """The bootstrap path: a fresh factory, no labels and no model. A job over a factory's day
    (like retrain_job) auto-labels that factory's frames of today and builds both splits."""
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    simulate_day(fdb, seconds=240, start=today + timedelta(minutes=1), seed=3, change_every=10)
    job = dg.define_asset_job("retrain_like", selection=["labeled_images", "training_manifests"])
    defs = dg.Definitions(assets=assets, asset_checks=asset_checks, jobs=[job], resources=resources)
    result = defs.resolve_job_def("retrain_like").execute_in_process(partition_key=key(F1, _day(today)),
                                                                    instance=instance_with(F1))
    assert result.success
    labelled = result.asset_materializations_for_node("labeled_images")[0].metadata
    md = _manifest_md(result)
    assert md["train_images"].value > 0 and md["valid_images"].value > 0
    assert md["train_images"].value + md["valid_images"].value == labelled["labelled_frames"].value
    dataset = current_dataset(fdb)
    assert dataset["version"] == md["dataset_version"].value
    assert (dataset["factory_id"], dataset["camera_id"]) == (F1, "txt-cam") == (md["factory_id"].value,
                                                                               md["camera_id"].value)
    root = Path(dataset["path"])
    assert root.is_dir() and root.parent == Path(resources["dataset_target"].local_root)
    assert len(read_lst(root / "valid-annots" / "valid.lst", image_dir=root / "valid-imgs")) \
        == md["valid_images"].value
    assert {e.check_name: e.passed for e in result.get_asset_check_evaluations()} \
        == {"training_manifests_match_their_version": True}


def _range_tags(first: str, last: str) -> dict:
    return range_tags(F1, first, last)


def test_the_manifests_of_a_single_partition_run_hold_only_that_day(fdb, resources):
    for d in range(2):
        simulate_day(fdb, seconds=150, start=T0 + timedelta(days=d), seed=d, change_every=10)
    instance = instance_with(F1)
    for d in range(2):
        dg.materialize([labeled_images], partition_key=key(F1, _day(T0 + timedelta(days=d))), resources=resources,
                       instance=instance)
    result = dg.materialize([training_manifests], resources=resources, instance=instance,
                            partition_key=key(F1, _day(T0 + timedelta(days=1))))
    md = _manifest_md(result)
    day1 = fdb.labels.count_documents({"frame_ts": {"$gte": T0 + timedelta(days=1)}})
    assert md["train_images"].value + md["valid_images"].value == day1
    assert md["days"].value == 1 and md["first_day"].value == md["last_day"].value == _day(T0 + timedelta(days=1))


def test_a_range_run_builds_one_dataset_from_exactly_the_days_of_its_range(fdb, resources):
    """A backfill of labeled_images + training_manifests over a range (single_run policy)
    is one run; the manifests read its days from context.partition_keys."""
    from factory_assets.vocabulary.clock import utcnow

    for d in range(4):
        simulate_day(fdb, seconds=120, start=T0 + timedelta(days=d), seed=d, change_every=10)
    instance = instance_with(F1)
    for d in range(4):  # every day is labelled, only days 1 and 2 are in the range
        dg.materialize([labeled_images], partition_key=key(F1, _day(T0 + timedelta(days=d))), resources=resources,
                       instance=instance)
    chosen = [_day(T0 + timedelta(days=1)), _day(T0 + timedelta(days=2))]
    before = utcnow()
    before = before.replace(microsecond=before.microsecond // 1000 * 1000)  # BSON keeps milliseconds
    result = dg.materialize([labeled_images, training_manifests], resources=resources, instance=instance,
                            tags=_range_tags(*chosen))
    assert result.success
    md = _manifest_md(result)
    expected = sum(fdb.labels.count_documents({"frame_ts": {"$gte": T0 + timedelta(days=d),
                                                            "$lt": T0 + timedelta(days=d + 1)}}) for d in (1, 2))
    assert md["train_images"].value + md["valid_images"].value == expected < fdb.labels.count_documents({})
    assert (md["first_day"].value, md["last_day"].value, md["days"].value) == (chosen[0], chosen[1], 2)
    assert current_dataset(fdb)["days"] == chosen
    assert before <= current_dataset(fdb)["built_at"] <= utcnow()  # built by this run
    # one materialization per day of the range, all naming the same dataset
    keys = instance.get_materialized_partitions(training_manifests.key)
    assert keys == {str(key(F1, d)) for d in chosen}


def test_the_manifest_check_fails_when_a_written_image_was_altered(fdb, resources):
    simulate_day(fdb, seconds=150, change_every=10)
    instance = instance_with(F1)
    dg.materialize([labeled_images], partition_key=key(F1, _day(T0)), resources=resources, instance=instance)
    defs = dg.Definitions(assets=[training_manifests], asset_checks=[training_manifests_match_their_version],
                          jobs=[dg.define_asset_job("manifests", selection=[training_manifests.key]),
                                dg.define_asset_job("check_only", selection=dg.AssetSelection.checks(CHECK_KEY))],
                          resources=resources)
    first = defs.resolve_job_def("manifests").execute_in_process(instance=instance, partition_key=key(F1, _day(T0)))
    assert [e.passed for e in first.get_asset_check_evaluations()] == [True]
    root = Path(_manifest_md(first)["path"].value)
    victim = read_lst(root / "train-annots" / "train.lst")[0].path
    (root / "train-imgs" / victim).unlink()
    (root / "train-imgs" / victim).write_bytes(b"not the same picture")
    again = defs.resolve_job_def("check_only").execute_in_process(instance=instance, raise_on_error=False)
    evaluation = again.get_asset_check_evaluations()[0]
    assert not evaluation.passed
    assert evaluation.metadata["hash_of_files"].value != evaluation.metadata["version"].value


def test_training_manifests_fail_clearly_when_the_selected_days_have_no_labels(fdb, resources):
    result = dg.materialize([training_manifests], resources=resources, raise_on_error=False,
                            partition_key=key(F1, _day(T0)), instance=instance_with(F1))
    assert not result.success
    failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0]
    assert "no labelled frames" in str(failure.event_specific_data.error)
    assert fdb.datasets.count_documents({}) == 0


def test_a_dataset_that_cannot_be_built_fails_once_without_retries(fdb, resources):
    # a deterministic failure: retrying the same input cannot succeed
    result = dg.materialize([training_manifests], resources=resources, raise_on_error=False,
                            partition_key=key(F1, _day(T0)), instance=instance_with(F1))
    failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0]
    assert failure.event_specific_data.error_source is None or "retry" not in str(failure.event_specific_data)
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
