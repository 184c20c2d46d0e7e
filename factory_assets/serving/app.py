"""The SageMaker inference-container contract as a raw ASGI application.

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
  unsupported content type, 413 body over 6 MiB, 408 body not received in time,
  400 undecodable image, 404 other endpoint name, 503 no model loaded or too
  many requests at once. A bad request never takes the server down.

The body arrives complete (``web.RequestLimits`` reads it under a size limit and
a deadline before this app runs). The app reads ``slot.current`` once per
request, so a request keeps the model it started with whatever swaps meanwhile.
A raw ASGI callable rather than a routed framework app: four routes, and every
microsecond per request counts against the in-process prediction time.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor

from factory_assets.serving.follower import LoadedModel, ModelSlot

logger = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 6 * 1024 * 1024  # SageMaker real-time endpoints: 6 MiB
ACCEPTED_TYPES = {"image/jpeg", "image/jpg", "image/png", "application/x-image"}
_ENDPOINT_PATH = re.compile(r"^/endpoints/([A-Za-z0-9](?:-*[A-Za-z0-9])*)/invocations$")
# The shared web stack's error codes, as SageMaker names them.
_SAGEMAKER_CODES = {"PayloadTooLarge": "ValidationError"}


def sagemaker_error(status: int, code: str, message: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """``{"error": code, "message": ...}`` with the code also in ``x-amzn-ErrorType``."""
    code = _SAGEMAKER_CODES.get(code, code)
    body = json.dumps({"error": code, "message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"x-amzn-errortype", code.encode())]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    return body, headers


class Stats:
    """Request counters, updated on the event loop only."""

    def __init__(self):
        self.requests = 0
        self.errors: dict[str, int] = {}

    def ok(self) -> None:
        self.requests += 1

    def error(self, status: int) -> None:
        self.requests += 1
        self.errors[str(status)] = self.errors.get(str(status), 0) + 1


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def predict_response(loaded: LoadedModel, body: bytes, verbose: bool) -> tuple[int, bytes, str]:
    """(status, JSON body, error code or "") for one image: the whole model call, run off the loop."""
    started = time.perf_counter()
    details = None
    try:
        # A model that sees more than presence (per-slot states) says so through predict_details;
        # only the verbose answer carries it, the plain list stays the cheapest call.
        predict_details = getattr(loaded.model, "predict_details", None) if verbose else None
        if predict_details is not None:
            details = predict_details(body)
            probs = details["probabilities"]
        else:
            probs = loaded.model.predict_proba_bytes(body)
    except ValueError as exc:  # ImageDecodeError is a ValueError
        return 400, f"the body is not a decodable image: {exc}".encode(), "ModelError"
    except Exception as exc:  # a model bug must not kill the server
        logger.exception("inference failed")
        return 500, f"inference failed: {exc.__class__.__name__}".encode(), "InternalFailure"
    elapsed_ms = (time.perf_counter() - started) * 1000
    probs = [round(float(p), 6) for p in probs]
    payload = verbose_payload(loaded, probs, details) if verbose else probs
    return 200, json.dumps(payload).encode(), f"{elapsed_ms:.2f}"


def verbose_payload(loaded: LoadedModel, probs: list[float], details: dict | None = None) -> dict:
    """``Accept: application/json;verbose``: labels, version, thresholds and decisions beside the list,
    plus ``model_kind`` and per-slot ``slots`` when the model's ``predict_details`` gives slots."""
    model = loaded.model
    thresholds = dict(model.thresholds)
    payload = {"prediction": probs, "labels": list(model.classes), "model_version": loaded.version,
               "thresholds": thresholds, "present": {c: p >= thresholds[c] for c, p in zip(model.classes, probs)}}
    if details and details.get("slots") is not None:  # a presence model's answer stays as it was
        payload["model_kind"] = details.get("model_kind")
        payload["slots"] = details["slots"]
    return payload


class InferenceApp:
    """ASGI app serving ``slot``'s model; ``predict_threads=0`` predicts on the event loop itself."""

    def __init__(self, slot: ModelSlot, endpoint_name: str | None = None, *, stats: Stats | None = None,
                 predict_threads: int = 2):
        self.slot = slot
        self.endpoint_name = endpoint_name
        self.stats = stats or Stats()
        self.predict_threads = predict_threads
        self._executor: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    # ---- responses -----------------------------------------------------
    async def _send(self, send, status: int, body: bytes, content_type: bytes = b"application/json",
                    headers: list | None = None, head: bool = False) -> None:
        out = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
        current = self.slot.current
        if current is not None and not any(k == b"x-model-version" for k, _ in headers or ()):
            out.append((b"x-model-version", current.version.encode()))
        if headers:
            out.extend(headers)
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": b"" if head else body})

    async def _error(self, send, status: int, code: str, message: str, head: bool = False) -> None:
        self.stats.error(status)
        body, headers = sagemaker_error(status, code, message)
        await self._send(send, status, body, headers=headers[1:], head=head)

    # ---- routes --------------------------------------------------------
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, self.close)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if method == "POST":
            await self._post(scope, receive, send, path)
        elif method in ("GET", "HEAD"):
            await self._get(send, path, head=method == "HEAD")
        else:
            self.stats.error(405)
            body, headers = sagemaker_error(405, "ValidationError", f"method {method} is not supported")
            await self._send(send, 405, body, headers=headers[1:] + [(b"allow", b"GET, HEAD, POST")])

    async def _get(self, send, path: str, head: bool) -> None:
        if path == "/ping":
            if self.slot.current is None:
                await self._error(send, 503, "ModelNotReady", "no model loaded yet", head=head)
            else:
                await self._send(send, 200, b"", content_type=b"text/plain", head=head)
        elif path in ("/", "/status"):
            current = self.slot.current
            await self._send(send, 200, json.dumps({
                "model_version": current.version if current else None, "endpoint": self.endpoint_name,
                "requests": self.stats.requests, "errors": self.stats.errors,
                "swaps": self.slot.swaps}).encode(), head=head)
        else:
            await self._error(send, 404, "NotFound", f"no route GET {path}", head=head)

    async def _post(self, scope, receive, send, path: str) -> None:
        if path != "/invocations":
            match = _ENDPOINT_PATH.match(path)
            if not match:
                await self._error(send, 404, "NotFound", f"no route POST {path}")
                return
            if self.endpoint_name and match.group(1) != self.endpoint_name:
                await self._error(send, 404, "ValidationError", f"Endpoint {match.group(1)} not found "
                                                                f"(this server serves {self.endpoint_name})")
                return
        message = await receive()  # complete: RequestLimits has read it
        body = message.get("body", b"")
        content_type = (_header(scope, b"content-type") or b"").split(b";", 1)[0].strip().lower().decode("latin-1")
        if content_type not in ACCEPTED_TYPES:
            await self._error(send, 415, "UnsupportedMediaType",
                              f"content type {content_type or '(none)'!r} is not supported; send image/jpeg, "
                              "image/png or application/x-image")
            return
        loaded = self.slot.current  # this request keeps this model, whatever swaps meanwhile
        if loaded is None:
            await self._error(send, 503, "ModelNotReady", "no model loaded yet")
            return
        if not body:
            await self._error(send, 400, "ModelError", "empty request body")
            return
        verbose = b"verbose" in (_header(scope, b"accept") or b"").lower()
        if self.predict_threads:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.predict_threads, thread_name_prefix="predict")
            status, payload, extra = await asyncio.get_running_loop().run_in_executor(
                self._executor, predict_response, loaded, body, verbose)
        else:
            status, payload, extra = predict_response(loaded, body, verbose)
        if status != 200:
            await self._error(send, status, extra, payload.decode())
            return
        self.stats.ok()
        await self._send(send, 200, payload, headers=[
            (b"x-model-version", loaded.version.encode()), (b"x-amzn-invoked-production-variant", b"AllTraffic"),
            (b"x-inference-ms", extra.encode())])


async def _lifespan(receive, send, on_shutdown) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            on_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return
