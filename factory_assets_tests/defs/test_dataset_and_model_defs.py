"""datasets and models domains through dg.materialize, per factory, with real MongoDB, a real
inference server, and S3 served by moto in server mode on 127.0.0.1."""
from __future__ import annotations

from datetime import timedelta

import dagster as dg
import pytest

from factory_assets.defs.datasets.assets import labeled_images, training_manifests
from factory_assets.defs.datasets.resources import DatasetTargetResource
from factory_assets.defs.models.assets import model_endpoint, stock_model
from factory_assets.defs.models.resources import EndpointResource, ModelPolicyResource
from factory_assets.defs.resources import MongoResource
from factory_assets_tests.datasets.test_labels import T0, simulate_day
from factory_assets_tests.defs.fleet import instance_with, key, range_tags

F1 = "factory-1"  # simulate_day's factory
IMPORTED = "import"  # imported photos are their own factory and camera (datasets.importer)


@pytest.fixture(scope="module")
def moto_s3():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def resources(mongo_uri, database_name, tmp_path, moto_s3, monkeypatch):
    from dagster_aws.s3 import S3Resource

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    return {"mongo": MongoResource(uri=mongo_uri, database=database_name),
            "dataset_target": DatasetTargetResource(local_root=str(tmp_path / "datasets")),
            "s3": S3Resource(endpoint_url=moto_s3, region_name="us-east-1")}


def test_labeled_images_auto_labels_the_day_and_shows_counts_and_a_preview(fdb, resources):
    simulate_day(fdb, seconds=90)  # no frame within the settle time (25 s) of the first report is labelled
    result = dg.materialize([labeled_images], partition_key=key(F1, T0.strftime("%Y-%m-%d")), resources=resources,
                            instance=instance_with(F1))
    md = result.asset_materializations_for_node("labeled_images")[0].metadata
    # the seeded day gives the same counts every run (29 labelled since the rules of e8d432c)
    assert md["labelled_frames"].value == md["auto_labelled_now"].value > 25
    assert md["frames_seen_by_autolabel"].value == 90
    # every frame is labelled or skipped with its reason; the last seconds wait to be heard after
    assert md["auto_labelled_now"].value + sum(md[f"skipped_{why}"].value for why in (
        "unstable", "no_report", "unconfirmed")) == 90 and md["skipped_unconfirmed"].value > 0
    assert {r.data["source"]: r.data["frames"] for r in md["per_source"].value.records} \
        == {"auto": md["labelled_frames"].value}
    assert "data:image/png;base64," in md["preview"].value


def test_a_backfill_range_builds_manifests_from_exactly_those_days(fdb, resources):
    for d in range(3):
        simulate_day(fdb, seconds=150, start=T0 + timedelta(days=d), seed=d, change_every=10)
    days = [(T0 + timedelta(days=d)).strftime("%Y-%m-%d") for d in range(3)]
    result = dg.materialize([labeled_images, training_manifests], resources=resources,
                            tags=range_tags(F1, days[1], days[2]), instance=instance_with(F1))
    md = result.asset_materializations_for_node("training_manifests")[0].metadata
    n_selected = fdb.labels.count_documents({"frame_ts": {"$gte": T0 + timedelta(days=1)}})
    assert fdb.labels.count_documents({}) == n_selected  # day 0 was not labelled by this backfill
    assert md["train_images"].value + md["valid_images"].value == n_selected
    assert (md["first_day"].value, md["last_day"].value) == (days[1], days[2])


def test_training_manifests_upload_to_s3_under_the_version(fdb, resources, tmp_path, moto_s3):
    import boto3

    simulate_day(fdb, seconds=150, change_every=10)
    day = key(F1, T0.strftime("%Y-%m-%d"))
    instance = instance_with(F1)
    dg.materialize([labeled_images], partition_key=day, resources=resources, instance=instance)
    client = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1")
    client.create_bucket(Bucket="factory-training")
    resources = {**resources, "dataset_target": DatasetTargetResource(local_root=str(tmp_path / "ds"),
                                                                      s3_bucket="factory-training",
                                                                      s3_prefix="warehouse")}
    result = dg.materialize([training_manifests], resources=resources, partition_key=day, instance=instance)
    md = result.asset_materializations_for_node("training_manifests")[0].metadata
    version = md["dataset_version"].value
    assert md["s3_uri"].value == f"s3://factory-training/warehouse/{version}/"
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="factory-training")["Contents"]}
    assert f"warehouse/{version}/train-annots/train.lst" in keys
    assert f"warehouse/{version}/valid-annots/valid.lst" in keys
    assert not [k for k in keys if ".staging" in k]
    body = client.get_object(Bucket="factory-training", Key=f"warehouse/{version}/train-annots/train.lst")["Body"].read()
    assert body == (tmp_path / "ds" / version / "train-annots" / "train.lst").read_bytes()
    assert fdb.datasets.find_one({"_id": version})["s3_uri"] == md["s3_uri"].value


def _import_range_tags(fdb) -> dict:
    """The days the imported frames were captured on (their files' times) as a partition range."""
    from factory_assets.vocabulary.clock import day_key

    first = fdb.labels.find_one(sort=[("frame_ts", 1)])["frame_ts"]
    last = fdb.labels.find_one(sort=[("frame_ts", -1)])["frame_ts"]
    return range_tags(IMPORTED, day_key(first), day_key(last))


@pytest.fixture(scope="module")
def imported_dataset(tmp_path_factory):
    """A simulated dataset to import, big enough for training_manifests' split to hold every class
    present and absent in validation, small enough to import and train in a few seconds (what
    these tests check is the assets' plumbing and checks, not the model's quality)."""
    from factory_assets.simulation.datasets import write_simulated_dataset

    return write_simulated_dataset(tmp_path_factory.mktemp("imported") / "dataset", n_train=120, n_valid=24, seed=1)


def _imported_sim_dataset(fdb, sim_dataset, tmp_path, resources, instance=None):
    from factory_assets.datasets.importer import import_dataset

    import_dataset(fdb, sim_dataset)
    return dg.materialize([training_manifests], resources=resources, tags=_import_range_tags(fdb),
                          instance=instance)


def test_a_model_below_the_bar_is_registered_but_never_deployed(fdb, imported_dataset, tmp_path, resources,
                                                                monkeypatch, model_server):
    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    instance = instance_with(IMPORTED)
    _imported_sim_dataset(fdb, imported_dataset, tmp_path, resources, instance)
    res = {**resources, "model_policy": ModelPolicyResource(min_per_label_accuracy=1.01),
           "endpoint": EndpointResource(url=model_server.url)}
    result = dg.materialize([stock_model, model_endpoint], resources=res, raise_on_error=False, instance=instance,
                            partition_key=IMPORTED)
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"per_label_accuracy_above_minimum": False, "no_regression_against_deployed_model": True,
                      "validation_has_every_class": True}
    assert fdb.models.count_documents({"passed_checks": False}) == 1
    # the blocking check stopped model_endpoint from running
    assert not result.asset_materializations_for_node("model_endpoint")
    assert fdb.endpoints.count_documents({}) == 0


def test_a_good_model_is_deployed_for_its_factory_and_the_server_serves_it_by_name(
        fdb, imported_dataset, tmp_path, resources, monkeypatch, mongo_uri, database_name, sim_jpeg):
    from factory_assets.serving.models import model_name
    from factory_assets.serving.predictor import HttpEndpointPredictor
    from factory_assets.serving.server import InferenceServer
    from factory_assets.storage.models import get_deployment

    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    instance = instance_with(IMPORTED)
    _imported_sim_dataset(fdb, imported_dataset, tmp_path, resources, instance)
    srv = InferenceServer("127.0.0.1", 0, endpoint_name="factory-stock", log=lambda *_: None)
    srv.follow(mongo_uri, database_name, poll_seconds=0.1)
    srv.start()
    try:
        res = {**resources, "model_policy": ModelPolicyResource(min_per_label_accuracy=0.5),
               "endpoint": EndpointResource(url=srv.url)}
        result = dg.materialize([stock_model, model_endpoint], resources=res, instance=instance,
                                partition_key=IMPORTED)
        md = result.asset_materializations_for_node("stock_model")[0].metadata
        version = md["model_version"].value
        assert "data:image/png;base64," in md["confusion"].value
        assert [r.data["class"] for r in md["metrics"].value.records] == ["blue", "red", "white"]
        assert all(isinstance(r.data["accuracy"], float) for r in md["metrics"].value.records)
        ep = result.asset_materializations_for_node("model_endpoint")[0].metadata
        assert ep["model_version"].value == version and ep["status"].value == "InService"
        name = model_name(IMPORTED, IMPORTED, version)
        assert ep["target_model"].value == name
        # the server hosts it by name beside its own (none here): nothing was swapped, nothing restarted
        assert srv.slot.current is None and srv.models.names() == [name]
        with HttpEndpointPredictor(srv.url) as predictor:
            assert predictor.predict(sim_jpeg, target_model=name).model_version == version
        model_doc = fdb.models.find_one({"_id": version})
        assert model_doc["passed_checks"] and model_doc["dataset_version"] and model_doc["code_version"]
        assert (model_doc["factory_id"], model_doc["camera_id"]) == (IMPORTED, IMPORTED)
        assert get_deployment(fdb, IMPORTED, IMPORTED, endpoint="factory-stock")["status"] == "InService"
    finally:
        srv.stop()


def test_model_endpoint_fails_clearly_when_the_server_is_unreachable(fdb, trained_models, mongo_uri, database_name):
    import socket

    from factory_assets.storage.models import register_model, set_checks

    register_model(fdb, trained_models[0].model, dataset_version="d", code_version="c", factory_id=F1,
                   camera_id="txt-cam")
    set_checks(fdb, trained_models[0].version, True, {})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the asset's body, as a run's step executes it (a run would then retry it 3 times, 5 + 10 + 20 s apart)
    context = dg.build_asset_context(partition_key=F1, instance=instance_with(F1))
    with pytest.raises(dg.Failure, match="cannot be reached") as failure:
        model_endpoint(context, mongo=MongoResource(uri=mongo_uri, database=database_name),
                       endpoint=EndpointResource(url=f"http://127.0.0.1:{port}"))
    # transient: the asset's retry policy may try again (unlike "no model has passed its checks")
    assert failure.value.allow_retries is not False and model_endpoint.op.retry_policy.max_retries == 3


def test_stock_model_trains_on_its_upstreams_dataset_not_the_newest_built_by_anyone(
        fdb, imported_dataset, tmp_path, resources, monkeypatch, model_server):
    from factory_assets.datasets.manifests import build_dataset, current_dataset

    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    instance = instance_with(IMPORTED)
    upstream = _imported_sim_dataset(fdb, imported_dataset, tmp_path, resources, instance)
    upstream_version = upstream.asset_materializations_for_node("training_manifests")[0].metadata[
        "dataset_version"].value
    # someone else (the CLI, another run) builds a different, newer dataset afterwards
    fdb.labels.delete_one({"_id": fdb.labels.find_one(sort=[("frame_ts", -1)])["_id"]})
    other = build_dataset(fdb, tmp_path / "elsewhere")
    assert current_dataset(fdb)["version"] == other.version != upstream_version
    res = {**resources, "model_policy": ModelPolicyResource(min_per_label_accuracy=0.0),
           "endpoint": EndpointResource(url=model_server.url)}
    result = dg.materialize([stock_model], resources=res, instance=instance, partition_key=IMPORTED)
    md = result.asset_materializations_for_node("stock_model")[0].metadata
    assert md["dataset_version"].value == upstream_version
    assert fdb.models.find_one({"_id": md["model_version"].value})["dataset_version"] == upstream_version
    # nothing deployed: the regression check says so, with no -1.0 / "none" sentinel
    regression = [e for e in result.get_asset_check_evaluations()
                  if e.check_name == "no_regression_against_deployed_model"][0]
    assert regression.metadata["compared_with_deployed"].value is False
    assert "deployed_per_label_accuracy" not in regression.metadata


def test_model_endpoint_with_no_model_that_passed_fails_once_without_retries(fdb, mongo_uri, database_name):
    result = dg.materialize([model_endpoint], raise_on_error=False, partition_key=F1, instance=instance_with(F1),
                            resources={
        "mongo": MongoResource(uri=mongo_uri, database=database_name),
        "endpoint": EndpointResource(url="http://127.0.0.1:9")})
    assert not result.success
    failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0]
    assert "No model of factory-1 has passed its checks" in str(failure.event_specific_data.error)
    # the asset has a retry policy for an unreachable server; this deterministic failure skips it
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]


def test_a_per_slot_model_shows_its_slot_accuracy_and_a_per_slot_table(fdb, tmp_path, resources, monkeypatch):
    # auto-labels from the controller's stock reports carry the slots: the model trained is per slot
    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    simulate_day(fdb, seconds=240, seed=5, change_every=6.0)  # pieces stored in two rows and columns
    res = {**resources, "model_policy": ModelPolicyResource(min_per_label_accuracy=0.0),
           "endpoint": EndpointResource(url="http://127.0.0.1:9")}
    instance = instance_with(F1)
    dg.materialize([labeled_images, training_manifests], resources=res, partition_key=key(F1, T0.strftime("%Y-%m-%d")),
                   instance=instance)
    result = dg.materialize([stock_model], resources=res, partition_key=F1, instance=instance)
    md = result.asset_materializations_for_node("stock_model")[0].metadata
    assert md["model_kind"].value == "slots"
    assert isinstance(md["slot_accuracy"].value, float) and 0.0 <= md["slot_accuracy"].value <= 1.0
    assert md["slot_validation_images"].value > 0
    rows = md["per_slot_accuracy"].value.records
    assert [r.data["slot"] for r in rows] == ["A1", "A2", "A3", "B1", "B2", "B3", "C1", "C2", "C3"]
    assert all(isinstance(r.data["accuracy"], float) for r in rows)
    assert {r.data["truth"] for r in md["slot_confusion"].value.records} == {"empty", "blue", "red", "white"}
    registered = fdb.models.find_one({"_id": md["model_version"].value})["metrics"]["valid"]
    assert registered["model_kind"] == "slots"
    assert registered["slots"]["slot_accuracy"] == md["slot_accuracy"].value


def _recorded_dataset(fdb, instance, sim_dataset, dest, version, n_train=80, keep_valid=lambda labels: True):
    """A copy of the simulated dataset (its first ``n_train`` train images, the validation images
    ``keep_valid`` keeps), recorded in ``datasets`` as factory-1's camera's and materialized as its
    training_manifests on ``instance``, as build_dataset and the asset do."""
    import shutil
    from datetime import datetime, timezone

    from factory_assets.vocabulary.clock import utcnow

    from factory_assets.vocabulary import CLASSES

    counts = {}
    for split, keep in (("train", None), ("valid", keep_valid)):
        (dest / f"{split}-annots").mkdir(parents=True)
        (dest / f"{split}-imgs").mkdir()
        rows = [line.split("\t") for line in (sim_dataset / f"{split}-annots" / f"{split}.lst").read_text().splitlines()]
        rows = rows[:n_train] if keep is None else [r for r in rows if keep(dict(zip(CLASSES, map(int, r[1:4]))))]
        for r in rows:
            shutil.copy(sim_dataset / f"{split}-imgs" / r[-1].strip(), dest / f"{split}-imgs" / r[-1].strip())
        (dest / f"{split}-annots" / f"{split}.lst").write_text("".join("\t".join(r) + "\n" for r in rows))
        counts[split] = {"images": len(rows), **{c: sum(int(r[1 + i]) for r in rows) for i, c in enumerate(CLASSES)}}
    fdb.datasets.insert_one({"_id": version, "version": version, "path": str(dest), "counts": counts,
                             "days": ["2026-11-22"], "built_at": datetime(2026, 11, 22, 12, tzinfo=timezone.utc),
                             "factory_id": F1, "camera_id": "txt-cam",
                             "materialized_by": {"run_id": "an earlier run", "at": utcnow()}})
    instance.report_runless_asset_event(dg.AssetMaterialization(
        "training_manifests", partition=str(key(F1, "2026-11-22")),
        metadata={"dataset_version": version, "path": str(dest)}))
    return counts


def test_the_model_metrics_show_how_many_validation_images_hold_each_class_and_n_a_where_none_does(
        fdb, sim_dataset, tmp_path, resources, monkeypatch, model_server):
    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    instance = instance_with(F1)
    counts = _recorded_dataset(fdb, instance, sim_dataset, tmp_path / "no-red", "no-red-in-valid",
                               keep_valid=lambda labels: not labels["red"])
    assert counts["valid"]["red"] == 0 < counts["valid"]["blue"] < counts["valid"]["images"]
    res = {**resources, "model_policy": ModelPolicyResource(min_per_label_accuracy=0.0),
           "endpoint": EndpointResource(url=model_server.url)}
    result = dg.materialize([stock_model], resources=res, instance=instance, partition_key=F1)
    md = result.asset_materializations_for_node("stock_model")[0].metadata
    rows = {r.data["class"]: r.data for r in md["metrics"].value.records}
    assert (rows["red"]["present"], rows["red"]["absent"]) == (0, counts["valid"]["images"])
    assert rows["red"]["recall"] == rows["red"]["f1"] == "n/a"  # not 0: there was nothing to find
    assert rows["blue"]["present"] == counts["valid"]["blue"] and isinstance(rows["blue"]["recall"], float)
    assert (md["dataset_version"].value, md["dataset_days"].value) == ("no-red-in-valid", "2026-11-22 .. 2026-11-22 (1 days)")
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    lacking = checks["validation_has_every_class"]
    assert not lacking.passed and lacking.severity == dg.AssetCheckSeverity.WARN
    assert "no validation image shows red" in lacking.description and lacking.metadata["present_red"].value == 0
    # a warning only: the blocking checks decide whether the model may be deployed
    assert checks["per_label_accuracy_above_minimum"].passed and fdb.models.find_one()["passed_checks"]


def test_materializing_stock_model_alone_on_the_dataset_it_already_learned_trains_nothing_and_says_why(
        fdb, sim_dataset, tmp_path, resources, monkeypatch, model_server):
    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    instance = instance_with(F1)
    _recorded_dataset(fdb, instance, sim_dataset, tmp_path / "first", "first-dataset")
    res = {**resources, "model_policy": ModelPolicyResource(min_per_label_accuracy=0.0),
           "endpoint": EndpointResource(url=model_server.url)}
    trained = dg.materialize([stock_model], resources=res, instance=instance, partition_key=F1)
    version = trained.asset_materializations_for_node("stock_model")[0].metadata["model_version"].value
    # "Materialize" on stock_model alone in the UI, with no new dataset since
    again = dg.materialize([stock_model], resources=res, instance=instance, partition_key=F1)
    assert again.success and not again.asset_materializations_for_node("stock_model")
    [observation] = [e.event_specific_data.asset_observation for e in again.all_events
                     if e.event_type_value == "ASSET_OBSERVATION"]
    assert observation.metadata["retrained"].value is False and observation.metadata["model_version"].value == version
    assert observation.metadata["dataset_version"].value == "first-dataset"
    assert "Not retrained" in observation.description and "training_manifests of the factory for the days" \
        in observation.description
    assert {e.check_name for e in again.get_asset_check_evaluations()} == {
        "per_label_accuracy_above_minimum", "no_regression_against_deployed_model", "validation_has_every_class"}
    assert fdb.models.count_documents({}) == 1
    # a new dataset: it trains on it
    _recorded_dataset(fdb, instance, sim_dataset, tmp_path / "second", "second-dataset", n_train=60)
    fresh = dg.materialize([stock_model], resources=res, instance=instance, partition_key=F1)
    md = fresh.asset_materializations_for_node("stock_model")[0].metadata
    assert md["dataset_version"].value == "second-dataset" and md["dataset_built_in_this_run"].value is False
