"""The local backend: today's ``LocalTrainer`` (OpenCV + scikit-learn on this machine)."""
from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


class LocalBackendTrainer:
    """``Trainer`` on this machine; a thin wrapper so callers depend on the backend
    protocol rather than on ``vision`` internals."""

    name = "local"

    def __init__(self, **trainer_options):
        self.trainer_options = trainer_options

    def train(self, dataset_dir: Path, out_dir: Path, seed: int = 0):
        from factory_assets.vision.train import LocalTrainer

        logger.info("training locally on %s (seed %s)", dataset_dir, seed)
        return LocalTrainer(**self.trainer_options).train(Path(dataset_dir), Path(out_dir), seed=seed)
