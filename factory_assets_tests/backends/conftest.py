"""AWS for the backend tests: moto in server mode on 127.0.0.1 (S3 and the SageMaker
control plane, with ``UpdateEndpoint`` added where moto lacks it: ``moto_sagemaker``),
reached over HTTP by the real boto3 clients of the code under test, and our own
inference server as the SageMaker runtime."""
from __future__ import annotations

import uuid

import pytest

ACCOUNT = "123456789012"
REGION = "us-east-1"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/factory-sagemaker"
BYOC_IMAGE = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/factory-stock:1"


@pytest.fixture(scope="session")
def moto_url():
    from moto.server import ThreadedMotoServer

    from factory_assets_tests.backends.moto_sagemaker import add_update_endpoint

    add_update_endpoint()  # moto 5.2.5 has no UpdateEndpoint: blue/green and rollback need it
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """Dummy credentials only, and no profile or instance metadata to fall back on."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def sm_config(moto_url, aws_env):
    """A configuration pointed at moto, with its own bucket and endpoint name, polling fast."""
    import boto3

    from factory_assets.backends.sagemaker import SageMakerConfig

    suffix = uuid.uuid4().hex[:8]
    cfg = SageMakerConfig(region=REGION, role_arn=ROLE, bucket=f"factory-test-{suffix}", prefix="fa",
                          endpoint_name=f"factory-stock-{suffix}", byoc_image_uri=BYOC_IMAGE,
                          poll_seconds=0.01, training_timeout_seconds=30, endpoint_timeout_seconds=30,
                          sagemaker_endpoint_url=moto_url, s3_endpoint_url=moto_url)
    boto3.client("s3", region_name=REGION, endpoint_url=moto_url).create_bucket(Bucket=cfg.bucket)
    return cfg


def moto_training_job(name: str):
    """The moto server's own record of a training job: tests set its outcome here, the
    part SageMaker plays (moto marks every job Completed at once)."""
    from moto.sagemaker.models import sagemaker_backends

    return sagemaker_backends[ACCOUNT][REGION].training_jobs[name]


def play_sagemaker_byoc_training(cfg, job_name: str, work) -> str:
    """Do what SageMaker does for a byoc job: download the job's channels from the
    (moto) bucket into an /opt/ml-shaped folder, run our container's ``train`` entry
    point, and upload ``model.tar.gz`` to the ``S3ModelArtifacts`` path moto reports."""
    import json

    from factory_assets.backends.sagemaker.trainer import pack_model_dir, split_s3_uri
    from factory_assets.container.paths import MLPaths
    from factory_assets.container.train import run

    sm, s3 = cfg.sagemaker_client(), cfg.s3_client()
    desc = sm.describe_training_job(TrainingJobName=job_name)
    paths = MLPaths(work / "opt_ml")
    paths.hyperparameters.parent.mkdir(parents=True)
    paths.hyperparameters.write_text(json.dumps(desc["HyperParameters"]))
    for channel in desc["InputDataConfig"]:
        bucket, prefix = split_s3_uri(channel["DataSource"]["S3DataSource"]["S3Uri"])
        dest = paths.channel(channel["ChannelName"])
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                target = dest / obj["Key"][len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, obj["Key"], str(target))
    assert run(paths) == 0, (paths.failure.read_text() if paths.failure.exists() else "train failed")
    archive = pack_model_dir(paths.model_dir, work / "model.tar.gz")
    bucket, key = split_s3_uri(desc["ModelArtifacts"]["S3ModelArtifacts"])
    s3.upload_file(str(archive), bucket, key)
    return desc["ModelArtifacts"]["S3ModelArtifacts"]


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    """A real model, trained quickly on a few simulated frames (its quality is not under test here)."""
    from factory_assets.backends.local import LocalBackendTrainer
    from factory_assets.simulation.datasets import write_simulated_dataset

    root = tmp_path_factory.mktemp("small_model")
    dataset = write_simulated_dataset(root / "dataset", n_train=24, n_valid=6, seed=7)
    return LocalBackendTrainer(n_augment=2).train(dataset, root / "model", seed=0)
