"""SageMaker ``UpdateEndpoint`` for the moto server the tests run (moto 5.2.5 lacks it).

The AWS semantics (API reference, UpdateEndpoint): the endpoint must exist and be
``InService``, the endpoint config must exist; SageMaker sets the endpoint ``Updating``,
brings up the new config's fleet, shifts traffic and sets it ``InService``, answering
``{"EndpointArn": ...}``. Here the fleet is up at the next ``DescribeEndpoint`` (moto
makes every endpoint ``InService`` at once on create the same way). Nothing is added
when moto has the operation itself: its own implementation is then the one tested.
"""
from __future__ import annotations


def add_update_endpoint() -> bool:
    """Teach moto's SageMaker backend and its response handler ``UpdateEndpoint``; True if added."""
    from moto.core.responses import ActionResult
    from moto.core.utils import utcnow
    from moto.sagemaker.exceptions import ValidationError
    from moto.sagemaker.models import FakeEndpoint, FakeEndpointConfig, SageMakerModelBackend
    from moto.sagemaker.responses import SageMakerResponse

    if hasattr(SageMakerModelBackend, "update_endpoint"):
        return False

    def update_endpoint(self, endpoint_name: str, endpoint_config_name: str) -> FakeEndpoint:
        endpoint = self.endpoints.get(endpoint_name)
        if endpoint is None:
            arn = FakeEndpoint.arn_formatter(endpoint_name, self.account_id, self.region_name)
            raise ValidationError(message=f'Could not find endpoint "{arn}".')
        if endpoint.endpoint_status != "InService":
            raise ValidationError(message=f"Cannot update in-progress endpoint \"{endpoint.arn}\".")
        try:
            config = self.describe_endpoint_config(endpoint_config_name)
        except KeyError:
            arn = FakeEndpointConfig.arn_formatter(endpoint_config_name, self.account_id, self.region_name)
            raise ValidationError(message=f"Could not find endpoint configuration \"{arn}\".") from None
        endpoint.endpoint_config_name = endpoint_config_name
        endpoint.production_variants = endpoint._process_production_variants(config["ProductionVariants"])
        endpoint.data_capture_config = config["DataCaptureConfig"]
        endpoint.endpoint_status = "Updating"
        endpoint.last_modified_time = utcnow()
        return endpoint

    describe = SageMakerModelBackend.describe_endpoint

    def describe_endpoint(self, endpoint_name: str) -> dict:
        answer = describe(self, endpoint_name)
        endpoint = self.endpoints.get(endpoint_name)
        if endpoint is not None and endpoint.endpoint_status == "Updating":
            endpoint.endpoint_status = "InService"  # seen Updating once; the new fleet is up
            endpoint.last_modified_time = utcnow()
        return answer

    def update_endpoint_action(self) -> ActionResult:
        endpoint = self.sagemaker_backend.update_endpoint(
            endpoint_name=self._get_param("EndpointName"),
            endpoint_config_name=self._get_param("EndpointConfigName"))
        return ActionResult({"EndpointArn": endpoint.arn})

    SageMakerModelBackend.update_endpoint = update_endpoint
    SageMakerModelBackend.describe_endpoint = describe_endpoint
    SageMakerResponse.update_endpoint = update_endpoint_action
    return True
