"""A SageMaker-compatible inference server for the stock model.

The inference-container contract, so the same client code works here and on
SageMaker (boto3 ``sagemaker-runtime`` with ``endpoint_url`` pointed at us):

- ``GET /ping``: 200 (empty body) only while a model is loaded, else 503.
  ``X-Model-Version`` names the loaded version.
- ``POST /invocations`` and ``POST /endpoints/{name}/invocations``: body
  ``image/jpeg``, ``image/png`` or ``application/x-image``; response
  ``application/json``, the list of probabilities in class order
  ``[blue, red, white]`` like SageMaker's built-in image classifier.
  ``Accept: application/json;verbose`` returns ``{"prediction": [...],
  "labels": [...], "model_version": ..., "thresholds": {...}, "present": {...}}``.
- Errors as JSON ``{"error": code, "message": ...}`` (also in
  ``x-amzn-ErrorType`` so boto3 raises a readable ``ClientError``): 415
  unsupported content type, 413 body over 6 MiB, 400 undecodable image, 404 other
  endpoint name, 503 no model loaded. A bad request never takes the server down.

Zero-downtime deployment: with ``--endpoint NAME`` the server follows that
endpoint's MongoDB document; when its ``model_version`` changes it loads the new
model from the registry (GridFS) beside the old one, warms it up, then swaps a
single reference. A request keeps the model it started with, so requests in
flight finish on the old version and none fails during the swap.
"""
from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_PAYLOAD_BYTES = 6 * 1024 * 1024  # SageMaker real-time endpoints: 6 MiB
ACCEPTED_TYPES = {"image/jpeg", "image/jpg", "image/png", "application/x-image"}
_ENDPOINT_PATH = re.compile(r"^/endpoints/([A-Za-z0-9](?:-*[A-Za-z0-9])*)/invocations$")


@dataclass(frozen=True)
class LoadedModel:
    version: str
    model: object
    loaded_at: float


class ModelSlot:
    """The model being served. Swapping replaces one reference (atomic in CPython)."""

    def __init__(self):
        self.current: LoadedModel | None = None
        self.swaps = 0

    def swap(self, model) -> LoadedModel:
        _warm_up(model)
        loaded = LoadedModel(model.version, model, time.time())
        self.current = loaded
        self.swaps += 1
        return loaded


def _warm_up(model) -> None:
    """One prediction before serving: a model that cannot predict is never swapped in."""
    import cv2
    import numpy as np

    ok, buf = cv2.imencode(".jpg", np.full((240, 320, 3), 128, np.uint8))
    probs = model.predict_proba_bytes(buf.tobytes())
    if len(probs) != len(model.classes):
        raise ValueError(f"model {model.version} returned {len(probs)} probabilities")


class EndpointFollower(threading.Thread):
    """Polls the endpoint document and hot-swaps to its configured model version."""

    def __init__(self, slot: ModelSlot, endpoint_name: str, *, uri: str | None = None, database: str | None = None,
                 poll_seconds: float = 1.0, server_url: str | None = None, log=print):
        super().__init__(name=f"follow-{endpoint_name}", daemon=True)
        self.slot = slot
        self.endpoint_name = endpoint_name
        self.uri = uri
        self.database = database
        self.poll_seconds = poll_seconds
        self.server_url = server_url
        self.log = log
        self._stop = threading.Event()
        self._failed: dict[str, float] = {}
        self._fdb = None

    def stop(self) -> None:
        self._stop.set()

    def fdb(self):
        if self._fdb is None:
            from factory_assets.storage.mongo import connect

            self._fdb = connect(self.uri, self.database)
        return self._fdb

    def sync_once(self) -> str | None:
        """Load the configured version if it is not the one served; returns the served version."""
        from factory_assets.storage.models import get_endpoint, load_model, report_served

        fdb = self.fdb()
        doc = get_endpoint(fdb, self.endpoint_name) or {}
        wanted = doc.get("model_version")
        current = self.slot.current
        if wanted and (current is None or current.version != wanted):
            # A version that failed to load is retried at most every 30 s, not every poll.
            if time.monotonic() - self._failed.get(wanted, -1e9) > 30:
                started = time.perf_counter()
                try:
                    model = load_model(fdb, wanted)
                    self.slot.swap(model)
                    self.log(f"serve: now serving {wanted} (loaded in {time.perf_counter() - started:.2f}s; "
                             f"was {current.version if current else 'none'})")
                except Exception as exc:  # keep serving the old model
                    self._failed[wanted] = time.monotonic()
                    self.log(f"serve: cannot load model {wanted}: {exc}; still serving "
                             f"{current.version if current else 'nothing'}")
        served = self.slot.current.version if self.slot.current else None
        if served != doc.get("served_version") or (served and served == wanted and doc.get("status") != "InService"):
            report_served(fdb, self.endpoint_name, served, url=self.server_url)
        return served

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
            except Exception as exc:  # MongoDB restarting: keep serving, try again
                self.log(f"serve: endpoint document unavailable ({exc.__class__.__name__}: {exc})")
                self._fdb = None
            self._stop.wait(self.poll_seconds)


class InferenceHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are separate writes: with Nagle on, the client's delayed ACK adds ~40 ms.
    disable_nagle_algorithm = True
    server_version = "factory-assets-serve"
    sys_version = ""
    server: "InferenceServer"

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        if self.server.access_log:
            super().log_message(format, *args)

    # ---- responses -----------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str = "application/json",
              headers: dict | None = None, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        current = self.server.slot.current
        if current is not None:
            self.send_header("X-Model-Version", current.version)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, close: bool = False, headers: dict | None = None) -> None:
        self.server.count_error(status)
        body = json.dumps({"error": code, "message": message}).encode()
        self._send(status, body, headers={"x-amzn-ErrorType": code, **(headers or {})}, close=close)

    # ---- routes --------------------------------------------------------
    def do_GET(self):  # noqa: N802 - http.server naming
        path = self.path.split("?", 1)[0]
        if path == "/ping":
            if self.server.slot.current is None:
                self._error(503, "ModelNotReady", "no model loaded yet", headers={"Retry-After": "1"})
            else:
                self._send(200, b"", content_type="text/plain")
        elif path in ("/", "/status"):
            current = self.server.slot.current
            self._send(200, json.dumps({
                "model_version": current.version if current else None,
                "endpoint": self.server.endpoint_name, "requests": self.server.requests,
                "errors": self.server.errors, "swaps": self.server.slot.swaps}).encode())
        else:
            self._error(404, "NotFound", f"no route GET {path}")

    def do_POST(self):  # noqa: N802
        path = self.path.split("?", 1)[0]
        match = _ENDPOINT_PATH.match(path)
        # Whatever happens next, an unread body would corrupt the next request on this connection.
        length_header = self.headers.get("Content-Length")
        if path != "/invocations" and not match:
            self._drain(length_header)
            return self._error(404, "NotFound", f"no route POST {path}", close=length_header is None)
        if match and self.server.endpoint_name and match.group(1) != self.server.endpoint_name:
            self._drain(length_header)
            return self._error(404, "ValidationError",
                               f"Endpoint {match.group(1)} not found (this server serves {self.server.endpoint_name})")
        if length_header is None:
            return self._error(411, "ValidationError", "Content-Length is required", close=True)
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            return self._error(400, "ValidationError", f"bad Content-Length {length_header!r}", close=True)
        if length > MAX_PAYLOAD_BYTES:
            # Not read: the connection is closed instead of swallowing a huge body.
            return self._error(413, "ValidationError",
                               f"payload of {length} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit", close=True)
        body = self.rfile.read(length)
        content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if content_type not in ACCEPTED_TYPES:
            return self._error(415, "UnsupportedMediaType",
                               f"content type {content_type or '(none)'!r} is not supported; send image/jpeg, "
                               "image/png or application/x-image")
        loaded = self.server.slot.current  # this request keeps this model, whatever swaps meanwhile
        if loaded is None:
            return self._error(503, "ModelNotReady", "no model loaded yet", headers={"Retry-After": "1"})
        if not body:
            return self._error(400, "ModelError", "empty request body")
        started = time.perf_counter()
        try:
            probs = loaded.model.predict_proba_bytes(body)
        except ValueError as exc:  # ImageDecodeError is a ValueError
            return self._error(400, "ModelError", f"the body is not a decodable image: {exc}")
        except Exception as exc:  # a model bug must not kill the server
            self.server.log(f"serve: inference failed: {exc.__class__.__name__}: {exc}")
            return self._error(500, "InternalFailure", f"inference failed: {exc.__class__.__name__}")
        elapsed_ms = (time.perf_counter() - started) * 1000
        self.server.count_ok()
        probs = [round(float(p), 6) for p in probs]
        accept = (self.headers.get("Accept") or "application/json").lower()
        if "verbose" in accept:
            thresholds = dict(loaded.model.thresholds)
            payload = {"prediction": probs, "labels": list(loaded.model.classes), "model_version": loaded.version,
                       "thresholds": thresholds,
                       "present": {c: p >= thresholds[c] for c, p in zip(loaded.model.classes, probs)}}
        else:
            payload = probs
        self._send(200, json.dumps(payload).encode(), headers={
            "X-Model-Version": loaded.version, "X-Amzn-Invoked-Production-Variant": "AllTraffic",
            "X-Inference-Ms": f"{elapsed_ms:.2f}"})

    def _drain(self, length_header: str | None) -> None:
        try:
            n = int(length_header or 0)
        except ValueError:
            n = 0
        if 0 < n <= MAX_PAYLOAD_BYTES:
            self.rfile.read(n)
        elif n > MAX_PAYLOAD_BYTES:
            self.close_connection = True


class InferenceServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, host: str = "127.0.0.1", port: int = 8080, *, slot: ModelSlot | None = None,
                 endpoint_name: str | None = None, access_log: bool = False, log=print):
        super().__init__((host, port), InferenceHandler)
        self.slot = slot or ModelSlot()
        self.endpoint_name = endpoint_name
        self.access_log = access_log
        self.log = log
        self.requests = 0
        self.errors: dict[str, int] = {}
        self._lock = threading.Lock()
        self.follower: EndpointFollower | None = None
        self._thread: threading.Thread | None = None
        self._connections: set = set()

    def process_request(self, request, client_address):
        with self._lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def count_ok(self) -> None:
        with self._lock:
            self.requests += 1

    def count_error(self, status: int) -> None:
        with self._lock:
            self.requests += 1
            self.errors[str(status)] = self.errors.get(str(status), 0) + 1

    def follow(self, uri: str | None = None, database: str | None = None, poll_seconds: float = 1.0) -> EndpointFollower:
        """Follow the MongoDB ``endpoints`` document named ``endpoint_name``."""
        if not self.endpoint_name:
            raise ValueError("an endpoint name is needed to follow the registry")
        self.follower = EndpointFollower(self.slot, self.endpoint_name, uri=uri, database=database,
                                         poll_seconds=poll_seconds, server_url=self.url, log=self.log)
        try:
            self.follower.sync_once()  # serve at once when a model is already deployed
        except Exception as exc:
            self.log(f"serve: registry not reachable yet ({exc.__class__.__name__}); will keep trying")
        self.follower.start()
        return self.follower

    def start(self) -> "InferenceServer":
        """Serve in a background thread (tests, benchmarks)."""
        self._thread = threading.Thread(target=self.serve_forever, name="inference-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self.follower:
            self.follower.stop()
        self.shutdown()
        self.server_close()
        # Kept-alive connections would otherwise go on being served by their threads.
        import socket

        with self._lock:
            open_connections = list(self._connections)
        for conn in open_connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread:
            self._thread.join(timeout=5)

    def handle_error(self, request, client_address):  # a broken connection is not worth a traceback
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


def serve(host: str = "127.0.0.1", port: int = 8080, *, model_dir: str | None = None,
          endpoint_name: str | None = None, uri: str | None = None, database: str | None = None,
          poll_seconds: float = 1.0, access_log: bool = False, log=print) -> InferenceServer:
    """Build a started server: a fixed model from ``model_dir``, or following ``endpoint_name``."""
    _limit_threads()
    server = InferenceServer(host, port, endpoint_name=endpoint_name, access_log=access_log, log=log)
    if model_dir:
        from factory_assets.vision.model import StockModel

        server.slot.swap(StockModel.load(model_dir))
        log(f"serve: serving {server.slot.current.version} from {model_dir}")
    elif endpoint_name:
        server.follow(uri, database, poll_seconds)
    return server.start()


def _limit_threads() -> None:
    """One OpenCV thread per request thread: on 2 cores, oversubscription only adds latency."""
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover
        pass
