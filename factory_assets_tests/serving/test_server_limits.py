"""What ``http.server`` lacked: body deadlines, a bound on concurrent requests,
idle keep-alive timeouts and a graceful SIGTERM, against a real server."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import requests

from factory_assets.serving.predictor import EndpointUnavailable, HttpEndpointPredictor
from factory_assets.serving.server import InferenceLimits, InferenceServer
from factory_assets.storage.frames import wait_until
from factory_assets_tests.helpers import predict_once


def _stalled_upload(port: int, body: bytes) -> socket.socket:
    """Headers promising the whole body, ten bytes of it, then nothing."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
    return s


def _read_until_closed(s: socket.socket) -> bytes:
    reply = b""
    while chunk := s.recv(4096):
        reply += chunk
    return reply


def test_stalled_uploads_hold_no_threads_and_are_answered_408_and_closed_while_others_are_served(
        trained_models, sim_jpeg):
    srv = InferenceServer("127.0.0.1", 0, endpoint_name="factory-stock",
                          limits=InferenceLimits(body_timeout=1.0))
    srv.slot.swap(trained_models[0].model)
    srv.start()
    try:
        threads_before = threading.active_count()
        stalled = [_stalled_upload(srv.port, sim_jpeg) for _ in range(50)]
        # served meanwhile, on the same event loop the 50 uploads wait on
        r = requests.post(f"{srv.url}/invocations", data=sim_jpeg, headers={"Content-Type": "image/jpeg"}, timeout=10)
        assert r.status_code == 200 and len(r.json()) == 3
        # no thread per connection (http.server held one for each); a few unrelated ones may come and go
        assert threading.active_count() - threads_before < len(stalled) // 5
        for s in stalled:
            with s:
                reply = _read_until_closed(s)  # the server closes it: recv returns b""
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408")
            assert b"x-amzn-errortype: requesttimeout" in head.lower()
            assert json.loads(body)["error"] == "RequestTimeout"
        assert requests.get(f"{srv.url}/ping", timeout=10).status_code == 200
    finally:
        srv.stop()


class GatedModel:
    """A real trained model whose predictions wait at a gate, to hold requests in flight."""

    def __init__(self, model):
        self.model = model
        self.version, self.classes, self.thresholds = model.version, model.classes, model.thresholds
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Semaphore(0)

    def predict_proba_bytes(self, data: bytes):
        if not self.gate.is_set():
            self.waiting.release()
            self.gate.wait(30)
        return self.model.predict_proba_bytes(data)


def test_requests_beyond_the_concurrency_bound_get_503_with_the_json_error_body(trained_models, sim_jpeg):
    model = GatedModel(trained_models[0].model)
    srv = InferenceServer("127.0.0.1", 0, endpoint_name="factory-stock",
                          limits=InferenceLimits(max_concurrent_requests=2, predict_threads=2))
    srv.slot.swap(model)  # warm-up passes the open gate
    srv.start()
    model.gate.clear()
    statuses: list[int] = []
    holders = [threading.Thread(target=lambda: statuses.append(requests.post(
        f"{srv.url}/invocations", data=sim_jpeg, headers={"Content-Type": "image/jpeg"}, timeout=30).status_code))
        for _ in range(2)]
    try:
        for t in holders:
            t.start()
        for _ in holders:  # both are inside the model, holding the two slots
            assert model.waiting.acquire(timeout=10)
        r = requests.post(f"{srv.url}/invocations", data=sim_jpeg, headers={"Content-Type": "image/jpeg"}, timeout=10)
        assert r.status_code == 503
        assert r.headers["Content-Type"] == "application/json"
        assert r.headers["x-amzn-ErrorType"] == "ServiceUnavailable" and r.headers["Retry-After"] == "1"
        assert r.json()["error"] == "ServiceUnavailable" and "retry" in r.json()["message"]
        # callers see it as an outage to retry, never as a bad image
        try:
            predict_once(HttpEndpointPredictor(srv.url, retries=0), sim_jpeg)
            raise AssertionError("expected EndpointUnavailable")
        except EndpointUnavailable as exc:
            assert "503" in str(exc)
    finally:
        model.gate.set()
        for t in holders:
            t.join(30)
        srv.stop()
    assert statuses == [200, 200]


def test_an_idle_keep_alive_connection_is_closed_by_the_server_after_its_timeout(trained_models):
    srv = InferenceServer("127.0.0.1", 0, limits=InferenceLimits(keep_alive_timeout=1))
    srv.slot.swap(trained_models[0].model)
    srv.start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            s.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = _read_until_closed(s)  # returns once the server has closed the idle connection
        assert reply.startswith(b"HTTP/1.1 200")
    finally:
        srv.stop()


def test_sigterm_lets_the_request_in_flight_finish_and_the_serve_process_exit_0(trained_models, sim_jpeg):
    proc = subprocess.Popen([sys.executable, "-m", "factory_assets.cli", "serve", "--model",
                             str(trained_models[0].model_dir), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = None
        for line in proc.stdout:
            if line.startswith("serving "):
                url = line.split(" on ", 1)[1].split()[0]
                break
        assert url, proc.stderr.read()
        port = int(url.rsplit(":", 1)[1])
        assert requests.get(f"{url}/ping", timeout=10).status_code == 200
        with _stalled_upload(port, sim_jpeg) as s:  # in flight: its body is still arriving
            proc.send_signal(signal.SIGTERM)

            def refuses_new_connections() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    return False
                except OSError:
                    return True

            assert wait_until(refuses_new_connections, timeout=20)  # shutting down, not accepting
            s.sendall(sim_jpeg[10:])
            reply = _read_until_closed(s)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert len(json.loads(body)) == 3
        assert proc.wait(timeout=30) == 0  # SageMaker's grace period
        assert "summary: requests=" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_payload_over_six_mebibytes_is_a_sagemaker_validation_error_even_when_chunked(model_server):
    from factory_assets.serving.server import MAX_PAYLOAD_BYTES

    declared = requests.post(f"{model_server.url}/invocations", data=b"\xff" * (MAX_PAYLOAD_BYTES + 1),
                             headers={"Content-Type": "image/jpeg"}, timeout=30)
    # no Content-Length: the limit is enforced while the body arrives
    chunked = requests.post(f"{model_server.url}/invocations", data=iter([b"\xff" * MAX_PAYLOAD_BYTES, b"\xff"]),
                            headers={"Content-Type": "image/jpeg"}, timeout=30)
    for r in (declared, chunked):
        assert r.status_code == 413
        assert r.headers["x-amzn-ErrorType"] == "ValidationError" and r.json()["error"] == "ValidationError"
    assert requests.get(f"{model_server.url}/ping", timeout=10).status_code == 200


def test_other_methods_are_405_with_a_json_error_and_the_keep_alive_connection_stays_usable(model_server, sim_jpeg):
    with requests.Session() as s:
        r = s.put(f"{model_server.url}/invocations", data=sim_jpeg, headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 405 and r.json()["error"] == "ValidationError"
        assert r.headers["Allow"] == "GET, HEAD, POST"
        assert s.post(f"{model_server.url}/invocations", data=sim_jpeg,
                      headers={"Content-Type": "image/jpeg"}).status_code == 200


def test_a_slot_models_verbose_answer_adds_per_slot_states_and_the_plain_answer_stays_the_list(tmp_path):
    from factory_assets.backends.local import LocalTrainer
    from factory_assets_tests.vision.synthetic import write_simulated_slot_dataset

    dataset = write_simulated_slot_dataset(tmp_path / "ds", n_train=80, n_valid=4, seed=3)
    model = LocalTrainer().train(dataset, tmp_path / "model", seed=0).model
    image = sorted((dataset / "valid-imgs").rglob("*.jp*g"))[0].read_bytes()
    with InferenceServer("127.0.0.1", 0) as srv:
        srv.slot.swap(model)
        plain = requests.post(f"{srv.url}/invocations", data=image, headers={"Content-Type": "image/jpeg"}).json()
        verbose = requests.post(f"{srv.url}/invocations", data=image, headers={
            "Content-Type": "image/jpeg", "Accept": "application/json;verbose"}).json()
    details = model.predict_details(image)
    assert plain == verbose["prediction"] == [round(p, 6) for p in details["probabilities"]]
    assert verbose["model_kind"] == details["model_kind"] and verbose["slots"] == details["slots"]
    assert set(verbose) >= {"prediction", "labels", "model_version", "thresholds", "present"}


def test_connections_beyond_the_connection_bound_get_503_in_the_sagemaker_error_format(model_server):
    srv = InferenceServer("127.0.0.1", 0, limits=InferenceLimits(max_connections=2))
    srv.slot.swap(model_server.slot.current.model)
    srv.start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as idle:
            # the idle connection is open at the server once it has answered a request on it
            idle.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            assert idle.recv(4096).startswith(b"HTTP/1.1 200")
            r = requests.get(f"{srv.url}/ping", timeout=10)  # a second connection: at the bound
        assert r.status_code == 503
        assert r.headers["x-amzn-ErrorType"] == "ServiceUnavailable" and r.json()["error"] == "ServiceUnavailable"
    finally:
        srv.stop()
