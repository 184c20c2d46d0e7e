"""``factory-assets sagemaker train|deploy|status`` against moto and the real MongoDB."""
from __future__ import annotations

import json

import pytest

from factory_assets_tests.backends.conftest import ROLE


@pytest.fixture
def sm_env(sm_config, monkeypatch):
    monkeypatch.setenv("FACTORY_SAGEMAKER_ROLE_ARN", ROLE)
    monkeypatch.setenv("FACTORY_SAGEMAKER_BUCKET", sm_config.bucket)
    monkeypatch.setenv("FACTORY_SAGEMAKER_PREFIX", "cli")
    monkeypatch.setenv("FACTORY_SAGEMAKER_ENDPOINT_NAME", sm_config.endpoint_name)
    monkeypatch.setenv("FACTORY_SAGEMAKER_ENDPOINT_URL", sm_config.sagemaker_endpoint_url)
    monkeypatch.setenv("FACTORY_S3_ENDPOINT_URL", sm_config.s3_endpoint_url)
    monkeypatch.setenv("FACTORY_SAGEMAKER_POLL_SECONDS", "0.01")  # moto shows an update as Updating once
    return sm_config


@pytest.fixture(scope="module")
def cli_dataset(tmp_path_factory):
    from factory_assets.simulation.datasets import write_simulated_dataset

    return write_simulated_dataset(tmp_path_factory.mktemp("cli") / "dataset", n_train=20, n_valid=6, seed=5)


def _json_tail(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_train_registers_a_builtin_model_and_deploy_serves_it(sm_env, cli_dataset, fdb, capsys):
    from factory_assets.cli import main

    assert main(["sagemaker", "train", "--dataset", str(cli_dataset), "--algorithm", "builtin"]) == 0
    trained = _json_tail(capsys.readouterr().out)
    assert trained["status"] == "Completed" and trained["algorithm"] == "builtin"
    doc = fdb.models.find_one({"_id": trained["model_version"]})
    assert doc["trainer"] == "sagemaker-builtin" and doc["sagemaker"]["training_job_name"] == trained["training_job"]

    assert main(["sagemaker", "deploy", trained["model_version"]]) == 0
    state = _json_tail(capsys.readouterr().out)
    assert state["status"] == "InService" and state["action"] == "created"
    desc = sm_env.sagemaker_client().describe_endpoint(EndpointName=sm_env.endpoint_name)
    model = sm_env.sagemaker_client().describe_model(ModelName=state["model_name"])
    assert desc["EndpointConfigName"] == state["config"]
    assert model["PrimaryContainer"]["Image"].endswith("/image-classification:1")

    # moto 5 cuts MaxResults from its oldest jobs before it filters (and never sorts): the session's
    # moto holds the jobs of every test before this one, so ask for all of them
    assert main(["sagemaker", "status", "--limit", "100"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["endpoint"]["status"] == "InService"
    assert trained["training_job"] in [j["name"] for j in status["training_jobs"]]
    assert "123456789012" not in json.dumps(status)


def test_train_without_a_role_is_a_one_line_error(aws_env, cli_dataset, monkeypatch, capsys):
    from factory_assets.cli import main

    monkeypatch.delenv("FACTORY_SAGEMAKER_ROLE_ARN", raising=False)
    monkeypatch.delenv("FACTORY_SAGEMAKER_BUCKET", raising=False)
    assert main(["sagemaker", "train", "--dataset", str(cli_dataset)]) == 1
    assert "SageMaker is not configured" in capsys.readouterr().err


def test_the_live_path_predictor_follows_the_backend_setting():
    from factory_assets.backends import predictor_from_env
    from factory_assets.serving.predictor import HttpEndpointPredictor, SageMakerRuntimePredictor

    assert isinstance(predictor_from_env("http://127.0.0.1:8080", {}), HttpEndpointPredictor)
    sm = predictor_from_env("http://127.0.0.1:8080", {"FACTORY_MODEL_BACKEND": "sagemaker",
                                                      "FACTORY_SAGEMAKER_ENDPOINT_NAME": "stock-x",
                                                      "FACTORY_SAGEMAKER_REGION": "eu-west-1"})
    assert isinstance(sm, SageMakerRuntimePredictor) and (sm.endpoint_name, sm.region) == ("stock-x", "eu-west-1")
    with pytest.raises(ValueError, match="unknown model backend 'aws'"):
        predictor_from_env("http://127.0.0.1:8080", {"FACTORY_MODEL_BACKEND": "aws"})


def test_rollback_without_a_previous_version_says_so(sm_env, fdb, capsys):
    from factory_assets.cli import main

    assert main(["sagemaker", "rollback"]) == 1
    assert "has no previous version to roll back to" in capsys.readouterr().err


A, B = "a" * 16, "b" * 16


def _register(fdb, *versions):
    from factory_assets.storage.models import register_external_model

    for v in versions:
        register_external_model(fdb, v, dataset_version="d", code_version="c", trainer="sagemaker-builtin",
                                classes=("blue", "red", "white"), thresholds={"blue": 0.5, "red": 0.5, "white": 0.5})



def test_endpoint_rollback_of_a_sagemaker_endpoint_goes_to_sagemaker_not_only_the_registry(sm_env, fdb, capsys):
    # the registry alone could roll back (a previous version is recorded), but the SageMaker endpoint has
    # no config for it: the SageMaker path says so, and the registry is left as it was
    from factory_assets.backends.sagemaker.registry import record_deployment
    from factory_assets.cli import main

    _register(fdb, A, B)
    record_deployment(fdb, sm_env.endpoint_name, A, {"status": "InService"})
    record_deployment(fdb, sm_env.endpoint_name, B, {"status": "InService"})
    assert main(["endpoint", "rollback", "--name", sm_env.endpoint_name]) == 1
    assert "nothing to roll back to" in capsys.readouterr().err
    doc = fdb.endpoints.find_one({"name": sm_env.endpoint_name})
    assert doc["model_version"] == B and doc["previous_versions"] == [A]


def test_endpoint_rollback_of_a_local_endpoint_moves_the_registry_only(fdb, capsys):
    from factory_assets.cli import main
    from factory_assets.storage.models import set_endpoint_version

    _register(fdb, A, B)
    set_endpoint_version(fdb, "local-stock", A)
    set_endpoint_version(fdb, "local-stock", B)
    assert main(["endpoint", "rollback", "--name", "local-stock"]) == 0
    assert f"{B} -> {A}" in capsys.readouterr().out
    assert fdb.endpoints.find_one({"name": "local-stock"})["model_version"] == A


def test_endpoint_rollback_returns_the_sagemaker_endpoint_to_the_previous_config(sm_env, fdb, capsys):
    from factory_assets.backends.sagemaker import deploy
    from factory_assets.backends.sagemaker.registry import record_deployment
    from factory_assets.cli import main
    from factory_assets_tests.backends.conftest import BYOC_IMAGE

    _register(fdb, A, B)
    sm = sm_env.sagemaker_client()
    first = deploy(sm, sm_env, version=A, image=BYOC_IMAGE, model_data_url="s3://b/a/model.tar.gz", poll=0.01)
    record_deployment(fdb, sm_env.endpoint_name, A, first)
    second = deploy(sm, sm_env, version=B, image=BYOC_IMAGE, model_data_url="s3://b/b/model.tar.gz", poll=0.01)
    record_deployment(fdb, sm_env.endpoint_name, B, second)
    assert main(["endpoint", "rollback", "--name", sm_env.endpoint_name]) == 0
    state = _json_tail(capsys.readouterr().out)
    assert state["config"] == first["config"]
    assert sm.describe_endpoint(EndpointName=sm_env.endpoint_name)["EndpointConfigName"] == first["config"]
    assert fdb.endpoints.find_one({"name": sm_env.endpoint_name})["model_version"] == A
