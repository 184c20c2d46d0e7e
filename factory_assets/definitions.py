"""The Dagster code location: every domain's assets, checks, sensors and schedules,
with resources bound once here."""
from __future__ import annotations

import os

import dagster as dg

from dagster_aws.s3 import S3Resource

from factory_assets.defs import camera, datasets, models, twin
from factory_assets.defs.datasets.resources import DatasetTargetResource
from factory_assets.defs.models.resources import EndpointResource, ModelPolicyResource
from factory_assets.defs.models.sagemaker import backend_from_env
from factory_assets.defs.resources import MongoResource
from factory_assets.defs.twin.sensors import RetrainWindow

DOMAINS = [camera, datasets, models, twin]


def _bound(field: str, env: str) -> dict:
    """``{field: dg.EnvVar(env)}`` when the variable is set (make run sets it), else nothing
    (the resource's default applies), so `dg dev` on its own still loads."""
    return {field: dg.EnvVar(env)} if os.environ.get(env) else {}


def _collect(attr: str) -> list:
    return [item for domain in DOMAINS for item in getattr(domain, attr, [])]


defs = dg.Definitions(
    assets=_collect("assets"),
    asset_checks=_collect("asset_checks"),
    sensors=_collect("sensors"),
    schedules=_collect("schedules"),
    jobs=_collect("jobs"),
    resources={
        "mongo": MongoResource(),
        # make run / factory-assets up set FACTORY_ENDPOINT_URL for dagster (factory_assets/cli/up.py)
        "endpoint": EndpointResource(**_bound("url", "FACTORY_ENDPOINT_URL"), **backend_from_env()),
        "retrain_window": RetrainWindow(),
        "model_policy": ModelPolicyResource(),
        "dataset_target": DatasetTargetResource(),
        # region / endpoint from the environment (AWS_REGION, AWS_ENDPOINT_URL); credentials from the AWS chain
        "s3": S3Resource(),
    },
)
