"""The SageMaker backend in Dagster: a typed ``SageMakerResource`` (bound with
``dg.EnvVar`` in ``definitions.py``) and the SageMaker paths of ``stock_model`` and
``model_endpoint``, which the assets take when ``EndpointResource.backend`` is
``sagemaker`` (``FACTORY_MODEL_BACKEND``). Logic lives in ``factory_assets.backends``;
this module turns its results and errors into Dagster metadata and failures."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import dagster as dg
from pydantic import Field

from factory_assets.backends.sagemaker.config import BACKEND_ENV, ENV, SageMakerConfig
from factory_assets.vocabulary import DEFAULT_ENDPOINT


class SageMakerResource(dg.ConfigurableResource):
    """Where and how to train and serve on AWS SageMaker. Credentials come from the
    AWS default chain (never configured here)."""

    region: str = Field(default="us-east-1")
    role_arn: Optional[str] = Field(default=None, description="IAM execution role SageMaker assumes")
    bucket: Optional[str] = Field(default=None, description="S3 bucket for datasets and model artifacts")
    prefix: str = Field(default="factory-assets", description="key prefix inside the bucket")
    training_instance_type: Optional[str] = Field(default=None, description="default: ml.g4dn.xlarge (builtin), "
                                                                            "ml.m5.xlarge (byoc)")
    inference_instance_type: str = "ml.m5.large"
    endpoint_name: str = DEFAULT_ENDPOINT
    algorithm: str = Field(default="builtin", description="builtin | byoc")
    byoc_image_uri: Optional[str] = Field(default=None, description="ECR image built from the repo's Dockerfile")
    epochs: int = 10
    mini_batch_size: int = 8
    training_timeout_seconds: float = 4 * 3600
    endpoint_timeout_seconds: float = 1800
    poll_seconds: float = 30.0
    sagemaker_endpoint_url: Optional[str] = Field(default=None, description="tests only (moto)")
    s3_endpoint_url: Optional[str] = Field(default=None, description="tests only (moto)")
    runtime_endpoint_url: Optional[str] = Field(default=None, description="tests only (our server)")

    def to_config(self) -> SageMakerConfig:
        names = set(SageMakerConfig.__dataclass_fields__)
        return SageMakerConfig(**{k: getattr(self, k) for k in type(self).model_fields if k in names})


def sagemaker_resource_from_env() -> SageMakerResource:
    """Each setting bound with ``dg.EnvVar`` when its variable is set (the UI shows the
    variable, not its value), the default otherwise."""
    fields = SageMakerResource.model_fields
    bound = {name: dg.EnvVar.int(var) if fields[name].annotation is int else dg.EnvVar(var)
             for name, var in ENV.items() if name in fields and os.environ.get(var)}
    if "region" not in bound:
        for var in ("AWS_REGION", "AWS_DEFAULT_REGION"):
            if os.environ.get(var):
                bound["region"] = dg.EnvVar(var)
                break
    return SageMakerResource(**bound)


def backend_from_env() -> dict:
    """``EndpointResource`` settings for the chosen backend (``FACTORY_MODEL_BACKEND``)."""
    out: dict = {"sagemaker": sagemaker_resource_from_env()}
    if os.environ.get(BACKEND_ENV):
        out["backend"] = dg.EnvVar(BACKEND_ENV)
    if os.environ.get(ENV["runtime_endpoint_url"]):
        out["sagemaker_endpoint_url"] = dg.EnvVar(ENV["runtime_endpoint_url"])
    if os.environ.get(ENV["region"]):
        out["region"] = dg.EnvVar(ENV["region"])
    if os.environ.get(ENV["endpoint_name"]):
        out["name"] = dg.EnvVar(ENV["endpoint_name"])
    return out


def _config(endpoint) -> SageMakerConfig:
    """The endpoint's SageMaker settings, validated before any AWS call."""
    from factory_assets.backends.sagemaker import SageMakerConfigError

    cfg = endpoint.sagemaker.to_config() if endpoint.sagemaker is not None else SageMakerConfig.from_env()
    try:
        return cfg.validate(training=True)
    except SageMakerConfigError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc


def _job_metadata(job: dict) -> dict:
    from factory_assets.backends.sagemaker import redact

    return {
        "training_job": dg.MetadataValue.text(job["training_job_name"]),
        "training_job_status": dg.MetadataValue.text(str(job["status"])),
        "training_job_transitions": dg.MetadataValue.text(" -> ".join(job["transitions"]) or str(job["status"])),
        "training_job_console": dg.MetadataValue.url(job["console_url"]),
        "training_job_arn": dg.MetadataValue.text(redact(job["training_job_arn"])),
        "s3_artifact": dg.MetadataValue.text(redact(job["s3_artifact"])),
        "billable_seconds": dg.MetadataValue.int(int(job["billable_seconds"])),
        "instance_type": dg.MetadataValue.text(job["instance_type"]),
        "estimated_cost_usd": dg.MetadataValue.float(float(job["estimated_cost_usd"] or 0.0)),
        "hyperparameters": dg.MetadataValue.json(job["hyperparameters"]),
    }


def sagemaker_stock_model(context: dg.AssetExecutionContext, fdb, endpoint, model_policy, dataset: dict,
                          checks: tuple[str, str], extra_metadata: dict | None = None) -> dg.MaterializeResult:
    """``stock_model`` on SageMaker: train (built-in or byoc), evaluate, register, check.
    ``extra_metadata`` (which dataset, the seed) is added to the materialization's."""
    from factory_assets.backends.sagemaker import SageMakerTrainer, TrainingJobFailed, TrainingJobTimeout
    from factory_assets.backends.sagemaker.registry import record_model
    from factory_assets.serving.models import load_model
    from factory_assets.storage.models import get_endpoint, get_model, set_checks
    from factory_assets.vision.version import code_version

    accuracy_check, regression_check = checks
    cfg = _config(endpoint)
    dataset_dir = Path(dataset["path"])
    trainer = SageMakerTrainer(cfg, dataset_version=str(dataset["version"]), dataset_s3_uri=dataset.get("s3_uri"),
                               log=context.log.info)
    with tempfile.TemporaryDirectory(prefix="sagemaker-model-") as out:
        try:
            result = trainer.train(dataset_dir, Path(out), seed=model_policy.seed)
        except TrainingJobFailed as exc:
            raise dg.Failure(str(exc), metadata={"training_job": exc.name, "failure_reason": exc.reason},
                             allow_retries=False) from exc
        except TrainingJobTimeout as exc:
            raise dg.Failure(str(exc), metadata={"training_job": exc.name}, allow_retries=False) from exc
        if result.model is not None:  # our own model: our evaluation on the validation split
            from factory_assets.backends.local import evaluate

            valid = evaluate(result.model, dataset_dir, "valid")
            accuracy = float(valid["per_label_accuracy"])
            metrics = {"valid": {k: valid[k] for k in ("per_label_accuracy", "exact_match", "n_images", "precision",
                                                      "recall", "f1", "accuracy", "thresholds")},
                       "train": result.metrics}
        else:  # the built-in algorithm: the job's own final metrics
            final = result.job["final_metrics"]
            accuracy = final.get("validation:accuracy")
            metrics = {"final_metrics": final,
                       "valid": {"per_label_accuracy": accuracy} if accuracy is not None else {}}
    record_model(fdb, result, dataset_version=str(dataset["version"]), code_version=code_version(),
                 metrics=metrics, region=cfg.region)
    accuracy_ok = accuracy is not None and accuracy >= model_policy.min_per_label_accuracy
    deployed_version = (get_endpoint(fdb, endpoint.name) or {}).get("model_version")
    baseline = None
    if deployed_version and deployed_version != result.version:
        deployed = get_model(fdb, deployed_version) or {}
        if deployed.get("trainer") == "sagemaker-builtin" or result.model is None:
            baseline = ((deployed.get("metrics") or {}).get("valid") or {}).get("per_label_accuracy")
        else:
            from factory_assets.backends.local import evaluate

            baseline = evaluate(load_model(fdb, deployed_version), dataset_dir, "valid")["per_label_accuracy"]
    regression_ok = baseline is None or (accuracy is not None and accuracy >= baseline - model_policy.max_regression)
    set_checks(fdb, result.version, accuracy_ok and regression_ok,
               {accuracy_check: accuracy_ok, regression_check: regression_ok})
    context.log.info(f"model {result.version} from {result.job['training_job_name']}: per-label accuracy "
                     f"{accuracy if accuracy is not None else 'not reported'}")
    return dg.MaterializeResult(
        metadata={"model_version": dg.MetadataValue.text(result.version),
                  "backend": dg.MetadataValue.text(f"sagemaker ({result.algorithm})"),
                  "dataset_version": dg.MetadataValue.text(str(dataset["version"])),
                  "code_version": dg.MetadataValue.text(code_version()),
                  "per_label_accuracy": dg.MetadataValue.float(float(accuracy if accuracy is not None else -1.0)),
                  **_job_metadata(result.job), **(extra_metadata or {})},
        check_results=[
            dg.AssetCheckResult(check_name=accuracy_check, passed=bool(accuracy_ok), metadata={
                "per_label_accuracy": float(accuracy if accuracy is not None else -1.0),
                "minimum": float(model_policy.min_per_label_accuracy),
                "note": "" if accuracy is not None else "the training job reported no validation:accuracy"}),
            dg.AssetCheckResult(check_name=regression_check, passed=bool(regression_ok), metadata={
                "deployed_version": deployed_version or "none",
                "deployed_per_label_accuracy": float(baseline) if baseline is not None else -1.0}),
        ])


def sagemaker_model_endpoint(context: dg.AssetExecutionContext, fdb, endpoint) -> dg.MaterializeResult:
    """``model_endpoint`` on SageMaker: deploy the newest model that passed its checks."""
    from factory_assets.backends.sagemaker import EndpointFailed, EndpointTimeout, SageMakerConfigError, deploy
    from factory_assets.backends.sagemaker.registry import model_image, record_deployment
    from factory_assets.storage.models import get_endpoint, latest_model

    model = latest_model(fdb, passed_checks=True)
    if model is None:
        raise dg.Failure("No model has passed its checks: nothing to deploy.", allow_retries=False)
    sm_info = model.get("sagemaker") or {}
    if not sm_info.get("s3_artifact"):
        raise dg.Failure(f"model {model['version']} was not trained on SageMaker (no S3 artifact): "
                         "train it with FACTORY_MODEL_BACKEND=sagemaker first", allow_retries=False)
    cfg = endpoint.sagemaker.to_config() if endpoint.sagemaker is not None else SageMakerConfig.from_env()
    cfg.endpoint_name = endpoint.name
    before = get_endpoint(fdb, endpoint.name) or {}
    try:
        cfg.validate(training=False, algorithm=sm_info.get("algorithm"))
        state = deploy(cfg.sagemaker_client(), cfg, version=model["version"], image=model_image(model, cfg),
                       model_data_url=sm_info["s3_artifact"], log=context.log.info)
    except SageMakerConfigError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc
    except (EndpointFailed, EndpointTimeout) as exc:
        raise dg.Failure(str(exc)) from exc
    record_deployment(fdb, endpoint.name, model["version"], state)
    return dg.MaterializeResult(metadata={
        "endpoint": dg.MetadataValue.text(endpoint.name),
        "backend": dg.MetadataValue.text("sagemaker"),
        "status": dg.MetadataValue.text(str(state["status"])),
        "model_version": dg.MetadataValue.text(model["version"]),
        "previous_version": dg.MetadataValue.text(str(before.get("model_version"))),
        "endpoint_config": dg.MetadataValue.text(str(state["config"])),
        "previous_config": dg.MetadataValue.text(str(state["previous_config"])),
        "action": dg.MetadataValue.text(state["action"]),
        "instance_type": dg.MetadataValue.text(state["instance_type"]),
        "estimated_usd_per_hour": dg.MetadataValue.float(float(state["estimated_usd_per_hour"] or 0.0)),
        "console": dg.MetadataValue.url(state["console_url"]),
    })
