"""The API's OpenAPI document tells the truth: every status the real server answers is declared for
its operation, with a body that matches the declared schema. Two ways: the answers each rule is
there for, provoked one by one, and a property-based fuzzer (schemathesis) over every operation."""
from __future__ import annotations

import json
import re
import socket
from datetime import timedelta

import pytest
import requests

from factory_assets_tests.api.conftest import BASE_TS

OPERATIONS = ("get", "put", "post", "patch", "delete")


def _document(base: str) -> dict:
    r = requests.get(base + "/openapi.json", timeout=10)
    assert r.status_code == 200
    return r.json()


def _operation(doc: dict, method: str, url_path: str) -> tuple[str, dict]:
    """The operation a concrete path belongs to (templates matched like the router does)."""
    for template, item in doc["paths"].items():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, url_path) and method.lower() in item:
            return template, item[method.lower()]
    raise AssertionError(f"no operation {method} {url_path} in the document")


def assert_declared(doc: dict, method: str, url_path: str, response: requests.Response) -> None:
    """The status is declared for the operation, the body matches its schema, its headers are there."""
    from jsonschema import Draft202012Validator

    template, op = _operation(doc, method, url_path)
    declared = op["responses"].get(str(response.status_code))
    assert declared is not None, (f"{method} {template} answered {response.status_code}, which its document "
                                  f"does not declare (declared: {sorted(op['responses'])}): {response.text[:200]}")
    content = declared.get("content", {})
    if response.status_code == 304:
        assert response.content == b""
    elif not response.headers["content-type"].startswith("application/json"):
        assert response.headers["content-type"].split(";")[0] in content, (method, template, response.status_code)
    else:
        assert "application/json" in content, (method, template, response.status_code)
        schema = {**content["application/json"]["schema"], "components": doc["components"]}
        errors = sorted(e.message for e in Draft202012Validator(schema).iter_errors(response.json()))
        assert errors == [], f"{method} {template} {response.status_code}: {errors}"
    for name in declared.get("headers", {}):
        if name in ("WWW-Authenticate", "ETag", "Retry-After", "Location"):
            assert name in response.headers, f"{method} {template} {response.status_code} without {name}"


# -- the document itself ------------------------------------------------------------------------
def test_every_operation_of_the_app_has_an_entry_in_the_contract_table(api):
    from factory_assets.api.openapi import ROUTES

    doc = _document(api.url)
    operations = {(m, p) for p, item in doc["paths"].items() for m in item if m in OPERATIONS}
    assert operations == set(ROUTES), "declare each new route's answers in factory_assets.api.openapi.ROUTES"


def test_every_error_status_is_declared_with_the_error_body_and_never_fastapis_detail_shape(api):
    doc = _document(api.url)
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert set(doc["components"]["securitySchemes"]) == {"bearerToken", "tokenQuery"}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            codes = {int(s) for s in op["responses"]}
            assert {408, 413, 503} <= codes, (method, path)  # the server's own bounds, on every route
            if "{" in path:
                assert 404 in codes, (method, path)
            if op.get("parameters") or op.get("requestBody"):
                assert 422 in codes, (method, path)
            if op.get("requestBody"):
                assert 400 in codes, (method, path)
            for status, resp in op["responses"].items():
                if int(status) >= 400:
                    schema = json.dumps(resp["content"]["application/json"]["schema"])
                    assert "#/components/schemas/Error" in schema or "#/components/schemas/Health" in schema \
                        or "#/components/schemas/InvalidRequest" in schema \
                        or "#/components/schemas/VersionConflict" in schema, (method, path, status)
    twin = doc["paths"]["/api/factories/{factory_id}/twin"]["get"]
    assert "ETag" in twin["responses"]["304"]["headers"]
    desired = doc["paths"]["/api/factories/{factory_id}/twin/desired"]["patch"]
    assert {401, 403, 412, 428} <= {int(s) for s in desired["responses"]}
    assert desired["security"] == [{"bearerToken": []}, {"tokenQuery": []}]
    assert {} in twin["security"]  # reads may be open


# -- each answer, provoked ---------------------------------------------------------------------------
@pytest.fixture
def frame(fdb):
    """One simulated camera frame stored by the real ingest path."""
    from factory_assets.ingest.service import Ingestor
    from factory_assets.simulation.factory import FactorySimulator

    jpeg, _ = FactorySimulator(seed=2, start=BASE_TS).frame(0.0)
    ingestor = Ingestor(fdb)
    assert ingestor.add_image(jpeg, ts=BASE_TS + timedelta(seconds=30), source={"kind": "test"})
    ingestor.flush()
    return fdb.frames.find_one({}, {"image": 0, "data": 0})


def test_each_error_the_server_answers_is_declared_with_its_schema(api, fdb, write_token, frame):
    from factory_assets.api.tokens import create_token

    reader = create_token(fdb, "viewer", "read")
    doc = _document(api.url)
    twin, desired = "/api/factories/factory-1/twin", "/api/factories/factory-1/twin/desired"
    write = {"Authorization": f"Bearer {write_token}"}
    order = ("POST", "/api/factories/factory-1/orders")
    cases = [
        ("GET", "/api/factories", {}, 200),
        ("GET", twin, {}, 200),
        ("GET", twin, {"headers": {"If-None-Match": '"1"'}}, 304),
        ("GET", "/api/factories/factory-9/twin", {}, 404),
        ("GET", "/api/factories/a%20b/twin", {}, 422),
        ("GET", twin + "/history", {"params": {"since": "yesterday"}}, 400),
        ("GET", twin + "/history", {"params": {"limit": 0}}, 422),
        ("GET", "/api/factories/factory-9/twin/history", {}, 404),
        ("GET", twin + "/events", {"headers": {"Last-Event-ID": "soon"}}, 400),
        ("GET", "/api/factories/factory-9/twin/events", {}, 404),
        ("PATCH", desired, {"json": {"stock": {"red": 1}}}, 401),
        ("PATCH", desired, {"json": {"stock": {"red": 1}}, "headers": {"Authorization": f"Bearer {reader}"}}, 403),
        ("PATCH", desired, {"data": b'{"stock": ', "headers": {**write, "Content-Type": "application/json"}}, 400),
        ("PATCH", desired, {"json": {"stock": {"red": 1}}, "headers": write}, 428),
        ("PATCH", desired, {"json": {"stock": {"red": 1}}, "headers": {**write, "If-Match": "one"}}, 400),
        ("PATCH", desired, {"json": {"stock": {"red": 1}}, "headers": {**write, "If-Match": '"7"'}}, 412),
        ("PATCH", desired, {"json": {"stock": {"green": 1}}, "headers": {**write, "If-Match": '"1"'}}, 422),
        ("PATCH", desired, {"data": b"x" * (17 * 1024), "headers": write}, 413),
        ("PATCH", "/api/factories/factory-9/twin/desired",
         {"json": {"stock": {"red": 1}}, "headers": {**write, "If-Match": '"1"'}}, 404),
        ("GET", "/api/factories/factory-1/orders", {}, 200),
        ("GET", "/api/factories/factory-9/orders", {}, 404),
        ("GET", "/api/frames/latest", {}, 200),
        ("GET", "/api/frames/latest", {"params": {"factory": "line-2"}}, 404),
        ("GET", "/api/frames/latest", {"params": {"factory": "no/such"}}, 422),
        ("GET", "/api/frames/nope.jpg", {}, 400),
        ("GET", "/api/frames/0123456789abcdef01234567.jpg", {}, 404),
        ("GET", f"/api/frames/{frame['_id']}.jpg", {}, 200),
        ("GET", f"/api/frames/{frame['_id']}/evidence", {}, 200),
        ("GET", "/api/frames/nope/evidence", {}, 400),
        ("GET", "/api/frames/0123456789abcdef01234567/evidence", {}, 404),
        ("GET", "/api/health", {}, 200),
        ("GET", "/api/factories", {"data": b"x" * (17 * 1024)}, 413),  # the body limit holds on every route
        # orders: the rack holds one red piece (the fixture's report)
        (*order, {"json": {"type": "RED"}, "headers": {**write, "Idempotency-Key": "k-1"}}, 201),
        (*order, {"json": {"type": "RED"}, "headers": {**write, "Idempotency-Key": "k-1"}}, 201),  # replayed
        (*order, {"json": {"type": "BLUE"}, "headers": {**write, "Idempotency-Key": "k-1"}}, 422),
        (*order, {"json": {"type": "BLUE"}, "headers": write}, 409),
        (*order, {"json": {"type": "GREEN"}, "headers": write}, 422),
        (*order, {"data": b"{", "headers": {**write, "Content-Type": "application/json"}}, 400),
        (*order, {"json": {"type": "RED"}}, 401),
        ("POST", "/api/factories/factory-9/orders", {"json": {"type": "RED"}, "headers": write}, 404),
        ("GET", "/api/factories/factory-1/orders/no-such-order", {}, 404),
    ]
    placed = []
    for method, path, kwargs, status in cases:
        r = requests.request(method, api.url + path, timeout=10, **kwargs)
        assert r.status_code == status, (method, path, r.status_code, r.text[:200])
        assert_declared(doc, method, path.split("?")[0].replace("%20", " "), r)
        if r.status_code == 201:
            placed.append(r.headers["Location"])
    assert len(placed) == 2 and placed[0] == placed[1]  # the retry answered the same order
    r = requests.get(api.url + placed[0], timeout=10)
    assert r.status_code == 200
    assert_declared(doc, "GET", placed[0], r)


def test_a_closed_server_answers_401_and_a_stalled_body_408_as_declared(fdb):
    from factory_assets.api.app import ApiSettings, TwinApiServer
    from factory_assets_tests.api.conftest import report

    report(fdb, 0)
    with TwinApiServer(fdb, ApiSettings(open_reads=False, body_timeout=0.5)) as server:
        doc = _document(server.url)
        r = requests.get(server.url + "/api/factories/factory-1/twin", timeout=10)
        assert r.status_code == 401
        assert_declared(doc, "GET", "/api/factories/factory-1/twin", r)

        # headers and half the body, then nothing: the server answers 408 on its own deadline
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"PATCH /api/factories/factory-1/twin/desired HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 40\r\n\r\n{\"stock\"")
            raw = b""
            while b"\r\n\r\n" not in raw or not raw.rstrip().endswith(b"}"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                raw += chunk
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408")
        _, op = _operation(doc, "PATCH", "/api/factories/factory-1/twin/desired")
        assert "408" in op["responses"]
        assert json.loads(body)["error"] == "RequestTimeout"


def test_an_overloaded_server_answers_503_as_declared(fdb):
    """Beyond the server's connection limit, every route answers 503 with Retry-After."""
    from factory_assets.api.app import ApiSettings, build_asgi, create_app
    from factory_assets.web import ServerLimits, WebServer
    from factory_assets_tests.api.conftest import report

    report(fdb, 0)
    settings = ApiSettings(keepalive=0.5)
    app = create_app(fdb, settings)
    doc = app.openapi()
    with WebServer(build_asgi(app, settings), limits=ServerLimits(limit_concurrency=2)) as web:
        # one live event stream and the request itself: the two connections the server allows
        with socket.create_connection(("127.0.0.1", web.port), timeout=10) as stream:
            stream.sendall(b"GET /api/factories/factory-1/twin/events HTTP/1.1\r\nHost: x\r\n\r\n")
            assert stream.recv(4096).startswith(b"HTTP/1.1 200")  # the stream is open
            for path in ("/api/factories", "/api/factories/factory-1/twin", "/api/health"):
                r = requests.get(web.url + path, timeout=10)
                assert r.status_code == 503 and r.headers["Retry-After"] == "1", (path, r.status_code)
                assert_declared(doc, "GET", path, r)
        app.state.hub.close()  # ends the stream's generator at once


# -- the fuzzer: every operation, generated requests ---------------------------------------------
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance")


def test_the_api_answers_only_what_its_openapi_document_declares(api, fdb, write_token, frame, tmp_path):
    """schemathesis (the CLI, as a person runs it) generates requests for every operation from the
    document the server serves, valid and invalid ones, and checks each answer: no 5xx, a declared
    status, a declared content type, headers and body. The event stream never ends by design, so it
    is left to the tests above and to test_stream.py."""
    import subprocess
    import sys

    pytest.importorskip("schemathesis", reason="schemathesis is absent (pip install '.[test]')")
    report_path = tmp_path / "schemathesis.json"
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", api.url + "/openapi.json",
           "--checks", ",".join(CHECKS), "--max-examples", "20", "--seed", "18", "--workers", "1",
           "--phases", "examples,coverage,fuzzing,stateful", "--request-timeout", "10",
           "--exclude-path-regex", "/twin/events$", "-H", f"Authorization: Bearer {write_token}",
           "--report", "json", "--report-json-path", str(report_path), "--no-color"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    result = json.loads(report_path.read_text())
    assert result["complete"] and result["failures"] == [] and result["errors"] == []
    operations = sum(m in OPERATIONS for item in _document(api.url)["paths"].values() for m in item)
    assert result["operations"]["tested"] == operations - 1  # every one but the event stream
    assert all(phase["status"] == "success" for phase in result["phases"].values()), result["phases"]
    assert result["test_cases"]["generated"] >= 20 * result["operations"]["tested"]
    assert requests.get(api.url + "/api/health", timeout=10).json()["status"] == "ok"  # still healthy
