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
A raw ASGI callable rather than a routed framework app: a handful of routes, and
every microsecond per request counts against the in-process prediction time.

Many models (``serving.cache.ModelCache``, docs/multi-model.md), as SageMaker
multi-model endpoints host them:

- ``X-Amzn-SageMaker-Target-Model: NAME`` on ``/invocations`` (boto3's
  ``invoke_endpoint(TargetModel=...)``) answers with model ``NAME``
  (``<factory_id>--<camera_id>--<version>`` or a registry version, ``.tar.gz``
  allowed), loaded on first use from the server's sources and kept in the LRU
  cache; 404 ``ValidationError`` when no source has it, 507 when it cannot fit,
  400 for a malformed name. Without the header: the single served model, as before.
- SageMaker's multi-model container API: ``POST /models`` (``{"model_name", "url"}``:
  200, 409 already loaded, 507 no room, 404 nothing at ``url``), ``GET /models``
  (``{"models": [{"modelName", "modelUrl", ...}], "nextPageToken"}``; query
  ``next_page_token``, ``max_results``), ``GET /models/{name}`` (404 if not loaded),
  ``DELETE /models/{name}`` (404 if not loaded), ``POST /models/{name}/invoke``
  (a loaded model only, else 404).
- ``multi_model=True`` (a server with no single model, like SageMaker's container in
  MultiModel mode): ``/ping`` is 200 as soon as the server runs.
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
    """ASGI app serving ``slot``'s model and, by name, the models of ``models`` (a ``ModelCache``);
    ``predict_threads=0`` predicts on the event loop itself. ``multi_model``: ``/ping`` is 200
    without a single model (a server that only hosts models by name)."""

    def __init__(self, slot: ModelSlot, endpoint_name: str | None = None, *, stats: Stats | None = None,
                 predict_threads: int = 2, models=None, multi_model: bool = False, load_threads: int = 2):
        from factory_assets.serving.cache import ModelCache

        self.slot = slot
        self.endpoint_name = endpoint_name
        self.stats = stats or Stats()
        self.predict_threads = predict_threads
        self.models = models if models is not None else ModelCache()
        self.multi_model = multi_model
        self.load_threads = load_threads
        self._executor: ThreadPoolExecutor | None = None
        self._loader: ThreadPoolExecutor | None = None

    def close(self) -> None:
        for pool in (self._executor, self._loader):
            if pool is not None:
                pool.shutdown(wait=False)
        self._executor = self._loader = None

    # ---- responses -----------------------------------------------------
    async def _send(self, send, status: int, body: bytes, content_type: bytes = b"application/json",
                    headers: list | None = None, head: bool = False, served_version: bool = True) -> None:
        out = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
        current = self.slot.current
        if served_version and current is not None and not any(k == b"x-model-version" for k, _ in headers or ()):
            out.append((b"x-model-version", current.version.encode()))
        if headers:
            out.extend(headers)
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": b"" if head else body})

    async def _error(self, send, status: int, code: str, message: str, head: bool = False,
                     served_version: bool = True) -> None:
        self.stats.error(status)
        body, headers = sagemaker_error(status, code, message)
        await self._send(send, status, body, headers=headers[1:], head=head, served_version=served_version)

    async def _json(self, send, payload, status: int = 200, head: bool = False) -> None:
        self.stats.ok()
        await self._send(send, status, json.dumps(payload).encode(), head=head, served_version=False)

    # ---- routes --------------------------------------------------------
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, self.close)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path == "/models" or path.startswith("/models/"):
            await self._models_api(scope, receive, send, method, path)
        elif method == "POST":
            await self._post(scope, receive, send, path)
        elif method in ("GET", "HEAD"):
            await self._get(send, path, head=method == "HEAD")
        else:
            await self._not_allowed(send, method, "GET, HEAD, POST")

    async def _not_allowed(self, send, method: str, allow: str) -> None:
        self.stats.error(405)
        body, headers = sagemaker_error(405, "ValidationError", f"method {method} is not supported")
        await self._send(send, 405, body, headers=headers[1:] + [(b"allow", allow.encode())])

    async def _get(self, send, path: str, head: bool) -> None:
        if path == "/ping":
            if self.slot.current is None and not self.multi_model:
                await self._error(send, 503, "ModelNotReady", "no model loaded yet", head=head)
            else:
                await self._send(send, 200, b"", content_type=b"text/plain", head=head)
        elif path in ("/", "/status"):
            current = self.slot.current
            await self._send(send, 200, json.dumps({
                "model_version": current.version if current else None, "endpoint": self.endpoint_name,
                "requests": self.stats.requests, "errors": self.stats.errors,
                "swaps": self.slot.swaps, "models": self.models.summary()}).encode(), head=head)
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
        target = _header(scope, TARGET_MODEL_HEADER)
        loaded = self.slot.current  # this request keeps this model, whatever swaps meanwhile
        if target is None and loaded is None and self.multi_model:
            await self._error(send, 400, "ValidationError", "this endpoint hosts many models: name one in the "
                              "X-Amzn-SageMaker-Target-Model header (invoke_endpoint's TargetModel)")
            return
        await self._invoke(scope, receive, send, loaded,
                           target=None if target is None else target.decode("latin-1").strip())

    async def _invoke(self, scope, receive, send, loaded: LoadedModel | None, target: str | None = None) -> None:
        """Predict with ``loaded`` (None: no model yet, 503), or with the model named ``target``
        (loaded on demand once the request itself is found valid), on the request's image."""
        message = await receive()  # complete: RequestLimits has read it
        body = message.get("body", b"")
        content_type = (_header(scope, b"content-type") or b"").split(b";", 1)[0].strip().lower().decode("latin-1")
        if content_type not in ACCEPTED_TYPES:
            await self._error(send, 415, "UnsupportedMediaType",
                              f"content type {content_type or '(none)'!r} is not supported; send image/jpeg, "
                              "image/png or application/x-image")
            return
        if target is not None:
            if not body:
                await self._error(send, 400, "ModelError", "empty request body")
                return
            loaded = await self._target(send, target)
            if loaded is None:
                return
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

    async def _target(self, send, name: str) -> LoadedModel | None:
        """The target model, from the cache or loaded on demand; None once an error was sent."""
        from factory_assets.serving.models import parse_model_name

        try:
            entry = self.models.lookup(str(parse_model_name(name)))
            if entry is None:
                entry = await self._in_loader(self.models.get, name)
        except Exception as exc:
            status, code, message = _model_error(exc, name)
            if status == 404:  # SageMaker's runtime calls a target model it cannot find a ValidationError
                code = "ValidationError"
            await self._error(send, status, code, message, served_version=False)
            return None
        return entry.loaded

    async def _in_loader(self, fn, *args):
        """Loading reads the registry, a file or S3: never on the event loop."""
        if self._loader is None:
            self._loader = ThreadPoolExecutor(self.load_threads, thread_name_prefix="model-load")
        return await asyncio.get_running_loop().run_in_executor(self._loader, fn, *args)

    # ---- SageMaker's multi-model container API ---------------------------------------
    async def _models_api(self, scope, receive, send, method: str, path: str) -> None:
        rest = path[len("/models"):].strip("/")
        name, _, action = rest.partition("/")
        if not rest:  # /models
            if method in ("GET", "HEAD"):
                await self._list_models(scope, send, head=method == "HEAD")
            elif method == "POST":
                await self._load_model(receive, send)
            else:
                await self._not_allowed(send, method, "GET, HEAD, POST")
        elif not action:  # /models/{name}
            if method in ("GET", "HEAD"):
                entry = self.models.entry(name)
                if entry is None:
                    await self._error(send, 404, "ModelNotFound", f"model {name} is not loaded",
                                      head=method == "HEAD", served_version=False)
                else:
                    await self._json(send, entry.view(), head=method == "HEAD")
            elif method == "DELETE":
                if self.models.unload(name):
                    await self._json(send, {"status": f"model {name} unloaded"})
                else:
                    await self._error(send, 404, "ModelNotFound", f"model {name} is not loaded",
                                      served_version=False)
            else:
                await self._not_allowed(send, method, "GET, HEAD, DELETE")
        elif action == "invoke":  # /models/{name}/invoke
            if method != "POST":
                await self._not_allowed(send, method, "POST")
                return
            entry = self.models.lookup(name)
            if entry is None:
                await self._error(send, 404, "ModelNotFound", f"model {name} is not loaded (POST /models first)",
                                  served_version=False)
                return
            await self._invoke(scope, receive, send, entry.loaded)
        else:
            await self._error(send, 404, "NotFound", f"no route {method} {path}", served_version=False)

    async def _list_models(self, scope, send, head: bool) -> None:
        from urllib.parse import parse_qs

        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        token = (query.get("next_page_token") or [""])[0]
        try:
            limit = int((query.get("max_results") or [str(PAGE_SIZE)])[0])
            if not 1 <= limit <= MAX_PAGE_SIZE:
                raise ValueError
            after = _decode_token(token) if token else None
        except ValueError:
            await self._error(send, 400, "ValidationError", f"max_results must be 1 to {MAX_PAGE_SIZE} and "
                              "next_page_token one this server returned", head=head, served_version=False)
            return
        entries = [e for e in self.models.entries() if after is None or e.name > after]
        page = entries[:limit]
        payload: dict = {"models": [e.view() for e in page]}
        if len(entries) > limit:
            payload["nextPageToken"] = _encode_token(page[-1].name)
        await self._json(send, payload, head=head)

    async def _load_model(self, receive, send) -> None:
        message = await receive()
        try:
            request = json.loads(message.get("body", b"") or b"null")
            if not isinstance(request, dict) or not isinstance(request.get("model_name"), str):
                raise ValueError
            url = request.get("url")
            if url is not None and not isinstance(url, str):
                raise ValueError
        except ValueError:
            await self._error(send, 400, "ValidationError", 'send JSON {"model_name": NAME, "url": PATH}',
                              served_version=False)
            return
        name = request["model_name"]
        try:
            entry = await self._in_loader(self.models.load, name, url or None)
        except Exception as exc:
            status, code, text = _model_error(exc, name)
            if status == 500 and code == "ModelError":  # what the url holds is no model: the request's fault
                status, code = 400, "ValidationError"
            await self._error(send, status, code, text, served_version=False)
            return
        await self._json(send, {"status": f"model {entry.name} loaded", **entry.view()})


TARGET_MODEL_HEADER = b"x-amzn-sagemaker-target-model"
PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def _encode_token(name: str) -> str:
    import base64

    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def _decode_token(token: str) -> str:
    import base64
    import binascii

    try:
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError(token) from exc


def _model_error(exc: Exception, name: str) -> tuple[int, str, str]:
    """(status, code, message) of a failed model lookup or load."""
    from factory_assets.serving.cache import ModelAlreadyLoaded, ModelLoadError, NoRoom
    from factory_assets.serving.models import InvalidModelName

    if isinstance(exc, InvalidModelName):
        return 400, "ValidationError", str(exc)
    if isinstance(exc, LookupError):
        return 404, "ModelNotFound", str(exc).strip("'\"")
    if isinstance(exc, ModelAlreadyLoaded):
        return 409, "ModelAlreadyLoaded", str(exc)
    if isinstance(exc, NoRoom):
        return 507, "InsufficientStorage", str(exc)
    if isinstance(exc, PermissionError):
        return 403, "AccessDenied", str(exc)
    if isinstance(exc, ModelLoadError):
        return 500, "ModelError", str(exc)
    logger.warning("cannot load model %s: %s: %s", name, exc.__class__.__name__, str(exc)[:300])
    return 503, "ServiceUnavailable", f"cannot load model {name} now ({exc.__class__.__name__}); try again"


async def _lifespan(receive, send, on_shutdown) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            on_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return
