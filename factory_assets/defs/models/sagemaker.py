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
    bound = {name: dg.EnvVar.int(var) if fields[name].annotation is int else
             float(os.environ[var]) if fields[name].annotation is float else dg.EnvVar(var)  # no EnvVar.float
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


def sagemaker_train_camera(context: dg.AssetExecutionContext, fdb, endpoint, model_policy, dataset: dict,
                           checks: tuple[str, str], factory_id: str, camera_id: str,
                           extra_metadata: dict | None = None) -> dict:
    """``stock_model`` on SageMaker for one factory's camera: train (built-in or byoc), evaluate,
    register (for that factory and camera), check against the model deployed for that camera.
    Returns the camera's outcome as ``stock_model`` assembles it. ``extra_metadata`` (which
    dataset, the seed) is added to the materialization's."""
    from factory_assets.backends.sagemaker import SageMakerTrainer, TrainingJobFailed, TrainingJobTimeout
    from factory_assets.backends.sagemaker.registry import record_model
    from factory_assets.serving.models import load_model
    from factory_assets.storage.models import annotate_model, assign_model, get_deployment, get_model, set_checks
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
    assign_model(fdb, result.version, factory_id, camera_id)  # the factory and camera it was trained for
    annotate_model(fdb, result.version, {"seed": model_policy.seed})
    accuracy_ok = accuracy is not None and accuracy >= model_policy.min_per_label_accuracy
    deployed_version = (get_deployment(fdb, factory_id, camera_id, endpoint=endpoint.name) or {}).get("model_version")
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
    context.log.info(f"model {result.version} of {factory_id} camera {camera_id} from "
                     f"{result.job['training_job_name']}: per-label accuracy "
                     f"{accuracy if accuracy is not None else 'not reported'}")
    return {
        "camera_id": camera_id, "version": result.version, "accuracy_ok": bool(accuracy_ok),
        "regression_ok": bool(regression_ok),
        "accuracy_md": {"per_label_accuracy": float(accuracy if accuracy is not None else -1.0),
                        "minimum": float(model_policy.min_per_label_accuracy),
                        "note": "" if accuracy is not None else "the training job reported no validation:accuracy"},
        "regression_md": {"deployed_version": deployed_version or "none",
                          "deployed_per_label_accuracy": float(baseline) if baseline is not None else -1.0},
        "metadata": {"model_version": dg.MetadataValue.text(result.version),
                     "backend": dg.MetadataValue.text(f"sagemaker ({result.algorithm})"),
                     "dataset_version": dg.MetadataValue.text(str(dataset["version"])),
                     "code_version": dg.MetadataValue.text(code_version()),
                     "per_label_accuracy": dg.MetadataValue.float(float(accuracy if accuracy is not None else -1.0)),
                     **_job_metadata(result.job), **(extra_metadata or {})},
    }


def sagemaker_deploy_camera(context: dg.AssetExecutionContext, fdb, endpoint, model: dict, factory_id: str,
                            camera_id: str) -> dict:
    """``model_endpoint`` on SageMaker for one factory's camera (after the same blocking checks).

    A multi-model endpoint (``FACTORY_SAGEMAKER_ENDPOINT_MODE=multi``, the fleet's): the endpoint
    is created once over its S3 prefix and the model is uploaded as ``<name>.tar.gz`` under it
    (SageMaker loads it on its first invocation); no other factory's model is touched. A
    single-model endpoint serves one factory's camera: it is refused when another one's model
    is on it."""
    from factory_assets.backends.sagemaker import (EndpointFailed, EndpointTimeout, SageMakerConfigError, deploy,
                                                   deploy_multi_model, upload_target_model)
    from factory_assets.backends.sagemaker.registry import model_image, record_deployment
    from factory_assets.serving.models import model_name
    from factory_assets.storage.models import (ModelNotFound, deploy_model, deployment_name, get_endpoint, get_model,
                                               load_model_bytes, mark_in_service)

    cfg = endpoint.sagemaker.to_config() if endpoint.sagemaker is not None else SageMakerConfig.from_env()
    cfg.endpoint_name = endpoint.name
    sm_info = model.get("sagemaker") or {}
    version, name = model["version"], model_name(factory_id, camera_id, model["version"])
    try:
        if cfg.endpoint_mode == "multi":
            try:
                artifact = load_model_bytes(fdb, version)
            except ModelNotFound:
                raise dg.Failure(f"model {version} has no artifact in the registry (SageMaker's built-in algorithm): "
                                 "a multi-model endpoint serves our BYOC models only", allow_retries=False) from None
            state = deploy_multi_model(cfg.sagemaker_client(), cfg, log=context.log.info)
            uploaded = upload_target_model(cfg.s3_client(), cfg, name, artifact=artifact, log=context.log.info)
            deploy_model(fdb, factory_id, camera_id, version, endpoint=endpoint.name)
            mark_in_service(fdb, deployment_name(factory_id, camera_id, endpoint.name), version)
            return {"backend": "sagemaker (multi-model)", "status": str(state["status"]), "action": state["action"],
                    "s3_uri": uploaded["uri"], "uploaded": bool(uploaded["uploaded"]),
                    "console": state.get("console_url")}
        if not sm_info.get("s3_artifact"):
            raise dg.Failure(f"model {version} was not trained on SageMaker (no S3 artifact): "
                             "train it with FACTORY_MODEL_BACKEND=sagemaker first", allow_retries=False)
        current = get_model(fdb, (get_endpoint(fdb, endpoint.name) or {}).get("model_version") or "") or {}
        if current.get("factory_id") not in (None, factory_id) or current.get("camera_id") not in (None, camera_id):
            raise dg.Failure(f"the single-model SageMaker endpoint {endpoint.name} serves {current['factory_id']} "
                             f"camera {current['camera_id']}: a fleet needs one multi-model endpoint "
                             "(FACTORY_SAGEMAKER_ENDPOINT_MODE=multi)", allow_retries=False)
        cfg.validate(training=False, algorithm=sm_info.get("algorithm"))
        state = deploy(cfg.sagemaker_client(), cfg, version=version, image=model_image(model, cfg),
                       model_data_url=sm_info["s3_artifact"], log=context.log.info)
    except SageMakerConfigError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc
    except (EndpointFailed, EndpointTimeout) as exc:
        raise dg.Failure(str(exc)) from exc
    record_deployment(fdb, endpoint.name, version, state)  # the single endpoint's document, as before the fleet
    deploy_model(fdb, factory_id, camera_id, version, endpoint=endpoint.name)
    mark_in_service(fdb, deployment_name(factory_id, camera_id, endpoint.name), version)
    return {"backend": "sagemaker", "status": str(state["status"]), "endpoint_config": str(state["config"]),
            "previous_config": str(state["previous_config"]), "action": state["action"],
            "instance_type": state["instance_type"],
            "estimated_usd_per_hour": float(state["estimated_usd_per_hour"] or 0.0), "console": state["console_url"]}
