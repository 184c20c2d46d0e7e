"""The shared ASGI stack: a real uvicorn server on 127.0.0.1 with the request bounds."""
from __future__ import annotations

import asyncio
import socket

import pytest
import requests

from factory_assets.web import RequestLimits, ServerLimits, WebServer


def echo_app(hold: asyncio.Event | None = None):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def echo(request):
        body = await request.body()
        return JSONResponse({"bytes": len(body)})

    async def slow(request):
        await hold.wait()
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/slow", slow)])


@pytest.fixture
def server():
    app = RequestLimits(echo_app(), max_body_bytes=1024, body_timeout=1.0)
    with WebServer(app, port=0) as srv:
        yield srv


def test_the_server_binds_127_0_0_1_on_a_free_port_and_serves_the_app(server):
    assert server.url.startswith("http://127.0.0.1:") and server.port > 0
    assert requests.post(f"{server.url}/echo", data=b"x" * 10, timeout=5).json() == {"bytes": 10}


def test_a_body_over_the_limit_is_refused_with_413_before_the_app_reads_it(server):
    r = requests.post(f"{server.url}/echo", data=b"x" * 2048, timeout=5)
    assert r.status_code == 413 and r.json()["error"] == "PayloadTooLarge"


def test_a_chunked_body_growing_past_the_limit_is_refused_with_413(server):
    r = requests.post(f"{server.url}/echo", data=iter([b"x" * 600, b"x" * 600]), timeout=5)
    assert r.status_code == 413


def test_a_stalled_upload_is_answered_408_and_closed_and_the_server_keeps_serving(server):
    # headers promise 100 bytes, 10 arrive, then the client goes quiet
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                  b"Content-Length: 100\r\n\r\n" + b"x" * 10)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b"RequestTimeout" in reply
    assert requests.post(f"{server.url}/echo", data=b"ok", timeout=5).json() == {"bytes": 2}


def test_connections_beyond_the_concurrency_limit_get_503_instead_of_queueing():
    import threading

    loop_event: dict = {}

    class Gate:
        """An asyncio.Event created inside the server's loop, released from the test thread."""

        async def wait(self):
            loop_event["loop"] = asyncio.get_running_loop()
            loop_event.setdefault("event", asyncio.Event())
            loop_event["waiting"] = loop_event.get("waiting", 0) + 1
            arrived.set()
            await loop_event["event"].wait()

    arrived = threading.Event()
    app = RequestLimits(echo_app(hold=Gate()), max_body_bytes=1024)
    srv = WebServer(app, port=0, limits=ServerLimits(limit_concurrency=2)).start()
    results: list[int] = []
    try:
        holder = threading.Thread(target=lambda: results.append(
            requests.get(f"{srv.url}/slow", timeout=30).status_code))
        holder.start()
        assert arrived.wait(10)  # one request is inside the app and holds its slot
        statuses = [requests.get(f"{srv.url}/slow", timeout=10).status_code for _ in range(3)]
        assert 503 in statuses
        loop_event["loop"].call_soon_threadsafe(loop_event["event"].set)
        holder.join(20)
    finally:
        srv.stop(timeout=10)
    assert results == [200]


def _closed_by_server(sock: socket.socket) -> bytes:
    reply = b""
    while chunk := sock.recv(4096):
        reply += chunk
    return reply


@pytest.mark.parametrize("sent", [b"", b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Le"])
def test_a_connection_without_complete_headers_is_closed_after_the_header_deadline(sent):
    # uvicorn alone never times these out: each would hold a connection slot for ever
    app = RequestLimits(echo_app(), max_body_bytes=1024)
    with WebServer(app, port=0, limits=ServerLimits(header_timeout=1.0)) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            s.sendall(sent)
            assert requests.post(f"{srv.url}/echo", data=b"ok", timeout=5).json() == {"bytes": 2}
            assert _closed_by_server(s) == b""  # returns once the server has closed it


def test_a_kept_alive_connection_serves_request_after_request_with_the_header_deadline_on():
    app = RequestLimits(echo_app(), max_body_bytes=1024)
    with WebServer(app, port=0, limits=ServerLimits(header_timeout=1.0, timeout_keep_alive=30)) as srv:
        with requests.Session() as session:
            first = session.post(f"{srv.url}/echo", data=b"a", timeout=5)
            second = session.post(f"{srv.url}/echo", data=b"bb", timeout=5)
        assert first.json() == {"bytes": 1} and second.json() == {"bytes": 2}


def test_bodies_being_received_share_a_byte_budget_and_beyond_it_a_request_gets_503_at_once():
    # without a budget every open connection may hold a body just under the size limit
    from factory_assets.storage.frames import wait_until

    limits = RequestLimits(echo_app(), max_body_bytes=1024, body_timeout=30.0, max_buffered_bytes=1500)
    with WebServer(limits, port=0) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as slow:
            slow.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1024\r\n\r\n" + b"x" * 1000)
            assert wait_until(lambda: limits.buffered == 1000, 10)  # the slow body is being received
            refused = requests.post(f"{srv.url}/echo", data=b"y" * 600, timeout=5)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"] == "ServiceUnavailable"
            assert requests.post(f"{srv.url}/echo", data=b"y" * 400, timeout=5).json() == {"bytes": 400}
            slow.sendall(b"x" * 24)  # the slow body completes: its bytes leave the budget
            answer = b""
            while b'{"bytes":1024}' not in answer:  # headers and body may come in two segments
                chunk = slow.recv(4096)
                assert chunk, f"connection closed after {answer!r}"
                answer += chunk
        assert wait_until(lambda: limits.buffered == 0, 10)
        assert requests.post(f"{srv.url}/echo", data=b"y" * 600, timeout=5).json() == {"bytes": 600}
