from typing import Optional

import dagster as dg
from pydantic import Field


class DatasetTargetResource(dg.ConfigurableResource):
    """Where training datasets are written. Always a local folder (the trainer reads
    it); with ``s3_bucket`` set, also uploaded under ``s3://bucket/prefix/<version>/``
    through dagster-aws's ``S3Resource`` (credentials from the usual AWS chain)."""

    local_root: Optional[str] = Field(default=None, description="default .factory/datasets")
    s3_bucket: Optional[str] = Field(default=None, description="S3 bucket for SageMaker training; unset = local only")
    s3_prefix: str = Field(default="datasets/warehouse", description="key prefix inside the bucket")

    def root(self):
        from pathlib import Path

        from factory_assets import config

        return Path(self.local_root) if self.local_root else config.factory_home() / "datasets"
