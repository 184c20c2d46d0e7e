"""A SageMaker model in the registry like a local one, and the endpoint document
(``endpoints``) following SageMaker deployments."""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def record_model(fdb, result, *, dataset_version: str | None, code_version: str | None, metrics: dict,
                 region: str) -> dict:
    """Register a ``SageMakerTrainResult``: version, dataset and code versions, metrics,
    and under ``sagemaker`` the training job (name, ARN, S3 artifact, billable seconds,
    instance type, image, algorithm)."""
    from factory_assets.storage.models import annotate_model, register_external_model, register_model
    from factory_assets.vocabulary import CLASSES

    job = result.job
    info = {"algorithm": result.algorithm, "region": region,
            **{k: job.get(k) for k in ("training_job_name", "training_job_arn", "s3_artifact", "billable_seconds",
                                       "instance_type", "image", "estimated_cost_usd", "final_metrics",
                                       "hyperparameters")}}
    trainer = f"sagemaker-{result.algorithm}"
    if result.model is not None:
        doc = register_model(fdb, result.model, dataset_version=dataset_version, code_version=code_version,
                             metrics=metrics, trainer=trainer)
        annotate_model(fdb, result.version, {"sagemaker": info})
        doc["sagemaker"] = info
        return doc
    return register_external_model(fdb, result.version, dataset_version=dataset_version, code_version=code_version,
                                   metrics=metrics, trainer=trainer, classes=CLASSES,
                                   thresholds={c: 0.5 for c in CLASSES}, fields={"sagemaker": info})


def record_deployment(fdb, endpoint_name: str, version: str, deployed: dict) -> dict:
    """Point the ``endpoints`` document at ``version`` (previous version kept for rollback)
    and record the SageMaker endpoint's state."""
    from factory_assets.storage.models import get_endpoint, set_endpoint_version

    before = get_endpoint(fdb, endpoint_name) or {}
    if before.get("model_version") != version:
        set_endpoint_version(fdb, endpoint_name, version)
    # only while the endpoint still points at this version: a newer deploy or a rollback wins
    fdb.endpoints.update_one({"name": endpoint_name, "model_version": version}, {"$set": {
        "backend": "sagemaker", "status": deployed.get("status"), "served_version": version,
        "sagemaker": {k: deployed.get(k) for k in ("config", "model_name", "previous_config", "instance_type",
                                                  "arn", "action")}}})
    return get_endpoint(fdb, endpoint_name)


def record_rollback(fdb, endpoint_name: str, state: dict) -> dict:
    from factory_assets.storage.models import get_endpoint, rollback_endpoint

    doc = rollback_endpoint(fdb, endpoint_name)
    fdb.endpoints.update_one({"name": endpoint_name}, {"$set": {
        "status": state.get("status"), "served_version": doc.get("model_version"),
        "sagemaker.config": state.get("config")}})
    return get_endpoint(fdb, endpoint_name)


def model_image(doc: dict, cfg) -> str:
    """The serving image of a registered model: the built-in algorithm's image for the
    region, or our BYOC image."""
    sm = doc.get("sagemaker") or {}
    if sm.get("algorithm") == "builtin":
        from factory_assets.backends.sagemaker.jobs import builtin_image_uri

        return builtin_image_uri(cfg.region)
    return sm.get("image") or cfg.byoc_image_uri
