"""Training jobs: the request for the built-in image-classification algorithm (as the
original project's notebook made it) and for our bring-your-own container, starting
them idempotently and waiting for them with progress and a timeout (boto3 only)."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Callable

from factory_assets.backends.sagemaker.config import (TRAINING_USD_PER_HOUR, SageMakerConfig, console_url,
                                                      redact)

logger = logging.getLogger(__name__)

LST_CONTENT_TYPE = "application/x-image"
# channel -> folder of the dataset layout (datasets/manifests.py), lst mode
CHANNELS = {"train": "train-imgs", "validation": "valid-imgs",
            "train_lst": "train-annots", "validation_lst": "valid-annots"}
TERMINAL = ("Completed", "Failed", "Stopped")


class TrainingJobFailed(RuntimeError):
    def __init__(self, name: str, status: str, reason: str):
        super().__init__(f"SageMaker training job {name} {status.lower()}: {reason or 'no FailureReason given'}")
        self.name, self.status, self.reason = name, status, reason


class TrainingJobTimeout(TimeoutError):
    def __init__(self, name: str, timeout: float, status: str):
        super().__init__(f"SageMaker training job {name} did not finish within {timeout:g} s "
                         f"(last status {status}); it keeps running on AWS until its own stopping "
                         f"condition: stop it with `aws sagemaker stop-training-job --training-job-name {name}`")
        self.name, self.status = name, status


def num_training_samples(dataset_dir: Path) -> int:
    lst = Path(dataset_dir) / "train-annots" / "train.lst"
    if not lst.is_file():
        raise FileNotFoundError(f"{lst} is missing: not a dataset in the SageMaker layout")
    return sum(1 for line in lst.read_text(encoding="utf-8").splitlines() if line.strip())


def builtin_image_uri(region: str) -> str:
    """The built-in image-classification algorithm's image for ``region`` (SDK v3)."""
    from sagemaker.core import image_uris

    return image_uris.retrieve("image-classification", region, version="1")


def builtin_hyperparameters(num_samples: int, epochs: int, mini_batch_size: int) -> dict[str, str]:
    """As the original notebook set them; SageMaker wants every value as a string."""
    return {"num_classes": "3", "multi_label": "1", "image_shape": "3,240,320", "num_layers": "18",
            "use_pretrained_model": "1", "num_training_samples": str(int(num_samples)),
            "epochs": str(int(epochs)), "mini_batch_size": str(int(mini_batch_size))}


def byoc_hyperparameters(seed: int) -> dict[str, str]:
    return {"seed": str(int(seed))}


def input_channels(dataset_s3_uri: str) -> list[dict]:
    base = dataset_s3_uri.rstrip("/")
    return [{"ChannelName": channel,
             "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": f"{base}/{folder}/",
                                             "S3DataDistributionType": "FullyReplicated"}},
             "ContentType": LST_CONTENT_TYPE, "CompressionType": "None", "InputMode": "File"}
            for channel, folder in CHANNELS.items()]


def job_name(algorithm: str, dataset_version: str, image: str, hyperparameters: dict) -> str:
    """Deterministic: the same dataset, image and hyperparameters name the same job, so a
    re-run attaches to it instead of paying twice (see ``start_training_job``)."""
    digest = hashlib.sha256(json.dumps([algorithm, dataset_version, image, hyperparameters],
                                       sort_keys=True).encode()).hexdigest()[:10]
    ds = re.sub(r"[^A-Za-z0-9]", "", str(dataset_version))[:12] or "dataset"
    return f"factory-stock-{algorithm}-{ds}-{digest}"


def training_job_request(cfg: SageMakerConfig, *, name: str, algorithm: str, image: str, dataset_s3_uri: str,
                         hyperparameters: dict[str, str]) -> dict:
    """The ``CreateTrainingJob`` request."""
    return {
        "TrainingJobName": name,
        "AlgorithmSpecification": {"TrainingImage": image, "TrainingInputMode": "File"},
        "RoleArn": cfg.role_arn,
        "HyperParameters": {k: str(v) for k, v in hyperparameters.items()},
        "InputDataConfig": input_channels(dataset_s3_uri),
        "OutputDataConfig": {"S3OutputPath": cfg.s3_uri("models", algorithm).rstrip("/")},
        "ResourceConfig": {"InstanceType": cfg.training_instance(algorithm), "InstanceCount": 1,
                           "VolumeSizeInGB": int(cfg.volume_size_gb)},
        "StoppingCondition": {"MaxRuntimeInSeconds": int(cfg.max_runtime_seconds)},
        "Tags": [{"Key": "project", "Value": "factory_assets"}, {"Key": "algorithm", "Value": algorithm}],
    }


def _report(log: Callable[[str], None] | None, message: str) -> None:
    """To this module's logger always, and to the caller's log (Dagster's) when given."""
    logger.info(message)
    if log is not None:
        log(message)


def _not_found(exc) -> bool:
    err = getattr(exc, "response", {}).get("Error", {})
    return err.get("Code") in ("ValidationException", "ResourceNotFound") and (
        "not find" in err.get("Message", "").lower() or "not found" in err.get("Message", "").lower())


def describe_job(sm, name: str) -> dict | None:
    from botocore.exceptions import ClientError

    try:
        return sm.describe_training_job(TrainingJobName=name)
    except ClientError as exc:
        if _not_found(exc):
            return None
        raise


def start_training_job(sm, request: dict, log: Callable[[str], None] | None = None) -> str:
    """Create the job, or attach to the one with the same name if it already ran or runs
    (idempotent re-runs); a failed or stopped namesake gets a new attempt suffix."""
    base = request["TrainingJobName"]
    for attempt in range(0, 20):
        name = base if attempt == 0 else f"{base}-r{attempt}"
        existing = describe_job(sm, name)
        if existing is None:
            sm.create_training_job(**{**request, "TrainingJobName": name})
            _report(log, f"training job {name} created ({request['ResourceConfig']['InstanceType']}, "
                f"image {redact(request['AlgorithmSpecification']['TrainingImage'])})")
            return name
        if existing["TrainingJobStatus"] not in ("Failed", "Stopped"):
            _report(log, f"training job {name} already exists ({existing['TrainingJobStatus']}): attaching to it")
            return name
    raise RuntimeError(f"training job {base} failed 20 times: not starting another")


def wait_for_training_job(sm, name: str, *, timeout: float, poll: float,
                          log: Callable[[str], None] | None = None, clock=time.monotonic, sleep=time.sleep) -> dict:
    """Poll until the job is Completed; report each status transition. Raises
    ``TrainingJobFailed`` (with SageMaker's FailureReason) or ``TrainingJobTimeout``."""
    deadline = clock() + timeout
    last = None
    while True:
        desc = sm.describe_training_job(TrainingJobName=name)
        state = (desc["TrainingJobStatus"], desc.get("SecondaryStatus"))
        if state != last:
            _report(log, f"training job {name}: {state[0]} / {state[1]}")
            last = state
        if state[0] == "Completed":
            return desc
        if state[0] in ("Failed", "Stopped"):
            raise TrainingJobFailed(name, state[0], desc.get("FailureReason", ""))
        if clock() >= deadline:
            raise TrainingJobTimeout(name, timeout, f"{state[0]} / {state[1]}")
        sleep(poll)


def job_summary(desc: dict, region: str) -> dict:
    """What the registry and the UI show of a finished job (ARN kept in full for the
    registry; use ``redact`` before logging it)."""
    instance = desc.get("ResourceConfig", {}).get("InstanceType", "")
    billable = desc.get("BillableTimeInSeconds")
    if billable is None and desc.get("TrainingStartTime") and desc.get("TrainingEndTime"):
        billable = int((desc["TrainingEndTime"] - desc["TrainingStartTime"]).total_seconds())
    billable = int(billable or 0)
    price = TRAINING_USD_PER_HOUR.get(instance)
    return {
        "training_job_name": desc["TrainingJobName"],
        "training_job_arn": desc.get("TrainingJobArn"),
        "status": desc.get("TrainingJobStatus"),
        "transitions": [t.get("Status") for t in desc.get("SecondaryStatusTransitions", [])],
        "s3_artifact": desc.get("ModelArtifacts", {}).get("S3ModelArtifacts"),
        "image": desc.get("AlgorithmSpecification", {}).get("TrainingImage"),
        "hyperparameters": desc.get("HyperParameters", {}),
        "instance_type": instance,
        "billable_seconds": billable,
        "estimated_cost_usd": round(billable / 3600 * price, 4) if price is not None else None,
        "final_metrics": {m["MetricName"]: float(m["Value"]) for m in desc.get("FinalMetricDataList", [])},
        "console_url": console_url(region, "jobs", desc["TrainingJobName"]),
    }
