"""SageMaker settings: one typed dataclass, read from the environment or built by the
Dagster ``SageMakerResource``. Credentials never pass through here: boto3 finds them
in the AWS default chain (environment, profile, instance or task role)."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass, fields
from factory_assets.vocabulary import DEFAULT_ENDPOINT

logger = logging.getLogger(__name__)

ALGORITHMS = ("builtin", "byoc")
# single: one model per endpoint (blue/green per version). multi: one Mode=MultiModel model over an S3
# prefix holding every factory's and camera's model as <name>.tar.gz (docs/multi-model.md).
ENDPOINT_MODES = ("single", "multi")

# The original project trained the built-in algorithm on a GPU instance; our own
# model needs no GPU. Endpoints of both run on a small CPU instance.
DEFAULT_TRAINING_INSTANCE = {"builtin": "ml.g4dn.xlarge", "byoc": "ml.m5.xlarge"}
DEFAULT_INFERENCE_INSTANCE = "ml.m5.large"

# On-demand list prices in USD per hour, us-east-1 (SageMaker pricing page, 2025).
# Only an estimate for the UI: other regions, savings plans and spot differ.
TRAINING_USD_PER_HOUR = {"ml.g4dn.xlarge": 0.736, "ml.m5.large": 0.115, "ml.m5.xlarge": 0.23,
                         "ml.p3.2xlarge": 3.825, "ml.c5.xlarge": 0.204}
HOSTING_USD_PER_HOUR = {"ml.m5.large": 0.115, "ml.m5.xlarge": 0.23, "ml.t2.medium": 0.056,
                        "ml.c5.large": 0.102, "ml.g4dn.xlarge": 0.736}

# dataclass field -> environment variable (the Dagster resource binds the same names with dg.EnvVar)
ENV = {
    "region": "FACTORY_SAGEMAKER_REGION",
    "role_arn": "FACTORY_SAGEMAKER_ROLE_ARN",
    "bucket": "FACTORY_SAGEMAKER_BUCKET",
    "prefix": "FACTORY_SAGEMAKER_PREFIX",
    "training_instance_type": "FACTORY_SAGEMAKER_TRAINING_INSTANCE",
    "inference_instance_type": "FACTORY_SAGEMAKER_INFERENCE_INSTANCE",
    "endpoint_name": "FACTORY_SAGEMAKER_ENDPOINT_NAME",
    "algorithm": "FACTORY_SAGEMAKER_ALGORITHM",
    "byoc_image_uri": "FACTORY_SAGEMAKER_BYOC_IMAGE_URI",
    "epochs": "FACTORY_SAGEMAKER_EPOCHS",
    "mini_batch_size": "FACTORY_SAGEMAKER_MINI_BATCH_SIZE",
    "sagemaker_endpoint_url": "FACTORY_SAGEMAKER_ENDPOINT_URL",
    "s3_endpoint_url": "FACTORY_S3_ENDPOINT_URL",
    "runtime_endpoint_url": "FACTORY_SAGEMAKER_RUNTIME_URL",
    "endpoint_mode": "FACTORY_SAGEMAKER_ENDPOINT_MODE",
    "model_cache_bytes": "FACTORY_SAGEMAKER_MODEL_CACHE_BYTES",
    "poll_seconds": "FACTORY_SAGEMAKER_POLL_SECONDS",
}
BACKEND_ENV = "FACTORY_MODEL_BACKEND"

_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/.+$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_ACCOUNT = re.compile(r"(?<=:)\d{12}(?=:)")


class SageMakerConfigError(ValueError):
    """The SageMaker settings are missing or malformed (found before any AWS call)."""


def redact(text: str | None) -> str:
    """ARNs and URIs with the account id masked, for logs and Dagster metadata."""
    if not text:
        return ""
    text = _ACCOUNT.sub("************", str(text))
    return re.sub(r"\b\d{12}(?=\.dkr\.ecr\.)", "************", text)


@dataclass
class SageMakerConfig:
    region: str = "us-east-1"
    role_arn: str | None = None
    bucket: str | None = None
    prefix: str = "factory-assets"
    training_instance_type: str | None = None  # None: per algorithm (DEFAULT_TRAINING_INSTANCE)
    inference_instance_type: str = DEFAULT_INFERENCE_INSTANCE
    endpoint_name: str = DEFAULT_ENDPOINT
    algorithm: str = "builtin"
    byoc_image_uri: str | None = None
    epochs: int = 10
    mini_batch_size: int = 8
    volume_size_gb: int = 30
    max_runtime_seconds: int = 3 * 3600
    training_timeout_seconds: float = 4 * 3600
    endpoint_timeout_seconds: float = 1800
    poll_seconds: float = 30.0
    # Only for tests and compatible services (moto, our own server); unset on AWS.
    sagemaker_endpoint_url: str | None = None
    s3_endpoint_url: str | None = None
    runtime_endpoint_url: str | None = None
    # single | multi (ENDPOINT_MODES); multi: the endpoint hosts many models by name
    endpoint_mode: str = "single"
    # the BYOC container's model cache in a multi-model endpoint (its FACTORY_MODEL_CACHE_BYTES); None: its default
    model_cache_bytes: int | None = None

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "SageMakerConfig":
        environ = os.environ if environ is None else environ
        values: dict = {}
        types = {f.name: f.type for f in fields(cls)}
        for name, var in ENV.items():
            raw = environ.get(var)
            if raw not in (None, ""):
                values[name] = int(raw) if types[name] in ("int", "int | None") else \
                    float(raw) if types[name] == "float" else raw
        if "region" not in values:
            region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
            if region:
                values["region"] = region
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def training_instance(self, algorithm: str | None = None) -> str:
        return self.training_instance_type or DEFAULT_TRAINING_INSTANCE[algorithm or self.algorithm]

    def validate(self, *, training: bool = True, algorithm: str | None = None) -> "SageMakerConfig":
        """Raise ``SageMakerConfigError`` naming every missing setting; no AWS call is made."""
        algorithm = algorithm or self.algorithm
        problems = []
        if algorithm not in ALGORITHMS:
            problems.append(f"algorithm must be one of {', '.join(ALGORITHMS)} (got {algorithm!r})")
        if self.endpoint_mode not in ENDPOINT_MODES:
            problems.append(f"{ENV['endpoint_mode']} must be one of {', '.join(ENDPOINT_MODES)} "
                            f"(got {self.endpoint_mode!r})")
        elif self.endpoint_mode == "multi" and not self.bucket:
            problems.append(f"a multi-model endpoint needs {ENV['bucket']} (its models live under one S3 prefix)")
        if not self.role_arn:
            problems.append(f"no execution role: set {ENV['role_arn']} to an IAM role ARN SageMaker can assume")
        elif not _ROLE_ARN.match(self.role_arn):
            problems.append(f"{ENV['role_arn']} is not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)")
        if training and not self.bucket:
            problems.append(f"no S3 bucket: set {ENV['bucket']} (datasets and model artifacts go there)")
        elif self.bucket and not _BUCKET.match(self.bucket):
            problems.append(f"{ENV['bucket']}={self.bucket!r} is not a valid S3 bucket name")
        if algorithm == "byoc" and not self.byoc_image_uri:
            problems.append(f"algorithm byoc needs {ENV['byoc_image_uri']} (the ECR image built from the Dockerfile)")
        if not self.region:
            problems.append(f"no region: set {ENV['region']} or AWS_REGION")
        if problems:
            raise SageMakerConfigError("SageMaker is not configured: " + "; ".join(problems))
        return self

    def s3_uri(self, *parts: str) -> str:
        key = "/".join(p.strip("/") for p in (self.prefix, *parts) if p and p.strip("/"))
        return f"s3://{self.bucket}/{key}/"

    def multi_model_uri(self) -> str:
        """The S3 prefix of this endpoint's models in multi-model mode (``<name>.tar.gz`` each)."""
        return self.s3_uri("multi-model", self.endpoint_name)

    def public_view(self) -> dict:
        """Settings safe to show in logs and metadata (account ids masked)."""
        view = asdict(self)
        view["role_arn"] = redact(self.role_arn)
        view["byoc_image_uri"] = redact(self.byoc_image_uri)
        return view

    # ---- boto3 clients (credentials: AWS default chain) -------------------
    def _client(self, service: str, endpoint_url: str | None):
        import boto3
        from botocore.config import Config

        return boto3.client(service, region_name=self.region, endpoint_url=endpoint_url,
                            config=Config(retries={"max_attempts": 5, "mode": "standard"},
                                          connect_timeout=10, read_timeout=60))

    def sagemaker_client(self):
        return self._client("sagemaker", self.sagemaker_endpoint_url)

    def s3_client(self):
        return self._client("s3", self.s3_endpoint_url)

    def predictor(self, endpoint_name: str | None = None, target_model: str | None = None):
        """``invoke_endpoint`` on the endpoint; ``target_model`` names one of a multi-model
        endpoint's models (or pass ``target_model=`` to each ``predict``)."""
        from factory_assets.serving.predictor import SageMakerRuntimePredictor

        return SageMakerRuntimePredictor(endpoint_name or self.endpoint_name, region=self.region,
                                         endpoint_url=self.runtime_endpoint_url, target_model=target_model)


def console_url(region: str, kind: str, name: str) -> str:
    """The AWS console page of a training job (``kind='jobs'``) or endpoint (``'endpoints'``)."""
    return f"https://{region}.console.aws.amazon.com/sagemaker/home?region={region}#/{kind}/{name}"
