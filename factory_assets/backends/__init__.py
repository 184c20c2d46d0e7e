"""Training backends behind one ``Trainer`` protocol.

``local`` trains on this machine (``factory_assets.backends.local.LocalTrainer``);
``sagemaker`` trains on AWS SageMaker, with the built-in image-classification
algorithm (as the original project did) or with our own model in a
bring-your-own container (``factory_assets/container``). The same assets,
checks, sensors and backfills drive either one; which one is one setting
(``FACTORY_MODEL_BACKEND``: ``local`` by default, or ``sagemaker``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

BACKENDS = ("local", "sagemaker")


@runtime_checkable
class TrainOutcome(Protocol):
    """What a trainer returns: a model version, the model (``StockModel``, or
    ``None`` when the artifact is not one we can load, e.g. the built-in
    algorithm's MXNet model) and its metrics."""

    @property
    def version(self) -> str: ...

    model: Any
    metrics: dict


@runtime_checkable
class Trainer(Protocol):
    def train(self, dataset_dir: Path, out_dir: Path, seed: int = 0) -> TrainOutcome: ...


def check_backend(name: str) -> str:
    name = (name or "local").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown model backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return name


def predictor_from_env(endpoint_url: str, environ=None):
    """The ``Predictor`` of the chosen backend (``FACTORY_MODEL_BACKEND``): SageMaker's
    ``invoke_endpoint`` for ``sagemaker`` (settings from ``FACTORY_SAGEMAKER_*``), else
    our server at ``endpoint_url``."""
    import os

    environ = os.environ if environ is None else environ
    if check_backend(environ.get("FACTORY_MODEL_BACKEND", "local")) == "sagemaker":
        from factory_assets.backends.sagemaker.config import SageMakerConfig

        return SageMakerConfig.from_env(environ).predictor()
    from factory_assets.serving.predictor import HttpEndpointPredictor

    return HttpEndpointPredictor(endpoint_url)
