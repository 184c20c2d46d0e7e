"""A real per-slot model (trained on simulated frames with slot labels) and a real inference
server serving it, for the tests that carry its slots from a frame to the twin. Trained once
per test process whichever module asks first."""
from __future__ import annotations

import pytest

_TRAINED: dict = {}


@pytest.fixture(scope="session")
def slot_model(tmp_path_factory):
    if "result" not in _TRAINED:
        from factory_assets.backends.local import LocalTrainer
        from factory_assets_tests.vision.synthetic import write_simulated_slot_dataset

        root = tmp_path_factory.mktemp("slot_model")
        dataset = write_simulated_slot_dataset(root / "ds", n_train=80, n_valid=20, seed=3)
        _TRAINED["result"] = LocalTrainer().train(dataset, root / "model", seed=0)
        _TRAINED["dataset"] = dataset
    assert _TRAINED["result"].metrics["model_kind"] == "slots"
    return _TRAINED["result"]


@pytest.fixture(scope="session")
def slot_jpeg(slot_model):
    return sorted((_TRAINED["dataset"] / "valid-imgs").glob("*.jpeg"))[0].read_bytes()


@pytest.fixture
def slot_model_server(slot_model):
    """Our inference server on a free 127.0.0.1 port serving the per-slot model."""
    from factory_assets.serving.server import InferenceServer

    srv = InferenceServer("127.0.0.1", 0, endpoint_name="factory-stock")
    srv.slot.swap(slot_model.model)
    srv.start()
    yield srv
    srv.stop()
