from typing import Optional

import dagster as dg
from pydantic import Field

from factory_assets.defs.models.sagemaker import SageMakerResource
from factory_assets.vocabulary import DEFAULT_ENDPOINT

DEFAULT_URL = "http://127.0.0.1:8080"


class EndpointResource(dg.ConfigurableResource):
    """The inference endpoint the twin uses, behind one ``Predictor`` interface.

    ``backend="local"``: our SageMaker-compatible server (``factory-assets serve``)
    at ``url``. ``backend="sagemaker"``: the SageMaker runtime ``invoke_endpoint``
    (``sagemaker_endpoint_url`` lets it point at any compatible server)."""

    name: str = Field(default=DEFAULT_ENDPOINT, description="endpoint name (MongoDB `endpoints` document)")
    backend: str = Field(default="local", description="local | sagemaker")
    url: Optional[str] = Field(default=None, description=f"local server URL; default {DEFAULT_URL} (definitions.py "
                                                         "binds FACTORY_ENDPOINT_URL)")
    region: str = Field(default="us-east-1")
    sagemaker_endpoint_url: Optional[str] = None
    timeout_seconds: float = 10.0
    sagemaker: Optional[SageMakerResource] = Field(default=None, description="AWS settings for backend=sagemaker")

    def base_url(self) -> str:
        """``url``, else ``FACTORY_ENDPOINT_URL`` of the process running the step (read now, not when
        the code location was loaded: ``factory-assets retrain`` sets it for its own runs), else the default."""
        import os

        return self.url or os.environ.get("FACTORY_ENDPOINT_URL") or DEFAULT_URL

    def predictor(self):
        from factory_assets.serving.predictor import HttpEndpointPredictor, SageMakerRuntimePredictor

        if self.backend == "sagemaker":
            return SageMakerRuntimePredictor(self.name, region=self.region, endpoint_url=self.sagemaker_endpoint_url)
        return HttpEndpointPredictor(self.base_url(), timeout=self.timeout_seconds)


class ModelPolicyResource(dg.ConfigurableResource):
    """What a model must achieve before it may serve the twin."""

    min_per_label_accuracy: float = Field(default=0.90, description="on the dataset's validation split")
    max_regression: float = Field(default=0.0, description="allowed drop in per-label accuracy vs. the deployed model")
    seed: int = 0
