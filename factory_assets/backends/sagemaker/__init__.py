"""The SageMaker backend: training jobs (built-in algorithm or our own container),
endpoints (deploy, blue/green update, rollback, status) and the registry record.
Everything AWS goes through boto3 (credentials from the AWS default chain); the
SageMaker SDK (v3) is used only to look up the built-in algorithm's image."""
from factory_assets.backends.sagemaker.config import SageMakerConfig, SageMakerConfigError, redact
from factory_assets.backends.sagemaker.deploy import (EndpointFailed, EndpointTimeout, deploy, deploy_multi_model,
                                                     list_target_models, remove_target_model, rollback,
                                                     upload_target_model)
from factory_assets.backends.sagemaker.jobs import TrainingJobFailed, TrainingJobTimeout
from factory_assets.backends.sagemaker.trainer import SageMakerTrainer, SageMakerTrainResult

__all__ = ["SageMakerConfig", "SageMakerConfigError", "SageMakerTrainer", "SageMakerTrainResult", "TrainingJobFailed",
           "TrainingJobTimeout", "EndpointFailed", "EndpointTimeout", "deploy", "rollback", "redact", "deploy_multi_model",
           "upload_target_model", "remove_target_model", "list_target_models"]
