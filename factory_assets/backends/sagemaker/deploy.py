"""Endpoints: ``create_model`` -> ``create_endpoint_config`` -> ``create_endpoint`` (first
time) or ``update_endpoint`` (blue/green to the new config), waiting for ``InService``
with progress; rollback returns the endpoint to the previous version's config.
Names derive from the model version, so re-running a deployment is idempotent.

Multi-model endpoints (``endpoint_mode="multi"``, docs/multi-model.md): ``deploy_multi_model``
creates one ``Mode: MultiModel`` model whose ``ModelDataUrl`` is an S3 prefix
(``SageMakerConfig.multi_model_uri``) and serves it on the endpoint, once; each factory's
and camera's model is then only an object under that prefix, ``<name>.tar.gz``
(``upload_target_model``), invoked with ``TargetModel=<name>.tar.gz``. Adding, replacing
or rolling back one model touches no other and does not update the endpoint."""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Callable

from factory_assets.backends.sagemaker.config import HOSTING_USD_PER_HOUR, SageMakerConfig, console_url, redact

logger = logging.getLogger(__name__)


class EndpointFailed(RuntimeError):
    pass


class EndpointTimeout(TimeoutError):
    pass


def _name(*parts: str) -> str:
    name = re.sub(r"[^A-Za-z0-9-]", "-", "-".join(parts)).strip("-")
    return name[:63].rstrip("-")


def model_name(endpoint: str, version: str) -> str:
    return _name(endpoint, version[:24])


def config_name(endpoint: str, version: str) -> str:
    return _name(endpoint, version[:24], "cfg")


def _missing(exc) -> bool:
    err = getattr(exc, "response", {}).get("Error", {})
    msg = err.get("Message", "").lower()
    return err.get("Code") in ("ValidationException", "ResourceNotFound") and ("could not find" in msg
                                                                                or "not found" in msg)


def _describe(call, **kwargs) -> dict | None:
    from botocore.exceptions import ClientError

    try:
        return call(**kwargs)
    except ClientError as exc:
        if _missing(exc):
            return None
        raise


def describe_endpoint(sm, name: str) -> dict | None:
    return _describe(sm.describe_endpoint, EndpointName=name)


def wait_for_endpoint(sm, name: str, *, timeout: float, poll: float, log: Callable[[str], None] = logger.info,
                      clock=time.monotonic, sleep=time.sleep) -> dict:
    deadline = clock() + timeout
    last = None
    while True:
        desc = sm.describe_endpoint(EndpointName=name)
        status = desc["EndpointStatus"]
        if status != last:
            log(f"endpoint {name}: {status} (config {desc.get('EndpointConfigName')})")
            last = status
        if status == "InService":
            return desc
        if status in ("Failed", "OutOfService"):
            raise EndpointFailed(f"SageMaker endpoint {name} is {status}: {desc.get('FailureReason') or 'no reason given'}")
        if clock() >= deadline:
            raise EndpointTimeout(f"SageMaker endpoint {name} not InService within {timeout:g} s (status {status})")
        sleep(poll)


def deploy(sm, cfg: SageMakerConfig, *, version: str, image: str, model_data_url: str,
           log: Callable[[str], None] = logger.info, timeout: float | None = None,
           poll: float | None = None) -> dict:
    """Serve ``version`` on ``cfg.endpoint_name``; returns what was done and the endpoint's state."""
    cfg.validate(training=False, algorithm="byoc" if image == cfg.byoc_image_uri else "builtin")
    if cfg.endpoint_mode == "multi":  # one model in place of the fleet's would take every other model away
        raise EndpointFailed(f"endpoint {cfg.endpoint_name} is a multi-model endpoint: upload the model with "
                             "upload_target_model and invoke it by name instead of deploying it alone")
    endpoint = cfg.endpoint_name
    mname, cname = model_name(endpoint, version), config_name(endpoint, version)
    if _describe(sm.describe_model, ModelName=mname) is None:
        sm.create_model(ModelName=mname, ExecutionRoleArn=cfg.role_arn,
                        PrimaryContainer={"Image": image, "ModelDataUrl": model_data_url,
                                          "Environment": {"FACTORY_MODEL_VERSION": version}},
                        Tags=[{"Key": "model_version", "Value": version}])
        log(f"model {mname} created from {redact(model_data_url)}")
    return {**_serve_model(sm, cfg, mname, cname, log=log, timeout=timeout, poll=poll), "model_name": mname}


def _serve_model(sm, cfg: SageMakerConfig, mname: str, cname: str, *, log: Callable[[str], None],
                 timeout: float | None, poll: float | None) -> dict:
    """The endpoint config for model ``mname`` and the endpoint on it (created, updated or unchanged)."""
    endpoint = cfg.endpoint_name
    if _describe(sm.describe_endpoint_config, EndpointConfigName=cname) is None:
        sm.create_endpoint_config(EndpointConfigName=cname, ProductionVariants=[{
            "VariantName": "AllTraffic", "ModelName": mname, "InitialInstanceCount": 1,
            "InstanceType": cfg.inference_instance_type, "InitialVariantWeight": 1.0}])
        log(f"endpoint config {cname} created ({cfg.inference_instance_type})")
    current = describe_endpoint(sm, endpoint)
    previous = current.get("EndpointConfigName") if current else None
    if current is None:
        sm.create_endpoint(EndpointName=endpoint, EndpointConfigName=cname)
        action = "created"
    elif previous != cname:
        # Blue/green: SageMaker brings up the new fleet, shifts traffic, then retires the old one.
        sm.update_endpoint(EndpointName=endpoint, EndpointConfigName=cname)
        action = "updated"
    else:
        action = "unchanged"
    log(f"endpoint {endpoint}: {action} ({previous} -> {cname}); waiting for InService")
    desc = wait_for_endpoint(sm, endpoint, timeout=cfg.endpoint_timeout_seconds if timeout is None else timeout,
                             poll=cfg.poll_seconds if poll is None else poll, log=log)
    return {**endpoint_view(desc, cfg), "action": action, "previous_config": previous}


# ---------------------------------------------------------------------------
# multi-model endpoints

MULTI_MODEL_ENV = {"SAGEMAKER_MULTI_MODEL": "true"}  # our container serves by name (container/serve.py)


def multi_model_names(cfg: SageMakerConfig, image: str) -> tuple[str, str]:
    """(model, endpoint config) names of the endpoint's MultiModel model: they change only
    with the image, the S3 prefix or the cache size, so redeploying the same is a no-op."""
    import hashlib

    key = json.dumps([image, cfg.multi_model_uri(), cfg.model_cache_bytes]).encode()
    digest = hashlib.sha256(key).hexdigest()[:12]
    return _name(cfg.endpoint_name, "mme", digest), _name(cfg.endpoint_name, "mme", digest, "cfg")


def deploy_multi_model(sm, cfg: SageMakerConfig, *, image: str | None = None,
                       log: Callable[[str], None] = logger.info, timeout: float | None = None,
                       poll: float | None = None) -> dict:
    """One ``Mode: MultiModel`` model over ``cfg.multi_model_uri()`` on ``cfg.endpoint_name``
    (our BYOC image unless ``image``); returns what was done and the endpoint's state."""
    image = image or cfg.byoc_image_uri
    cfg.validate(training=False, algorithm="byoc")
    if cfg.endpoint_mode != "multi":
        raise EndpointFailed(f"endpoint {cfg.endpoint_name} is configured as a single-model endpoint "
                             "(set FACTORY_SAGEMAKER_ENDPOINT_MODE=multi)")
    prefix = cfg.multi_model_uri()
    mname, cname = multi_model_names(cfg, image)
    if _describe(sm.describe_model, ModelName=mname) is None:
        environment = dict(MULTI_MODEL_ENV)
        if cfg.model_cache_bytes:
            environment["FACTORY_MODEL_CACHE_BYTES"] = str(int(cfg.model_cache_bytes))
        sm.create_model(ModelName=mname, ExecutionRoleArn=cfg.role_arn,
                        PrimaryContainer={"Image": image, "Mode": "MultiModel", "ModelDataUrl": prefix,
                                          "Environment": environment},
                        Tags=[{"Key": "mode", "Value": "MultiModel"}])
        log(f"multi-model model {mname} created over {redact(prefix)}")
    state = _serve_model(sm, cfg, mname, cname, log=log, timeout=timeout, poll=poll)
    return {**state, "model_name": mname, "mode": "MultiModel", "model_data_url": prefix}


def _target_key(cfg: SageMakerConfig, name: str) -> tuple[str, str]:
    from factory_assets.backends.sagemaker.trainer import split_s3_uri
    from factory_assets.serving.models import target_model_path

    bucket, prefix = split_s3_uri(cfg.multi_model_uri())
    return bucket, prefix + target_model_path(name)


def upload_target_model(s3, cfg: SageMakerConfig, name: str, *, model_dir: Path | None = None,
                        artifact: bytes | None = None, log: Callable[[str], None] = logger.info) -> dict:
    """Put model ``name`` (``serving.models.model_name(factory, camera, version)``) under the
    endpoint's prefix as ``<name>.tar.gz``: a model folder (``model_dir``) or the registry's
    artifact bytes (``artifact``). A name holds a version, so an object already there is this
    model: it is not uploaded again. Returns ``{"target_model", "uri", "uploaded"}``."""
    import tarfile
    import tempfile

    from botocore.exceptions import ClientError

    from factory_assets.backends.sagemaker.trainer import pack_model_dir
    from factory_assets.vision.model import ARTIFACT_NAME

    if (model_dir is None) == (artifact is None):
        raise ValueError("give model_dir or artifact")
    bucket, key = _target_key(cfg, name)
    uri, target = f"s3://{bucket}/{key}", key.rsplit("/", 1)[-1]
    try:
        s3.head_object(Bucket=bucket, Key=key)
        return {"target_model": target, "uri": uri, "uploaded": False}
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
            raise
    with tempfile.TemporaryDirectory(prefix="mme-") as tmp:
        archive = Path(tmp) / target
        if model_dir is not None:
            pack_model_dir(Path(model_dir), archive)
        else:
            (Path(tmp) / ARTIFACT_NAME).write_bytes(artifact)
            with tarfile.open(archive, "w:gz") as tar:
                tar.add(Path(tmp) / ARTIFACT_NAME, arcname=ARTIFACT_NAME)
        s3.upload_file(str(archive), bucket, key)
    log(f"model {name} uploaded to {redact(uri)}")
    return {"target_model": target, "uri": uri, "uploaded": True}


def remove_target_model(s3, cfg: SageMakerConfig, name: str) -> str:
    """Delete ``<name>.tar.gz`` from the prefix (SageMaker keeps serving a loaded copy until it
    unloads it; nothing invokes a removed name once the registry no longer names it)."""
    bucket, key = _target_key(cfg, name)
    s3.delete_object(Bucket=bucket, Key=key)
    return f"s3://{bucket}/{key}"


def list_target_models(s3, cfg: SageMakerConfig) -> list[str]:
    """The ``TargetModel`` values the endpoint can serve: every ``*.tar.gz`` under its prefix."""
    from factory_assets.backends.sagemaker.trainer import split_s3_uri

    bucket, prefix = split_s3_uri(cfg.multi_model_uri())
    names = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        names += [o["Key"][len(prefix):] for o in page.get("Contents", []) if o["Key"].endswith(".tar.gz")]
    return sorted(names)


def rollback(sm, cfg: SageMakerConfig, previous_version: str, **kwargs) -> dict:
    """Back to the config of ``previous_version`` (kept, never deleted, by ``deploy``)."""
    cname = config_name(cfg.endpoint_name, previous_version)
    if _describe(sm.describe_endpoint_config, EndpointConfigName=cname) is None:
        raise EndpointFailed(f"no endpoint config {cname} for version {previous_version}: nothing to roll back to")
    sm.update_endpoint(EndpointName=cfg.endpoint_name, EndpointConfigName=cname)
    log = kwargs.get("log", logger.info)
    log(f"endpoint {cfg.endpoint_name}: rolling back to {cname}")
    desc = wait_for_endpoint(sm, cfg.endpoint_name, timeout=kwargs.get("timeout") or cfg.endpoint_timeout_seconds,
                             poll=kwargs.get("poll") or cfg.poll_seconds, log=log)
    return endpoint_view(desc, cfg)


def endpoint_view(desc: dict | None, cfg: SageMakerConfig) -> dict:
    """An endpoint's state for the CLI and Dagster metadata (account id masked)."""
    if not desc:
        return {"endpoint": cfg.endpoint_name, "status": "absent"}
    price = HOSTING_USD_PER_HOUR.get(cfg.inference_instance_type)
    return {"endpoint": desc["EndpointName"], "status": desc["EndpointStatus"],
            "config": desc.get("EndpointConfigName"), "arn": redact(desc.get("EndpointArn")),
            "instance_type": cfg.inference_instance_type,
            "estimated_usd_per_hour": price,
            "console_url": console_url(cfg.region, "endpoints", desc["EndpointName"])}
