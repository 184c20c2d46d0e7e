"""Many models in one inference server, as SageMaker multi-model endpoints host them: the
caller names the model, it loads on first use from the registry into a byte-bounded LRU
cache. Real server on 127.0.0.1, real MongoDB registry."""
from __future__ import annotations

import pytest
import requests

TARGET = "X-Amzn-SageMaker-Target-Model"


def shifted(model, by: float):
    """A different model of the same size: the calibration's intercepts moved by ``by``
    (another version, other probabilities)."""
    import numpy as np

    from factory_assets.vision.model import StockModel

    calibration = np.array(model.calibration, copy=True)
    calibration[:, 1] += by
    return StockModel(model.reference, model.weights, calibration, model.thresholds, model.config,
                      model.metadata, model.classes)


@pytest.fixture
def registry(fdb, trained_models):
    """Three models in the registry: the two trained ones and a shifted copy of the first."""
    from factory_assets.storage.models import register_model

    models = [trained_models[0].model, trained_models[1].model, shifted(trained_models[0].model, 1.5)]
    for model in models:
        register_model(fdb, model, dataset_version="d1", code_version="c1")
    assert len({m.version for m in models}) == 3
    return models


def _server(fdb, max_bytes: int | None = None):
    from factory_assets.serving.cache import ModelCache
    from factory_assets.serving.models import RegistrySource
    from factory_assets.serving.server import InferenceServer

    cache = ModelCache(max_bytes, RegistrySource(fdb))
    return InferenceServer("127.0.0.1", 0, models=cache, multi_model=True).start()


def _invoke(server, name: str, image: bytes):
    return requests.post(f"{server.url}/invocations", data=image,
                         headers={"Content-Type": "image/jpeg", TARGET: name}, timeout=30)


def _loaded(server) -> set[str]:
    return {m["modelName"] for m in requests.get(f"{server.url}/models", timeout=10).json()["models"]}


def test_two_models_served_from_one_server_by_name_each_give_their_own_answer(
        fdb, mongo_uri, database_name, registry, sim_jpeg):
    from factory_assets.serving.models import model_name
    from factory_assets.serving.predictor import HttpEndpointPredictor
    from factory_assets.serving.server import build_server
    from factory_assets.storage.models import set_endpoint_version

    first, second, _ = registry
    set_endpoint_version(fdb, "factory-stock", first.version)
    # today's server, following its endpoint, hosts any registered model by name beside it
    server = build_server("127.0.0.1", 0, endpoint_name="factory-stock", uri=mongo_uri, database=database_name,
                          poll_seconds=60).start()
    try:
        names = {model_name("factory-1", "txt-cam", first.version): first,
                 model_name("factory-2", "txt-cam", second.version): second}
        answers = {}
        for name, model in names.items():
            r = _invoke(server, name, sim_jpeg)
            assert r.status_code == 200, r.text
            assert r.headers["X-Model-Version"] == model.version
            assert r.json() == pytest.approx(model.predict_proba_bytes(sim_jpeg), abs=1e-6)
            answers[name] = r.json()
        assert answers[next(iter(names))] != answers[list(names)[1]]
        # without a name: the endpoint's model, as before
        plain = requests.post(f"{server.url}/invocations", data=sim_jpeg, headers={"Content-Type": "image/jpeg"})
        assert plain.headers["X-Model-Version"] == first.version
        # one predictor for every factory, naming the model per call
        with HttpEndpointPredictor(server.url) as predictor:
            for name, model in names.items():
                prediction = predictor.predict(sim_jpeg, target_model=name)
                assert prediction.model_version == model.version
                assert prediction.probabilities == pytest.approx(model.predict_proba_bytes(sim_jpeg), abs=1e-6)
            # SageMaker's TargetModel form (the archive's name) reaches the same model
            tar_name = model_name("factory-2", "txt-cam", second.version) + ".tar.gz"
            assert predictor.predict(sim_jpeg, target_model=tar_name).model_version == second.version
        assert _loaded(server) == set(names)
    finally:
        server.stop()


def test_the_cache_evicts_the_least_recently_used_model_under_its_byte_limit_and_reloads_it_on_demand(
        fdb, registry, sim_jpeg):
    from factory_assets.serving.cache import model_nbytes

    a, b, c = (m.version for m in registry)
    size = model_nbytes(registry[0])
    assert {model_nbytes(m) for m in registry} == {size}
    server = _server(fdb, max_bytes=int(size * 2.5))  # room for two
    try:
        def status():
            return requests.get(f"{server.url}/status", timeout=10).json()["models"]

        for version in (a, b, a):  # a, b loaded; a used again: b is now the least recently used
            assert _invoke(server, version, sim_jpeg).status_code == 200
        assert _loaded(server) == {a, b} and status()["loads"] == 2
        assert _invoke(server, c, sim_jpeg).status_code == 200
        assert _loaded(server) == {a, c}  # b evicted, not a
        assert status()["evictions"] == 1 and status()["bytes"] <= status()["max_bytes"]

        r = _invoke(server, b, sim_jpeg)  # b comes back on demand, a (now the coldest) goes
        assert r.status_code == 200 and r.headers["X-Model-Version"] == b
        assert r.json() == pytest.approx(registry[1].predict_proba_bytes(sim_jpeg), abs=1e-6)
        assert _loaded(server) == {b, c}
        s = status()
        assert (s["loads"], s["evictions"], s["loaded"]) == (4, 2, 2) and s["bytes"] == 2 * size
        assert requests.get(f"{server.url}/models/{b}", timeout=10).json()["loads"] == 2
        assert requests.get(f"{server.url}/models/{c}", timeout=10).json()["loads"] == 1
    finally:
        server.stop()


def test_concurrent_first_requests_for_one_model_load_it_once(fdb, registry, sim_jpeg):
    from concurrent.futures import ThreadPoolExecutor

    server = _server(fdb)
    try:
        version = registry[2].version
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: _invoke(server, version, sim_jpeg).status_code, range(8)))
        assert codes == [200] * 8
        assert requests.get(f"{server.url}/status", timeout=10).json()["models"]["loads"] == 1
    finally:
        server.stop()


def test_an_unknown_model_is_a_404_in_sagemakers_error_shape_and_the_predictor_says_so(fdb, registry, sim_jpeg):
    from factory_assets.serving.models import InvalidModelName
    from factory_assets.serving.predictor import EndpointUnavailable, HttpEndpointPredictor, UnknownModel

    server = _server(fdb)
    try:
        r = _invoke(server, "factory-1--txt-cam--0123456789abcdef", sim_jpeg)
        assert r.status_code == 404
        assert r.headers["x-amzn-ErrorType"] == "ValidationError" and r.json()["error"] == "ValidationError"
        assert "0123456789abcdef" in r.json()["message"] and "not in the registry" in r.json()["message"]
        with HttpEndpointPredictor(server.url) as predictor:
            with pytest.raises(UnknownModel) as caught:
                predictor.predict(sim_jpeg, target_model="factory-1--txt-cam--0123456789abcdef")
        assert isinstance(caught.value, EndpointUnavailable)  # retried later, never a quarantined frame
        assert caught.value.model == "factory-1--txt-cam--0123456789abcdef"
        with pytest.raises(InvalidModelName):  # a malformed name is refused before sending, not blamed on the image
            predictor.predict(sim_jpeg, target_model="factory-1--txt-cam")
        # a name that is no model name at all is the caller's mistake
        r = _invoke(server, "factory-1--txt-cam", sim_jpeg)
        assert r.status_code == 400 and "neither" in r.json()["message"]
        # a server that hosts only named models needs the name
        r = requests.post(f"{server.url}/invocations", data=sim_jpeg, headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 400 and TARGET in r.json()["message"]
        assert requests.get(f"{server.url}/ping", timeout=10).status_code == 200
        assert _loaded(server) == set()
    finally:
        server.stop()


def test_a_model_registered_for_one_factory_is_never_served_under_another_factorys_name(fdb, registry, sim_jpeg):
    from factory_assets.serving.models import model_name
    from factory_assets.storage.models import annotate_model

    model = registry[1]
    annotate_model(fdb, model.version, {"factory_id": "factory-2", "camera_id": "txt-cam"})
    server = _server(fdb)
    try:
        r = _invoke(server, model_name("factory-1", "txt-cam", model.version), sim_jpeg)
        assert r.status_code == 404 and "registered for factory_id 'factory-2'" in r.json()["message"]
        r = _invoke(server, model_name("factory-2", "cam-2", model.version), sim_jpeg)
        assert r.status_code == 404 and "camera_id 'txt-cam'" in r.json()["message"]
        assert _invoke(server, model_name("factory-2", "txt-cam", model.version), sim_jpeg).status_code == 200
    finally:
        server.stop()


def test_a_model_bigger_than_the_whole_cache_is_507_and_the_server_lives_on(fdb, registry, sim_jpeg):
    from factory_assets.serving.cache import model_nbytes

    server = _server(fdb, max_bytes=model_nbytes(registry[0]) - 1)
    try:
        r = _invoke(server, registry[0].version, sim_jpeg)
        assert r.status_code == 507 and r.json()["error"] == "InsufficientStorage"
        assert "more than the whole cache" in r.json()["message"]
        assert _loaded(server) == set()
        assert requests.get(f"{server.url}/ping", timeout=10).status_code == 200
    finally:
        server.stop()


def test_model_names_carry_factory_camera_and_version_and_refuse_ambiguous_parts():
    from factory_assets.serving.models import InvalidModelName, ModelName, model_name, parse_model_name
    from factory_assets.serving.models import target_model_path

    name = model_name("factory-7", "rack_cam.2", "865e55e9d7c79447")
    assert name == "factory-7--rack_cam.2--865e55e9d7c79447"
    assert parse_model_name(name) == ModelName("865e55e9d7c79447", "factory-7", "rack_cam.2")
    assert parse_model_name(name + ".tar.gz") == parse_model_name(name)
    assert parse_model_name("865e55e9d7c79447") == ModelName("865e55e9d7c79447")
    assert target_model_path(name) == name + ".tar.gz" == target_model_path(name + ".tar.gz")
    for factory in ("factory--7", "-f", "f-", "a/b", "..", "f 1", ""):
        with pytest.raises(InvalidModelName):
            model_name(factory, "cam", "v1")
    for bad in ("a--b", "a--b--c--d", "../x", "a--b--"):
        with pytest.raises(InvalidModelName):
            parse_model_name(bad)
