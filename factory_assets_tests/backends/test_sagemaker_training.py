"""Training on SageMaker against moto: the exact requests SageMaker receives, idempotent
re-runs, failures, timeouts and configuration errors before any AWS call."""
from __future__ import annotations

import socket

import pytest

from factory_assets_tests.backends.conftest import BYOC_IMAGE, ROLE, moto_training_job


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    from factory_assets.simulation.datasets import write_simulated_dataset

    return write_simulated_dataset(tmp_path_factory.mktemp("sm") / "dataset", n_train=40, n_valid=12, seed=3)


def test_the_builtin_algorithm_job_is_the_original_notebooks_request(sm_config, small_dataset):
    from factory_assets.backends.sagemaker import SageMakerTrainer
    from factory_assets.backends.sagemaker.jobs import num_training_samples

    trainer = SageMakerTrainer(sm_config, algorithm="builtin", dataset_version="v1")
    name = trainer.start(small_dataset)
    desc = sm_config.sagemaker_client().describe_training_job(TrainingJobName=name)

    base = f"s3://{sm_config.bucket}/fa/datasets/v1"
    assert [(c["ChannelName"], c["DataSource"]["S3DataSource"]["S3Uri"], c["ContentType"])
            for c in desc["InputDataConfig"]] == [
        ("train", f"{base}/train-imgs/", "application/x-image"),
        ("validation", f"{base}/valid-imgs/", "application/x-image"),
        ("train_lst", f"{base}/train-annots/", "application/x-image"),
        ("validation_lst", f"{base}/valid-annots/", "application/x-image")]
    assert desc["HyperParameters"] == {
        "num_classes": "3", "multi_label": "1", "image_shape": "3,240,320", "num_layers": "18",
        "use_pretrained_model": "1", "num_training_samples": str(num_training_samples(small_dataset)),
        "epochs": "10", "mini_batch_size": "8"}
    assert num_training_samples(small_dataset) == 40
    assert desc["AlgorithmSpecification"]["TrainingImage"] == \
        "811284229777.dkr.ecr.us-east-1.amazonaws.com/image-classification:1"
    assert desc["AlgorithmSpecification"]["TrainingInputMode"] == "File"
    assert desc["OutputDataConfig"]["S3OutputPath"] == f"s3://{sm_config.bucket}/fa/models/builtin"
    assert desc["ResourceConfig"]["InstanceType"] == "ml.g4dn.xlarge"
    assert desc["RoleArn"] == ROLE
    # the dataset really is in the bucket, manifests included, under the layout the channels name
    s3 = sm_config.s3_client()
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=sm_config.bucket, Prefix="fa/datasets/v1/")["Contents"]}
    assert "fa/datasets/v1/train-annots/train.lst" in keys and "fa/datasets/v1/valid-annots/valid.lst" in keys
    assert not [k for k in keys if ".staging-" in k]


def test_the_training_instance_type_is_configurable(sm_config, small_dataset):
    from factory_assets.backends.sagemaker import SageMakerTrainer

    sm_config.training_instance_type = "ml.p3.2xlarge"
    name = SageMakerTrainer(sm_config, algorithm="builtin", dataset_version="v2").start(small_dataset)
    desc = sm_config.sagemaker_client().describe_training_job(TrainingJobName=name)
    assert desc["ResourceConfig"]["InstanceType"] == "ml.p3.2xlarge"


def test_running_the_same_training_twice_attaches_to_the_first_job(sm_config, small_dataset):
    from factory_assets.backends.sagemaker import SageMakerTrainer

    first = SageMakerTrainer(sm_config, algorithm="builtin", dataset_version="v3").start(small_dataset)
    second = SageMakerTrainer(sm_config, algorithm="builtin", dataset_version="v3").start(small_dataset)
    assert first == second


def test_a_failed_job_is_retried_under_a_new_name_when_started_again(sm_config, small_dataset):
    from factory_assets.backends.sagemaker import SageMakerTrainer

    first = SageMakerTrainer(sm_config, algorithm="builtin", dataset_version="v4").start(small_dataset)
    moto_training_job(first).training_job_status = "Failed"
    second = SageMakerTrainer(sm_config, algorithm="builtin", dataset_version="v4").start(small_dataset)
    assert second == f"{first}-r1"


def test_a_finished_builtin_job_gives_a_registry_record_with_job_details(sm_config, small_dataset, tmp_path):
    from factory_assets.backends.sagemaker import SageMakerTrainer

    result = SageMakerTrainer(sm_config, algorithm="builtin", dataset_version="v5").train(small_dataset, tmp_path)
    assert result.model is None and result.version.startswith("sm-") and result.algorithm == "builtin"
    job = result.job
    assert job["status"] == "Completed" and job["instance_type"] == "ml.g4dn.xlarge"
    assert job["s3_artifact"] == f"s3://{sm_config.bucket}/fa/models/builtin/{job['training_job_name']}/output/model.tar.gz"
    assert job["training_job_arn"].endswith(f":training-job/{job['training_job_name']}")
    assert job["console_url"].startswith("https://us-east-1.console.aws.amazon.com/sagemaker/")
    assert job["estimated_cost_usd"] is not None


def test_a_failed_job_raises_with_sagemakers_failure_reason(sm_config, small_dataset, tmp_path):
    from factory_assets.backends.sagemaker import SageMakerTrainer, TrainingJobFailed

    trainer = SageMakerTrainer(sm_config, algorithm="builtin", dataset_version="v6")
    name = trainer.start(small_dataset)
    job = moto_training_job(name)
    job.training_job_status = "Failed"
    job.failure_reason = "ClientError: num_training_samples is larger than the number of images"
    with pytest.raises(TrainingJobFailed, match="num_training_samples is larger") as info:
        trainer.finish(name, tmp_path)
    assert info.value.name == name and "failed" in str(info.value)


def test_a_job_that_never_finishes_times_out_with_a_clear_message(sm_config, small_dataset, tmp_path):
    from factory_assets.backends.sagemaker import SageMakerTrainer, TrainingJobTimeout

    trainer = SageMakerTrainer(sm_config, algorithm="builtin", dataset_version="v7")
    name = trainer.start(small_dataset)
    moto_training_job(name).training_job_status = "InProgress"
    moto_training_job(name).secondary_status = "Training"
    with pytest.raises(TrainingJobTimeout, match=rf"{name} did not finish within 0.05 s .*InProgress / Training.*"
                                                 r"stop-training-job"):
        trainer.finish(name, tmp_path, timeout=0.05, poll=0.01)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_role_and_bucket_fail_before_any_aws_call(aws_env, small_dataset):
    from factory_assets.backends.sagemaker import SageMakerConfig, SageMakerConfigError, SageMakerTrainer

    # Nothing listens on these URLs: an AWS call would fail with a connection error instead.
    dead = f"http://127.0.0.1:{_closed_port()}"
    cfg = SageMakerConfig(sagemaker_endpoint_url=dead, s3_endpoint_url=dead, poll_seconds=0.01)
    with pytest.raises(SageMakerConfigError) as info:
        SageMakerTrainer(cfg, algorithm="builtin").start(small_dataset)
    assert "FACTORY_SAGEMAKER_ROLE_ARN" in str(info.value) and "FACTORY_SAGEMAKER_BUCKET" in str(info.value)


def test_byoc_without_an_image_and_a_malformed_role_are_refused(aws_env):
    from factory_assets.backends.sagemaker import SageMakerConfig, SageMakerConfigError

    cfg = SageMakerConfig(role_arn="my-role", bucket="factory-bucket", algorithm="byoc")
    with pytest.raises(SageMakerConfigError) as info:
        cfg.validate()
    assert "not an IAM role ARN" in str(info.value) and "FACTORY_SAGEMAKER_BYOC_IMAGE_URI" in str(info.value)


def test_settings_come_from_the_environment_and_account_ids_are_masked():
    from factory_assets.backends.sagemaker import SageMakerConfig, redact

    cfg = SageMakerConfig.from_env({"FACTORY_SAGEMAKER_ROLE_ARN": ROLE, "FACTORY_SAGEMAKER_BUCKET": "factory-bucket",
                                    "FACTORY_SAGEMAKER_ALGORITHM": "byoc", "FACTORY_SAGEMAKER_EPOCHS": "3",
                                    "FACTORY_SAGEMAKER_BYOC_IMAGE_URI": BYOC_IMAGE, "AWS_REGION": "eu-central-1"})
    assert (cfg.role_arn, cfg.bucket, cfg.algorithm, cfg.epochs, cfg.region) == \
        (ROLE, "factory-bucket", "byoc", 3, "eu-central-1")
    assert cfg.training_instance() == "ml.m5.xlarge"
    view = cfg.public_view()
    assert "123456789012" not in str(view) and view["role_arn"] == "arn:aws:iam::************:role/factory-sagemaker"
    assert redact(BYOC_IMAGE) == "************.dkr.ecr.us-east-1.amazonaws.com/factory-stock:1"
