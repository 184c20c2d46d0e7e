"""Our model through SageMaker end to end: the BYOC job request, SageMaker's part
played honestly (our container's ``train`` on the channels from the moto bucket, the
artifact uploaded where moto says), the registry record, the endpoint created on moto,
and predictions through ``invoke_endpoint`` answered by our container's server."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from factory_assets_tests.backends.conftest import BYOC_IMAGE, play_sagemaker_byoc_training


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    from factory_assets.simulation.datasets import write_simulated_dataset

    return write_simulated_dataset(tmp_path_factory.mktemp("byoc") / "dataset", n_train=60, n_valid=12, seed=4)


def test_our_model_trains_in_the_byoc_container_registers_deploys_and_answers(
        sm_config, small_dataset, tmp_path, fdb):
    from factory_assets.backends.sagemaker import SageMakerTrainer, deploy
    from factory_assets.backends.sagemaker.registry import model_image, record_deployment, record_model
    from factory_assets.container.paths import MLPaths
    from factory_assets.container.serve import start
    from factory_assets.storage.models import get_endpoint, get_model

    sm_config.algorithm = "byoc"
    trainer = SageMakerTrainer(sm_config, dataset_version="byoc1")
    name = trainer.start(small_dataset, seed=2)
    desc = sm_config.sagemaker_client().describe_training_job(TrainingJobName=name)
    assert desc["AlgorithmSpecification"]["TrainingImage"] == BYOC_IMAGE
    assert desc["HyperParameters"] == {"seed": "2"}
    assert desc["ResourceConfig"]["InstanceType"] == "ml.m5.xlarge"
    assert [c["ChannelName"] for c in desc["InputDataConfig"]] == ["train", "validation", "train_lst", "validation_lst"]

    artifact = play_sagemaker_byoc_training(sm_config, name, tmp_path)
    result = trainer.finish(name, tmp_path / "downloaded")
    assert result.model is not None and result.algorithm == "byoc"
    assert result.version == result.model.version and result.metrics["seed"] == 2
    evaluation = json.loads((result.model_dir / "evaluation.json").read_text())
    assert evaluation["valid"]["n_images"] == 12  # the container evaluated on the validation channel

    record_model(fdb, result, dataset_version="byoc1", code_version="c1", metrics={"valid": evaluation["valid"]},
                 region=sm_config.region)
    doc = get_model(fdb, result.version)
    assert doc["trainer"] == "sagemaker-byoc" and doc["dataset_version"] == "byoc1"
    assert doc["sagemaker"]["training_job_name"] == name and doc["sagemaker"]["s3_artifact"] == artifact
    assert doc["sagemaker"]["training_job_arn"].endswith(name) and doc["sagemaker"]["instance_type"] == "ml.m5.xlarge"
    assert "billable_seconds" in doc["sagemaker"]

    state = deploy(sm_config.sagemaker_client(), sm_config, version=result.version,
                   image=model_image(doc, sm_config), model_data_url=artifact, poll=0.01)
    assert state["action"] == "created" and state["status"] == "InService" and state["previous_config"] is None
    assert "123456789012" not in state["arn"]
    sm = sm_config.sagemaker_client()
    model_desc = sm.describe_model(ModelName=state["model_name"])
    assert model_desc["PrimaryContainer"]["Image"] == BYOC_IMAGE
    assert model_desc["PrimaryContainer"]["ModelDataUrl"] == artifact
    cfg_desc = sm.describe_endpoint_config(EndpointConfigName=state["config"])
    assert cfg_desc["ProductionVariants"][0]["InstanceType"] == "ml.m5.large"
    record_deployment(fdb, sm_config.endpoint_name, result.version, state)
    ep = get_endpoint(fdb, sm_config.endpoint_name)
    assert ep["model_version"] == result.version and ep["status"] == "InService" and ep["backend"] == "sagemaker"

    # deploying the same version again changes nothing
    again = deploy(sm, sm_config, version=result.version, image=BYOC_IMAGE, model_data_url=artifact, poll=0.01)
    assert again["action"] == "unchanged" and again["config"] == state["config"]

    # the runtime: our container's serve entry point on the model SageMaker would unpack into /opt/ml/model
    paths = MLPaths(tmp_path / "serving")
    paths.model_dir.parent.mkdir(parents=True)
    result.model_dir.rename(paths.model_dir)
    server = start(paths, "127.0.0.1", 0)
    try:
        sm_config.runtime_endpoint_url = server.url
        predictor = sm_config.predictor()
        image = sorted((small_dataset / "valid-imgs").rglob("*.jp*g"))[0].read_bytes()
        prediction = predictor.predict(image)
        assert len(prediction.probabilities) == 3 and prediction.model_version == result.version
        assert all(0.0 <= p <= 1.0 for p in prediction.probabilities)
        assert prediction.probabilities == pytest.approx(result.model.predict_proba_bytes(image))
    finally:
        server.stop()


def test_the_train_entry_point_writes_the_failure_reason_when_a_channel_is_missing(tmp_path):
    from factory_assets.container.paths import MLPaths
    from factory_assets.container.train import run

    paths = MLPaths(tmp_path / "opt_ml")
    paths.hyperparameters.parent.mkdir(parents=True)
    paths.hyperparameters.write_text(json.dumps({"seed": "0"}))
    assert run(paths) == 1
    assert paths.failure.read_text() == f"ChannelError: channel 'train' is missing ({paths.channel('train')})"


def test_hyperparameters_that_are_not_strings_break_the_contract(tmp_path):
    from factory_assets.container.paths import MLPaths
    from factory_assets.container.train import run

    paths = MLPaths(tmp_path / "opt_ml")
    paths.hyperparameters.parent.mkdir(parents=True)
    paths.hyperparameters.write_text(json.dumps({"seed": 0}))
    assert run(paths) == 1
    assert "expected an object of string values" in paths.failure.read_text()


def test_the_serve_entry_point_answers_the_contract_and_stops_on_sigterm(small_model, tmp_path):
    import signal
    import urllib.request

    root = tmp_path / "opt_ml"
    small_model.model.save(root / "model")
    env = {**os.environ, "SM_ML_ROOT": str(root), "SAGEMAKER_BIND_TO_PORT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "factory_assets.container", "serve"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()  # "serving VERSION on URL" once it listens
        assert line.startswith(f"serving {small_model.version} on http://127.0.0.1:"), line
        url = line.rsplit(" ", 1)[1].strip()
        with urllib.request.urlopen(f"{url}/ping", timeout=10) as r:
            assert r.status == 200 and r.headers["X-Model-Version"] == small_model.version
        import cv2
        import numpy as np

        ok, jpeg = cv2.imencode(".jpg", np.full((240, 320, 3), 90, np.uint8))
        req = urllib.request.Request(f"{url}/invocations", data=jpeg.tobytes(),
                                     headers={"Content-Type": "application/x-image"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert len(json.loads(r.read())) == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert proc.stdout.read().strip() == "stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_second_version_updates_the_endpoint_blue_green_and_rolls_back(sm_config):
    from factory_assets.backends.sagemaker import deploy, rollback

    sm = sm_config.sagemaker_client()
    seen: list[str] = []
    first = deploy(sm, sm_config, version="a" * 16, image=BYOC_IMAGE, model_data_url="s3://b/a/model.tar.gz", poll=0.01)
    second = deploy(sm, sm_config, version="b" * 16, image=BYOC_IMAGE, model_data_url="s3://b/b/model.tar.gz",
                    poll=0.01, log=seen.append)
    assert second["action"] == "updated" and second["previous_config"] == first["config"]
    assert second["config"] != first["config"] and second["status"] == "InService"
    # the deployment waited through SageMaker's Updating state rather than returning mid-update
    assert any("Updating" in line for line in seen) and "InService" in seen[-1]
    variants = sm.describe_endpoint(EndpointName=sm_config.endpoint_name)["ProductionVariants"]
    assert [v["VariantName"] for v in variants] == ["AllTraffic"]
    assert deploy(sm, sm_config, version="b" * 16, image=BYOC_IMAGE, model_data_url="s3://b/b/model.tar.gz",
                  poll=0.01)["action"] == "unchanged"
    back = rollback(sm, sm_config, "a" * 16, poll=0.01)
    assert back["config"] == first["config"] and back["status"] == "InService"
    assert sm.describe_endpoint(EndpointName=sm_config.endpoint_name)["EndpointConfigName"] == first["config"]
