"""``SageMakerTrainer``: the ``Trainer`` protocol on SageMaker.

``train`` = ``start`` (upload the dataset if needed, create the job) + ``finish``
(wait, then fetch the artifact). The two halves are public so a caller (or a test
playing SageMaker's part against moto) can act between them."""
from __future__ import annotations

import hashlib
import json
import logging
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from factory_assets.backends.sagemaker import jobs
from factory_assets.backends.sagemaker.config import SageMakerConfig, redact

logger = logging.getLogger(__name__)


@dataclass
class SageMakerTrainResult:
    version: str
    model: Any  # StockModel for byoc; None for the built-in algorithm (an MXNet artifact we do not load)
    metrics: dict
    job: dict
    algorithm: str
    model_dir: Path | None = None
    extra: dict = field(default_factory=dict)


def split_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def download_artifact(s3, uri: str, dest: Path) -> Path:
    """Download ``model.tar.gz`` and unpack it into ``dest`` (no absolute paths, links or
    ``..`` members: ``tarfile``'s ``data`` filter)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    bucket, key = split_s3_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "model.tar.gz"
        s3.download_file(bucket, key, str(archive))
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(dest, filter="data")
    return dest


def pack_model_dir(model_dir: Path, archive: Path) -> Path:
    """``model.tar.gz`` of a model folder, as SageMaker packs ``/opt/ml/model``."""
    with tarfile.open(archive, "w:gz") as tar:
        for p in sorted(Path(model_dir).rglob("*")):
            if p.is_file():
                tar.add(p, arcname=p.relative_to(model_dir).as_posix())
    return archive


def builtin_version(job: dict) -> str:
    """The built-in algorithm's artifact is not ours to hash: its version names the job and artifact."""
    key = json.dumps([job["training_job_name"], job.get("s3_artifact")]).encode()
    return "sm-" + hashlib.sha256(key).hexdigest()[:16]


class SageMakerTrainer:
    name = "sagemaker"

    def __init__(self, config: SageMakerConfig, *, algorithm: str | None = None, dataset_version: str | None = None,
                 dataset_s3_uri: str | None = None, sagemaker_client=None, s3_client=None,
                 log: Callable[[str], None] | None = None):
        self.config = config
        self.algorithm = algorithm or config.algorithm
        self.dataset_version = dataset_version
        self.dataset_s3_uri = dataset_s3_uri
        self._sm, self._s3 = sagemaker_client, s3_client
        self.log = log

    def _log(self, message: str) -> None:
        logger.info(message)
        if self.log is not None:
            self.log(message)

    @property
    def sm(self):
        if self._sm is None:
            self._sm = self.config.sagemaker_client()
        return self._sm

    @property
    def s3(self):
        if self._s3 is None:
            self._s3 = self.config.s3_client()
        return self._s3

    def image(self) -> str:
        return self.config.byoc_image_uri if self.algorithm == "byoc" else jobs.builtin_image_uri(self.config.region)

    def request(self, dataset_dir: Path, seed: int = 0, dataset_s3_uri: str | None = None) -> dict:
        """The CreateTrainingJob request for this dataset (no AWS call)."""
        self.config.validate(algorithm=self.algorithm)
        dataset_dir = Path(dataset_dir)
        version = self.dataset_version or dataset_dir.name
        if self.algorithm == "builtin":
            hp = jobs.builtin_hyperparameters(jobs.num_training_samples(dataset_dir), self.config.epochs,
                                              self.config.mini_batch_size)
        else:
            hp = jobs.byoc_hyperparameters(seed)
        image = self.image()
        uri = dataset_s3_uri or self.dataset_s3_uri or self.config.s3_uri("datasets", version)
        return jobs.training_job_request(self.config, name=jobs.job_name(self.algorithm, version, image, hp),
                                         algorithm=self.algorithm, image=image, dataset_s3_uri=uri,
                                         hyperparameters=hp)

    def upload_dataset(self, dataset_dir: Path) -> str:
        """The dataset under ``s3://bucket/prefix/datasets/<version>/`` through the same
        staged upload as ``training_manifests`` (``datasets.manifests.upload_to_s3``)."""
        from factory_assets.datasets.manifests import upload_to_s3

        version = self.dataset_version or Path(dataset_dir).name
        uri = upload_to_s3(self.s3, Path(dataset_dir), self.config.bucket,
                           f"{self.config.prefix.strip('/')}/datasets", version)
        self._log(f"dataset {version} uploaded to {uri}")
        return uri

    def start(self, dataset_dir: Path, seed: int = 0) -> str:
        """Validate (before any AWS call), upload the dataset unless it is already in S3,
        create (or attach to) the training job; returns the job name."""
        self.config.validate(algorithm=self.algorithm)
        uri = self.dataset_s3_uri or self.upload_dataset(dataset_dir)
        self.dataset_s3_uri = uri
        return jobs.start_training_job(self.sm, self.request(dataset_dir, seed, uri), log=self.log)

    def finish(self, name: str, out_dir: Path, *, timeout: float | None = None,
               poll: float | None = None) -> SageMakerTrainResult:
        """Wait for the job; for byoc, download and load the model it wrote."""
        desc = jobs.wait_for_training_job(
            self.sm, name, timeout=self.config.training_timeout_seconds if timeout is None else timeout,
            poll=self.config.poll_seconds if poll is None else poll, log=self.log)
        job = jobs.job_summary(desc, self.config.region)
        self._log(f"training job {name} completed: {job['billable_seconds']} billable s on {job['instance_type']}, "
                 f"artifact {redact(job['s3_artifact'])}")
        if self.algorithm == "builtin":
            return SageMakerTrainResult(builtin_version(job), None, {"final_metrics": job["final_metrics"]}, job,
                                        "builtin")
        from factory_assets.vision.model import StockModel

        model_dir = download_artifact(self.s3, job["s3_artifact"], Path(out_dir))
        model = StockModel.load(model_dir)
        metrics_file = model_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else {}
        return SageMakerTrainResult(model.version, model, metrics, job, "byoc", model_dir)

    def train(self, dataset_dir: Path, out_dir: Path, seed: int = 0) -> SageMakerTrainResult:
        return self.finish(self.start(dataset_dir, seed), out_dir)
