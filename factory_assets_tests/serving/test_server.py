"""The SageMaker inference-container contract, against a real server on 127.0.0.1."""
from __future__ import annotations

import json
import threading

import pytest
import requests

from factory_assets.serving.server import MAX_PAYLOAD_BYTES, InferenceServer
from factory_assets.storage.frames import wait_until
from factory_assets_tests.helpers import predict_once


@pytest.fixture
def server(model_server):
    return model_server


@pytest.fixture
def empty_server():
    srv = InferenceServer("127.0.0.1", 0, endpoint_name="factory-stock").start()
    yield srv
    srv.stop()


def test_ping_is_200_with_the_model_version_once_a_model_is_loaded(server, trained_models):
    r = requests.get(f"{server.url}/ping")
    assert r.status_code == 200
    assert r.headers["X-Model-Version"] == trained_models[0].version


def test_ping_is_503_while_no_model_is_loaded(empty_server):
    r = requests.get(f"{empty_server.url}/ping")
    assert r.status_code == 503
    assert r.json()["error"] == "ModelNotReady"


def test_invocations_return_the_probability_list_in_class_order(server, sim_jpeg, trained_models):
    r = requests.post(f"{server.url}/invocations", data=sim_jpeg, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    probs = r.json()
    expected = trained_models[0].model.predict_proba_bytes(sim_jpeg)
    assert probs == pytest.approx(expected, abs=1e-6)
    assert len(probs) == 3 and all(0.0 <= p <= 1.0 for p in probs)


def test_the_endpoint_path_and_x_image_content_type_work_like_sagemaker(server, sim_jpeg):
    r = requests.post(f"{server.url}/endpoints/factory-stock/invocations", data=sim_jpeg,
                      headers={"Content-Type": "application/x-image"})
    assert r.status_code == 200 and len(r.json()) == 3


def test_verbose_accept_adds_labels_version_thresholds_and_decisions(server, sim_jpeg, trained_models):
    r = requests.post(f"{server.url}/invocations", data=sim_jpeg,
                      headers={"Content-Type": "image/jpeg", "Accept": "application/json;verbose"})
    body = r.json()
    model = trained_models[0].model
    assert body["labels"] == ["blue", "red", "white"]
    assert body["model_version"] == model.version
    assert body["thresholds"] == model.thresholds
    assert body["present"] == {c: p >= model.thresholds[c] for c, p in zip(body["labels"], body["prediction"])}


def test_a_png_is_accepted(server):
    from factory_assets_tests.helpers import png_bytes

    r = requests.post(f"{server.url}/invocations", data=png_bytes(), headers={"Content-Type": "image/png"})
    assert r.status_code == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", ""])
def test_an_unsupported_content_type_is_415(server, sim_jpeg, content_type):
    r = requests.post(f"{server.url}/invocations", data=sim_jpeg, headers={"Content-Type": content_type})
    assert r.status_code == 415
    assert r.json()["error"] == "UnsupportedMediaType"


def test_a_payload_over_six_mebibytes_is_413_and_the_server_lives_on(server, sim_jpeg):
    r = requests.post(f"{server.url}/invocations", data=b"\xff" * (MAX_PAYLOAD_BYTES + 1),
                      headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 413
    assert "limit" in r.json()["message"]
    assert requests.post(f"{server.url}/invocations", data=sim_jpeg,
                         headers={"Content-Type": "image/jpeg"}).status_code == 200


@pytest.mark.parametrize("body", [b"not an image at all", b"\xff\xd8\xff\xe0" + b"\x00" * 200, b""])
def test_an_undecodable_image_is_400_with_a_json_error(server, body):
    r = requests.post(f"{server.url}/invocations", data=body, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 400
    assert r.json()["error"] == "ModelError"


def test_a_truncated_jpeg_is_400(server, sim_jpeg):
    r = requests.post(f"{server.url}/invocations", data=sim_jpeg[: len(sim_jpeg) // 2],
                      headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 400


def test_another_endpoint_name_is_404(server, sim_jpeg):
    r = requests.post(f"{server.url}/endpoints/other/invocations", data=sim_jpeg,
                      headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 404


def test_invocations_are_503_while_no_model_is_loaded(empty_server, sim_jpeg):
    r = requests.post(f"{empty_server.url}/invocations", data=sim_jpeg, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 503


def test_one_keep_alive_connection_survives_a_sequence_of_bad_and_good_requests(server, sim_jpeg):
    # An error that left an unread body on the connection would corrupt the next request.
    with requests.Session() as s:
        statuses = [s.post(f"{server.url}{path}", data=data, headers={"Content-Type": ct}).status_code
                    for path, data, ct in [("/invocations", b"junk", "image/jpeg"),
                                           ("/nowhere", sim_jpeg, "image/jpeg"),
                                           ("/invocations", sim_jpeg, "text/csv"),
                                           ("/invocations", sim_jpeg, "image/jpeg")]]
    assert statuses == [400, 404, 415, 200]


def test_unmodified_boto3_invoke_endpoint_works_against_the_server(server, sim_jpeg, trained_models, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    client = boto3.client("sagemaker-runtime", region_name="us-east-1", endpoint_url=server.url)
    resp = client.invoke_endpoint(EndpointName="factory-stock", ContentType="image/jpeg", Body=sim_jpeg)
    assert resp["ContentType"] == "application/json"
    assert resp["InvokedProductionVariant"] == "AllTraffic"
    assert json.loads(resp["Body"].read()) == pytest.approx(trained_models[0].model.predict_proba_bytes(sim_jpeg),
                                                            abs=1e-6)


def test_boto3_sees_a_bad_image_as_a_client_error(server, monkeypatch):
    import boto3
    from botocore.exceptions import ClientError

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    client = boto3.client("sagemaker-runtime", region_name="us-east-1", endpoint_url=server.url)
    with pytest.raises(ClientError) as err:
        client.invoke_endpoint(EndpointName="factory-stock", ContentType="image/jpeg", Body=b"junk")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert err.value.response["Error"]["Code"] == "ModelError"


def test_the_server_follows_the_endpoint_document_and_hot_swaps_under_load(fdb, mongo_uri, database_name,
                                                                           trained_models, sim_jpeg):
    from factory_assets.serving.predictor import HttpEndpointPredictor
    from factory_assets.storage.models import get_endpoint, register_model, set_checks, set_endpoint_version

    a, b = (r.model for r in trained_models)
    for m in (a, b):
        register_model(fdb, m, dataset_version="d", code_version="c")
        set_checks(fdb, m.version, True, {})
    set_endpoint_version(fdb, "factory-stock", a.version)
    srv = InferenceServer("127.0.0.1", 0, endpoint_name="factory-stock")
    srv.follow(mongo_uri, database_name, poll_seconds=0.1)
    srv.start()
    try:
        assert srv.slot.current.version == a.version
        versions, failures = [], []
        stop = threading.Event()

        def client():
            predictor = HttpEndpointPredictor(srv.url)
            while not stop.is_set():
                try:
                    versions.append(predictor.predict(sim_jpeg).model_version)
                except Exception as exc:  # any failure during the swap is a defect
                    failures.append(repr(exc))

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        assert wait_until(lambda: len(versions) >= 20, timeout=20)  # load is running on the old model
        set_endpoint_version(fdb, "factory-stock", b.version)
        assert wait_until(lambda: srv.slot.current.version == b.version, timeout=20)
        seen = len(versions)
        assert wait_until(lambda: len(versions) >= seen + 20, timeout=20)  # and keeps running after the swap
        stop.set()
        for t in threads:
            t.join()
        assert failures == []
        assert versions[0] == a.version and versions[-1] == b.version
        assert predict_once(HttpEndpointPredictor(srv.url), sim_jpeg).model_version == b.version
        assert wait_until(lambda: get_endpoint(fdb, "factory-stock").get("status") == "InService", timeout=10)
        doc = get_endpoint(fdb, "factory-stock")
        assert doc["served_version"] == b.version and doc["status"] == "InService"
    finally:
        srv.stop()
