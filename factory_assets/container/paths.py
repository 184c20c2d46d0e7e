from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT = "/opt/ml"


@dataclass(frozen=True)
class MLPaths:
    root: Path

    @classmethod
    def resolve(cls, root: str | os.PathLike | None = None) -> "MLPaths":
        return cls(Path(root or os.environ.get("SM_ML_ROOT") or DEFAULT_ROOT))

    @property
    def hyperparameters(self) -> Path:
        return self.root / "input" / "config" / "hyperparameters.json"

    def channel(self, name: str) -> Path:
        return self.root / "input" / "data" / name

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def models_dir(self) -> Path:
        """Multi-model endpoints: SageMaker unpacks each ``<name>.tar.gz`` into
        ``models/<model_name>/model`` and names that folder in ``POST /models``."""
        return self.root / "models"

    @property
    def output_dir(self) -> Path:
        return self.root / "output"

    @property
    def failure(self) -> Path:
        return self.output_dir / "failure"
