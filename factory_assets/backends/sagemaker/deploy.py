"""Endpoints: ``create_model`` -> ``create_endpoint_config`` -> ``create_endpoint`` (first
time) or ``update_endpoint`` (blue/green to the new config), waiting for ``InService``
with progress; rollback returns the endpoint to the previous version's config.
Names derive from the model version, so re-running a deployment is idempotent."""
from __future__ import annotations

import logging
import re
import time
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
    endpoint = cfg.endpoint_name
    mname, cname = model_name(endpoint, version), config_name(endpoint, version)
    if _describe(sm.describe_model, ModelName=mname) is None:
        sm.create_model(ModelName=mname, ExecutionRoleArn=cfg.role_arn,
                        PrimaryContainer={"Image": image, "ModelDataUrl": model_data_url,
                                          "Environment": {"FACTORY_MODEL_VERSION": version}},
                        Tags=[{"Key": "model_version", "Value": version}])
        log(f"model {mname} created from {redact(model_data_url)}")
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
    return {**endpoint_view(desc, cfg), "action": action, "model_name": mname, "previous_config": previous}


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
