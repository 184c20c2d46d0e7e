"""Two small real models trained on simulated frames (different seeds -> different
versions), shared by the serving tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sim_dataset(tmp_path_factory):
    from factory_assets.ingest.simdata import write_simulated_dataset

    return write_simulated_dataset(tmp_path_factory.mktemp("sim") / "dataset", n_train=60, n_valid=20, seed=1)


@pytest.fixture(scope="session")
def trained_models(sim_dataset, tmp_path_factory):
    from factory_assets.vision.train import LocalTrainer

    out = tmp_path_factory.mktemp("models")
    first = LocalTrainer().train(sim_dataset, out / "a", seed=0)
    second = LocalTrainer().train(sim_dataset, out / "b", seed=1)
    assert first.version != second.version
    return first, second


@pytest.fixture
def sim_jpeg(sim_dataset):
    return next(sorted((sim_dataset / "valid-imgs").rglob("*.jp*g")).__iter__()).read_bytes()
