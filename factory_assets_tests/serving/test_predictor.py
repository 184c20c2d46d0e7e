"""The one Predictor interface: the same answers and the same two errors from every backend."""
from __future__ import annotations

import socket

import pytest

from factory_assets.serving.predictor import (BadInput, EndpointUnavailable, HttpEndpointPredictor,
                                              InProcessPredictor, SageMakerRuntimePredictor)
from factory_assets.serving.server import InferenceServer
from factory_assets_tests.twin.slot_model import slot_jpeg, slot_model, slot_model_server  # noqa: F401
from factory_assets_tests.helpers import predict_once


@pytest.fixture
def server(model_server):
    return model_server


@pytest.fixture
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_sagemaker_and_in_process_predictors_agree(server, trained_models, sim_jpeg, aws_env):
    model = trained_models[0].model
    predictions = [predict_once(HttpEndpointPredictor(server.url), sim_jpeg),
                   predict_once(SageMakerRuntimePredictor("factory-stock", endpoint_url=server.url), sim_jpeg),
                   InProcessPredictor(model).predict(sim_jpeg)]
    for p in predictions:
        assert p.probabilities == pytest.approx(model.predict_proba_bytes(sim_jpeg), abs=1e-6)
        assert p.model_version == model.version
        assert p.thresholds == model.thresholds
        assert p.present == {c: p.by_class[c] >= model.thresholds[c] for c in model.classes}
        assert p.latency_ms > 0


@pytest.mark.parametrize("make", ["http", "sagemaker", "inprocess"])
def test_every_predictor_raises_bad_input_for_an_undecodable_image(server, trained_models, make, aws_env):
    predictor = {"http": lambda: HttpEndpointPredictor(server.url),
                 "sagemaker": lambda: SageMakerRuntimePredictor("factory-stock", endpoint_url=server.url),
                 "inprocess": lambda: InProcessPredictor(trained_models[0].model)}[make]()
    with predictor, pytest.raises(BadInput):
        predictor.predict(b"definitely not a jpeg")


@pytest.mark.parametrize("make", ["http", "sagemaker"])
def test_a_server_that_is_down_is_endpoint_unavailable(make, sim_jpeg, aws_env):
    url = f"http://127.0.0.1:{_free_port()}"
    predictor = HttpEndpointPredictor(url, timeout=2) if make == "http" else \
        SageMakerRuntimePredictor("factory-stock", endpoint_url=url)
    with predictor, pytest.raises(EndpointUnavailable):
        predictor.predict(sim_jpeg)


def test_a_sagemaker_predictor_keeps_using_the_client_it_was_given_after_close(server, sim_jpeg, aws_env):
    # the caller's client (its credentials, retries, endpoint) must not be swapped for a default one
    import boto3

    client = boto3.client("sagemaker-runtime", region_name="us-east-1", endpoint_url=server.url)
    predictor = SageMakerRuntimePredictor("factory-stock", endpoint_url="http://127.0.0.1:9", client=client)
    predictor.predict(sim_jpeg)
    predictor.close()
    assert predictor.predict(sim_jpeg).model_version  # through the given client, not a new one to port 9
    predictor.close()
    client.close()


def test_a_server_without_a_model_is_endpoint_unavailable_not_bad_input(sim_jpeg):
    srv = InferenceServer("127.0.0.1", 0, log=lambda *_: None).start()
    try:
        with pytest.raises(EndpointUnavailable, match="503"):
            predict_once(HttpEndpointPredictor(srv.url), sim_jpeg)
    finally:
        srv.stop()


def test_the_http_predictor_recovers_after_the_server_restarts(trained_models, sim_jpeg):
    # The kept-alive connection dies with the server; the next call must reconnect, not fail forever.
    port = _free_port()
    srv = InferenceServer("127.0.0.1", port, log=lambda *_: None)
    srv.slot.swap(trained_models[0].model)
    srv.start()
    predictor = HttpEndpointPredictor(srv.url)
    assert predictor.predict(sim_jpeg).model_version == trained_models[0].version
    srv.stop()
    with pytest.raises(EndpointUnavailable):
        predictor.predict(sim_jpeg)
    srv = InferenceServer("127.0.0.1", port, log=lambda *_: None)
    srv.slot.swap(trained_models[1].model)
    srv.start()
    try:
        assert predictor.predict(sim_jpeg).model_version == trained_models[1].version
    finally:
        predictor.close()
        srv.stop()


def test_every_predictor_carries_a_per_slot_models_slots(slot_model_server, slot_model, slot_jpeg, aws_env):
    model = slot_model.model
    expected = model.predict_details(slot_jpeg)
    predictions = [predict_once(HttpEndpointPredictor(slot_model_server.url), slot_jpeg),
                   predict_once(SageMakerRuntimePredictor("factory-stock", endpoint_url=slot_model_server.url), slot_jpeg),
                   InProcessPredictor(model).predict(slot_jpeg)]
    for p in predictions:
        assert p.model_kind == "slots"
        assert p.slots == expected["slots"]
        assert p.probabilities == pytest.approx(expected["probabilities"], abs=1e-6)
        assert p.present == expected["present"]
        assert p.model_version == model.version


def test_a_presence_model_and_the_plain_list_answer_have_no_slots(server, trained_models, sim_jpeg, aws_env):
    assert predict_once(HttpEndpointPredictor(server.url), sim_jpeg).slots is None
    assert InProcessPredictor(trained_models[0].model).predict(sim_jpeg).slots is None


def test_the_built_in_algorithms_plain_list_still_parses_without_slots(slot_model_server, slot_model, slot_jpeg,
                                                                      aws_env):
    # SageMaker's built-in image classifier answers a bare list: no slots, no kind, still a prediction
    plain = predict_once(SageMakerRuntimePredictor("factory-stock", endpoint_url=slot_model_server.url,
                                      verbose=False), slot_jpeg)
    assert plain.slots is None and plain.model_kind is None
    assert len(plain.probabilities) == 3
    assert plain.probabilities == pytest.approx(slot_model.model.predict_proba_bytes(slot_jpeg), abs=1e-6)


def test_a_verbose_answer_with_malformed_slots_is_endpoint_unavailable():
    from factory_assets.serving.predictor import parse_response

    with pytest.raises(EndpointUnavailable, match="slots"):
        parse_response(b'{"prediction": [0.1, 0.2, 0.3], "slots": [1, 2]}', 1.0)
    parsed = parse_response(b'{"prediction": [0.9, 0.2, 0.3], "model_kind": "slots", '
                            b'"slots": {"A1": {"state": "blue", "type": "BLUE", "probability": 0.9}}}', 1.0)
    assert parsed.model_kind == "slots" and parsed.slots["A1"]["type"] == "BLUE"


def _connections_to(port: int) -> int:
    import psutil

    return sum(1 for c in psutil.Process().net_connections("tcp")
               if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def test_closing_the_http_predictor_closes_every_threads_keep_alive_connection(server, sim_jpeg):
    import threading
    from urllib.parse import urlsplit

    port = urlsplit(server.url).port
    before = _connections_to(port)
    predictor = HttpEndpointPredictor(server.url)
    predictor.predict(sim_jpeg)
    worker = threading.Thread(target=predictor.predict, args=(sim_jpeg,))
    worker.start()
    worker.join()
    assert _connections_to(port) == before + 2  # one kept alive per thread
    predictor.close()
    assert _connections_to(port) == before
    # closed is not broken: the next call opens a new connection
    assert predictor.predict(sim_jpeg).probabilities
    assert _connections_to(port) == before + 1
    predictor.close()
