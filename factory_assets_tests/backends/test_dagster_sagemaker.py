"""stock_model and model_endpoint with ``backend="sagemaker"``: the same assets and
blocking checks, trained and deployed through moto, predictions through our server."""
from __future__ import annotations

import dagster as dg
import pytest

from factory_assets_tests.backends.conftest import BYOC_IMAGE, ROLE, moto_training_job
from factory_assets_tests.helpers import predict_once

FACTORY = "factory-1"  # stock_model and model_endpoint are partitioned by factory


@pytest.fixture(scope="module")
def dagster_dataset(tmp_path_factory):
    from factory_assets.simulation.datasets import write_simulated_dataset

    return write_simulated_dataset(tmp_path_factory.mktemp("dg") / "dataset", n_train=20, n_valid=6, seed=6)


def _sagemaker_resource(cfg, **overrides):
    from factory_assets.defs.models.sagemaker import SageMakerResource

    values = dict(region=cfg.region, role_arn=cfg.role_arn, bucket=cfg.bucket, prefix=cfg.prefix,
                  endpoint_name=cfg.endpoint_name, byoc_image_uri=cfg.byoc_image_uri, poll_seconds=0.01,
                  training_timeout_seconds=30, endpoint_timeout_seconds=30,
                  sagemaker_endpoint_url=cfg.sagemaker_endpoint_url, s3_endpoint_url=cfg.s3_endpoint_url)
    values.update(overrides)
    return SageMakerResource(**values)


def _instance_with_dataset(fdb, dataset_dir, version: str) -> dg.DagsterInstance:
    """An instance where training_manifests has produced ``version`` (recorded in MongoDB)."""
    from factory_assets.vocabulary.clock import utcnow

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("factory", [FACTORY])  # as factory_discovery_sensor does
    # the dataset training_manifests built for the factory's camera (what stock_model of that factory trains on)
    fdb.datasets.update_one({"_id": version}, {"$set": {"version": version, "path": str(dataset_dir),
                                                        "factory_id": FACTORY, "camera_id": "txt-cam",
                                                        "materialized_by": {"run_id": "earlier", "at": utcnow()}}},
                            upsert=True)
    instance.report_runless_asset_event(dg.AssetMaterialization(
        asset_key="training_manifests", metadata={"dataset_version": version}))
    return instance


def _resources(mongo_uri, database_name, endpoint, **policy):
    from factory_assets.defs.models.resources import ModelPolicyResource
    from factory_assets.defs.resources import MongoResource

    return {"mongo": MongoResource(uri=mongo_uri, database=database_name), "endpoint": endpoint,
            "model_policy": ModelPolicyResource(**policy)}


def _failure(result) -> str:
    return str([e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0].event_specific_data.error)


def test_stock_model_on_the_builtin_algorithm_shows_the_job_and_its_checks_block_the_endpoint(
        sm_config, fdb, mongo_uri, database_name, dagster_dataset):
    from factory_assets.defs.models.assets import model_endpoint, stock_model
    from factory_assets.defs.models.resources import EndpointResource

    endpoint = EndpointResource(name=sm_config.endpoint_name, backend="sagemaker",
                                sagemaker=_sagemaker_resource(sm_config))
    instance = _instance_with_dataset(fdb, dagster_dataset, "dg-builtin")
    result = dg.materialize([stock_model, model_endpoint], instance=instance, partition_key=FACTORY,
                            raise_on_error=False,
                            resources=_resources(mongo_uri, database_name, endpoint))
    md = result.asset_materializations_for_node("stock_model")[0].metadata
    job = md["training_job"].value
    assert md["backend"].value == "sagemaker (builtin)" and md["training_job_status"].value == "Completed"
    assert md["training_job_console"].value.endswith(f"#/jobs/{job}")
    assert md["instance_type"].value == "ml.g4dn.xlarge" and md["billable_seconds"].value >= 0
    assert "estimated_cost_usd" in md and "123456789012" not in md["training_job_arn"].value
    assert md["hyperparameters"].value["num_training_samples"] == "20"
    # moto reports no validation:accuracy, so the blocking check fails and nothing is deployed
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["per_label_accuracy_above_minimum"] is False
    assert not result.asset_materializations_for_node("model_endpoint")
    doc = fdb.models.find_one({"_id": md["model_version"].value})
    assert doc["sagemaker"]["training_job_name"] == job and doc["passed_checks"] is False
    assert doc["dataset_version"] == "dg-builtin" and doc["code_version"]


def test_a_training_job_that_never_finishes_fails_the_asset_with_a_clear_message(
        sm_config, fdb, mongo_uri, database_name, dagster_dataset):
    from factory_assets.backends.sagemaker import SageMakerTrainer
    from factory_assets.defs.models.assets import stock_model
    from factory_assets.defs.models.resources import EndpointResource

    # the job already runs on "AWS" and stays InProgress: the asset attaches to it and waits
    name = SageMakerTrainer(sm_config, algorithm="builtin", dataset_version="dg-slow").start(dagster_dataset)
    moto_training_job(name).training_job_status = "InProgress"
    endpoint = EndpointResource(name=sm_config.endpoint_name, backend="sagemaker",
                                sagemaker=_sagemaker_resource(sm_config, training_timeout_seconds=0.05))
    instance = _instance_with_dataset(fdb, dagster_dataset, "dg-slow")
    result = dg.materialize([stock_model], instance=instance, partition_key=FACTORY, raise_on_error=False,
                            resources=_resources(mongo_uri, database_name, endpoint))
    assert not result.success
    assert f"SageMaker training job {name} did not finish within 0.05 s" in _failure(result)


def test_missing_role_and_bucket_fail_the_asset_before_any_aws_call(aws_env, fdb, mongo_uri, database_name,
                                                                    dagster_dataset):
    from factory_assets.defs.models.assets import stock_model
    from factory_assets.defs.models.resources import EndpointResource
    from factory_assets.defs.models.sagemaker import SageMakerResource

    endpoint = EndpointResource(backend="sagemaker", sagemaker=SageMakerResource(
        sagemaker_endpoint_url="http://127.0.0.1:9", s3_endpoint_url="http://127.0.0.1:9"))
    instance = _instance_with_dataset(fdb, dagster_dataset, "dg-noconfig")
    result = dg.materialize([stock_model], instance=instance, partition_key=FACTORY, raise_on_error=False,
                            resources=_resources(mongo_uri, database_name, endpoint))
    message = _failure(result)
    assert "FACTORY_SAGEMAKER_ROLE_ARN" in message and "FACTORY_SAGEMAKER_BUCKET" in message
    assert fdb.models.count_documents({}) == 0


def test_model_endpoint_deploys_a_sagemaker_model_and_the_predictor_reaches_it(
        sm_config, fdb, mongo_uri, database_name, small_model, tmp_path):
    from factory_assets.container.paths import MLPaths
    from factory_assets.container.serve import start
    from factory_assets.defs.models.assets import model_endpoint
    from factory_assets.defs.models.resources import EndpointResource
    from factory_assets.storage.models import annotate_model, get_endpoint, register_model, set_checks

    model = small_model
    artifact = f"s3://{sm_config.bucket}/fa/models/byoc/job-1/output/model.tar.gz"
    register_model(fdb, model.model, dataset_version="d1", code_version="c1", trainer="sagemaker-byoc",
                   factory_id=FACTORY, camera_id="txt-cam")
    annotate_model(fdb, model.version, {"sagemaker": {"algorithm": "byoc", "image": BYOC_IMAGE,
                                                      "s3_artifact": artifact, "training_job_name": "job-1"}})
    set_checks(fdb, model.version, True, {})
    # the SageMaker runtime: our BYOC container's server on the model as SageMaker unpacks it
    paths = MLPaths(tmp_path / "opt_ml")
    model.model.save(paths.model_dir)
    runtime = start(paths, "127.0.0.1", 0)
    try:
        endpoint = EndpointResource(name=sm_config.endpoint_name, backend="sagemaker",
                                    sagemaker_endpoint_url=runtime.url, sagemaker=_sagemaker_resource(sm_config))
        _deploy_and_invoke(sm_config, fdb, mongo_uri, database_name, endpoint, model)
    finally:
        runtime.stop()


def _deploy_and_invoke(sm_config, fdb, mongo_uri, database_name, endpoint, model):
    from factory_assets.defs.models.assets import model_endpoint
    from factory_assets.storage.models import get_endpoint

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("factory", [FACTORY])
    result = dg.materialize([model_endpoint], resources=_resources(mongo_uri, database_name, endpoint),
                            partition_key=FACTORY, instance=instance)
    md = result.asset_materializations_for_node("model_endpoint")[0].metadata
    assert md["status"].value == "InService" and md["model_version"].value == model.version
    assert md["action"].value == "created" and md["instance_type"].value == "ml.m5.large"
    assert md["console"].value.endswith(f"#/endpoints/{sm_config.endpoint_name}")
    sm = sm_config.sagemaker_client()
    assert sm.describe_endpoint(EndpointName=sm_config.endpoint_name)["EndpointConfigName"] == md["endpoint_config"].value
    assert get_endpoint(fdb, sm_config.endpoint_name)["model_version"] == model.version
    # the live updater and stock_inferences use this predictor: invoke_endpoint, answered by our server
    import cv2
    import numpy as np

    ok, jpeg = cv2.imencode(".jpg", np.full((240, 320, 3), 100, np.uint8))
    prediction = predict_once(endpoint.predictor(), jpeg.tobytes())
    assert len(prediction.probabilities) == 3 and prediction.model_version == model.version


def test_the_environment_chooses_the_backend_and_its_settings_at_run_time(aws_env, fdb, mongo_uri, database_name,
                                                                         dagster_dataset, monkeypatch):
    from factory_assets.defs.models.assets import stock_model
    from factory_assets.defs.models.resources import EndpointResource
    from factory_assets.defs.models.sagemaker import backend_from_env

    monkeypatch.setenv("FACTORY_MODEL_BACKEND", "sagemaker")
    monkeypatch.setenv("FACTORY_SAGEMAKER_ROLE_ARN", ROLE)
    monkeypatch.setenv("FACTORY_SAGEMAKER_EPOCHS", "3")
    monkeypatch.setenv("FACTORY_SAGEMAKER_POLL_SECONDS", "0.5")
    monkeypatch.delenv("FACTORY_SAGEMAKER_BUCKET", raising=False)
    endpoint = EndpointResource(**backend_from_env())
    assert endpoint.sagemaker.poll_seconds == 0.5  # a float setting, given as its value (no EnvVar.float)
    instance = _instance_with_dataset(fdb, dagster_dataset, "dg-env")
    result = dg.materialize([stock_model], instance=instance, partition_key=FACTORY, raise_on_error=False,
                            resources=_resources(mongo_uri, database_name, endpoint))
    message = _failure(result)
    # the role came through dg.EnvVar; only the bucket is missing
    assert "FACTORY_SAGEMAKER_BUCKET" in message and "FACTORY_SAGEMAKER_ROLE_ARN" not in message


def test_retrain_on_sagemaker_byoc_trains_checks_deploys_and_serves_through_the_assets(
        sm_config, fdb, mongo_uri, database_name, dagster_dataset, tmp_path):
    from factory_assets.backends.sagemaker import SageMakerTrainer
    from factory_assets.container.paths import MLPaths
    from factory_assets.container.serve import start
    from factory_assets.defs.models.assets import model_endpoint, stock_model
    from factory_assets.defs.models.resources import EndpointResource
    from factory_assets_tests.backends.conftest import play_sagemaker_byoc_training

    # SageMaker's part, played before the run: the job the asset will ask for (same dataset,
    # image and seed, hence the same name) has run our container and left its artifact.
    sm_config.algorithm = "byoc"
    name = SageMakerTrainer(sm_config, dataset_version="dg-byoc").start(dagster_dataset, seed=0)
    play_sagemaker_byoc_training(sm_config, name, tmp_path / "sagemaker")

    sagemaker = _sagemaker_resource(sm_config, algorithm="byoc")
    endpoint = EndpointResource(name=sm_config.endpoint_name, backend="sagemaker", sagemaker=sagemaker)
    instance = _instance_with_dataset(fdb, dagster_dataset, "dg-byoc")
    result = dg.materialize([stock_model, model_endpoint], instance=instance, partition_key=FACTORY,
                            resources=_resources(mongo_uri, database_name, endpoint, min_per_label_accuracy=0.0))
    md = result.asset_materializations_for_node("stock_model")[0].metadata
    assert md["training_job"].value == name and md["backend"].value == "sagemaker (byoc)"
    assert md["instance_type"].value == "ml.m5.xlarge" and 0.0 <= md["per_label_accuracy"].value <= 1.0
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["per_label_accuracy_above_minimum"].passed and checks["no_regression_against_deployed_model"].passed
    # the warning counts the validation split that was trained on (its manifest), whatever the
    # dataset's record holds: here every one of its 6 images shows blue, so it warns
    from factory_assets.datasets.lst import read_lst

    valid = read_lst(dagster_dataset / "valid-annots" / "valid.lst")
    shown = {c: sum(r.present[c] for r in valid) for c in ("blue", "red", "white")}
    lacking = checks["validation_has_every_class"]
    assert {c: lacking.metadata[f"present_{c}"].value for c in shown} == shown and len(valid) == 6
    assert {c: lacking.metadata[f"absent_{c}"].value for c in shown} == {c: 6 - n for c, n in shown.items()}
    assert lacking.passed == all(0 < n < 6 for n in shown.values())
    assert lacking.passed or lacking.severity == dg.AssetCheckSeverity.WARN
    version = md["model_version"].value
    doc = fdb.models.find_one({"_id": version})
    assert doc["trainer"] == "sagemaker-byoc" and doc["metrics"]["valid"]["n_images"] == 6
    assert doc["sagemaker"]["s3_artifact"].endswith(f"/{name}/output/model.tar.gz")
    ep = result.asset_materializations_for_node("model_endpoint")[0].metadata
    assert ep["model_version"].value == version and ep["status"].value == "InService"

    # the deployed artifact, as SageMaker would unpack it into /opt/ml/model, answers invoke_endpoint
    from factory_assets.backends.sagemaker.trainer import download_artifact

    paths = MLPaths(tmp_path / "serving")
    download_artifact(sm_config.s3_client(), doc["sagemaker"]["s3_artifact"], paths.model_dir)
    runtime = start(paths, "127.0.0.1", 0)
    try:
        predictor = EndpointResource(name=sm_config.endpoint_name, backend="sagemaker",
                                     sagemaker_endpoint_url=runtime.url).predictor()
        image = sorted((dagster_dataset / "valid-imgs").rglob("*.jp*g"))[0].read_bytes()
        prediction = predictor.predict(image)
        assert prediction.model_version == version and len(prediction.probabilities) == 3
    finally:
        runtime.stop()


def test_a_failed_training_job_fails_stock_model_with_sagemakers_failure_reason(
        sm_config, fdb, mongo_uri, database_name, dagster_dataset, tmp_path):
    import logging

    from factory_assets.backends.sagemaker import SageMakerTrainer
    from factory_assets.container.paths import MLPaths
    from factory_assets.container.train import run
    from factory_assets.defs.models.assets import stock_model
    from factory_assets.defs.models.resources import EndpointResource

    # The job is running when the asset attaches to it; it then fails the way our container
    # fails (its /opt/ml/output/failure becomes the job's FailureReason), as SageMaker would report.
    sm_config.algorithm = "byoc"
    name = SageMakerTrainer(sm_config, dataset_version="dg-fail").start(dagster_dataset, seed=0)
    moto_training_job(name).training_job_status = "InProgress"
    paths = MLPaths(tmp_path / "opt_ml")
    assert run(paths) == 1
    reason = paths.failure.read_text()

    class FailTheJobOnAttach(logging.Handler):
        def emit(self, record):
            if f"training job {name} already exists" in record.getMessage():
                job = moto_training_job(name)
                job.training_job_status, job.failure_reason = "Failed", reason

    handler = FailTheJobOnAttach()
    jobs_logger = logging.getLogger("factory_assets.backends.sagemaker.jobs")
    jobs_logger.addHandler(handler)
    jobs_logger.setLevel(logging.INFO)
    try:
        endpoint = EndpointResource(name=sm_config.endpoint_name, backend="sagemaker",
                                    sagemaker=_sagemaker_resource(sm_config, algorithm="byoc",
                                                                  training_timeout_seconds=10))
        instance = _instance_with_dataset(fdb, dagster_dataset, "dg-fail")
        result = dg.materialize([stock_model], instance=instance, partition_key=FACTORY, raise_on_error=False,
                                resources=_resources(mongo_uri, database_name, endpoint))
    finally:
        jobs_logger.removeHandler(handler)
        jobs_logger.setLevel(logging.NOTSET)
    assert not result.success
    message = _failure(result)
    assert f"SageMaker training job {name} failed: ChannelError: channel 'train' is missing" in message
    assert fdb.models.count_documents({}) == 0
