"""One ``Predictor`` interface for every place that needs a prediction.

``HttpEndpointPredictor`` talks to our SageMaker-compatible server
(``factory-assets serve``), ``SageMakerRuntimePredictor`` to a SageMaker
endpoint through boto3's ``sagemaker-runtime`` (``endpoint_url`` can point it at
any compatible server, ours included), ``InProcessPredictor`` runs a model in the
calling process. They raise the same two errors, so callers decide once:
``BadInput`` (the image was rejected: quarantine it, go on) and
``EndpointUnavailable`` (retry later; never advance past the frame).
Each is a context manager: ``close()`` releases its connections (an HTTP keep-alive
socket per thread, boto3's pool); a closed predictor reconnects if used again.

Many models behind one endpoint (docs/multi-model.md): ``predict(..., target_model=NAME)``
(or ``target_model=`` given once to the constructor) names the model, NAME being
``serving.models.model_name(factory_id, camera_id, version)`` or a registry version.
An endpoint that does not have it raises ``UnknownModel``, an ``EndpointUnavailable``:
the frame is not at fault, so callers retry later as for an outage (the model may not be
deployed yet) rather than quarantining the image.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from factory_assets.vocabulary import CLASSES

VERBOSE_JSON = "application/json;verbose"


class EndpointUnavailable(RuntimeError):
    """The endpoint could not answer (down, no model loaded, 5xx, timeout)."""


class UnknownModel(EndpointUnavailable):
    """The endpoint has no model of the requested name (not registered, not uploaded)."""

    def __init__(self, message: str, model: str | None = None):
        super().__init__(message)
        self.model = model


class BadInput(ValueError):
    """The endpoint rejected the request itself (undecodable image, wrong type, too large)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class Prediction:
    probabilities: list[float]  # in CLASSES order
    model_version: str | None = None
    latency_ms: float = 0.0
    thresholds: dict | None = None
    classes: tuple = CLASSES
    present: dict = field(default_factory=dict)
    model_kind: str | None = None  # "slots" for the per-slot model; None when the endpoint did not say
    slots: dict | None = None      # per-slot model: slot -> {"state", "type", "probability"}; None otherwise

    def __post_init__(self):
        if not self.present and self.thresholds:
            self.present = {c: bool(p >= self.thresholds.get(c, 0.5))
                            for c, p in zip(self.classes, self.probabilities)}

    @property
    def by_class(self) -> dict[str, float]:
        return dict(zip(self.classes, self.probabilities))


@runtime_checkable
class Predictor(Protocol):
    def predict(self, image: bytes, content_type: str = "image/jpeg", *,
                target_model: str | None = None) -> Prediction: ...


class _Closing:
    """``with predictor: ...`` closes it at the end."""

    def close(self) -> None:  # pragma: no cover - overridden where there is something to release
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_response(body: bytes | str, latency_ms: float, version_header: str | None = None) -> Prediction:
    """A SageMaker image-classifier response: a JSON list of probabilities, or our
    verbose object ``{"prediction": [...], "model_version": ..., "thresholds": {...}}``,
    which a per-slot model extends with ``model_kind`` and ``slots`` (slot -> state).
    The plain list (SageMaker's built-in algorithm) has no slots: ``slots`` stays None."""
    try:
        data = json.loads(body)
    except (ValueError, TypeError) as exc:
        raise EndpointUnavailable(f"endpoint returned non-JSON: {str(body)[:200]!r}") from exc
    if isinstance(data, list):
        probs, version, thresholds, classes = data, version_header, None, CLASSES
        model_kind, slots = None, None
    elif isinstance(data, dict) and isinstance(data.get("prediction"), list):
        probs = data["prediction"]
        version = data.get("model_version") or version_header
        thresholds = data.get("thresholds")
        classes = tuple(data.get("labels") or CLASSES)
        model_kind = data.get("model_kind")
        slots = data.get("slots")
        if slots is not None and not isinstance(slots, dict):
            raise EndpointUnavailable(f"unexpected slots in endpoint response: {str(slots)[:200]!r}")
    else:
        raise EndpointUnavailable(f"unexpected endpoint response: {str(body)[:200]!r}")
    if len(probs) != len(CLASSES):
        raise EndpointUnavailable(f"expected {len(CLASSES)} probabilities, got {len(probs)}")
    return Prediction([float(p) for p in probs], version, latency_ms, thresholds, classes,
                      model_kind=model_kind, slots=slots or None)


class HttpEndpointPredictor(_Closing):
    """Our server over HTTP/1.1 keep-alive (one connection per thread)."""

    def __init__(self, url: str, timeout: float = 10.0, retries: int = 1, target_model: str | None = None):
        from urllib.parse import urlsplit

        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"endpoint URL must be http(s)://host:port, got {url!r}")
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._path = (parts.path or "") + "/invocations"
        self.timeout = timeout
        self.retries = retries
        self.target_model = target_model
        self._local = threading.local()
        self._open: set = set()  # every thread's connection, so close() reaches them all
        self._open_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"HttpEndpointPredictor({self.url!r})"

    def _conn(self, fresh: bool = False):
        import http.client

        conn = getattr(self._local, "conn", None)
        if conn is None or fresh:
            self._drop()
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.timeout)
            self._local.conn = conn
            with self._open_lock:
                self._open.add(conn)
        return conn

    def _drop(self) -> None:
        """Close this thread's connection (the server closed it, or it failed)."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._open_lock:
                self._open.discard(conn)
            conn.close()

    def close(self) -> None:
        """Close every thread's keep-alive connection."""
        with self._open_lock:
            conns, self._open = list(self._open), set()
        for conn in conns:
            conn.close()
        self._local = threading.local()

    def predict(self, image: bytes, content_type: str = "image/jpeg", *,
                target_model: str | None = None) -> Prediction:
        import http.client

        headers = {"Content-Type": content_type, "Accept": VERBOSE_JSON}
        target_model = target_model or self.target_model
        if target_model:
            from factory_assets.serving.models import parse_model_name

            parse_model_name(target_model)  # a malformed name is the caller's error, never the image's
            headers[TARGET_MODEL_HEADER] = target_model
        last_exc: Exception | None = None
        for attempt in range(self.retries + 1):
            started = time.perf_counter()
            try:
                conn = self._conn(fresh=attempt > 0)
                conn.request("POST", self._path, body=image, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                # A kept-alive connection the server closed, or the server is down: retry once on a new one.
                last_exc = exc
                self._drop()
                continue
            latency = (time.perf_counter() - started) * 1000
            if resp.getheader("Connection", "").lower() == "close":
                self._drop()
            if resp.status == 200:
                return parse_response(body, latency, resp.getheader("X-Model-Version"))
            message = _error_message(body)
            if target_model and resp.status == 404:
                raise UnknownModel(f"endpoint {self.url} has no model {target_model}: {message}", target_model)
            if resp.status in (400, 413, 415):
                raise BadInput(f"endpoint rejected the image ({resp.status}): {message}", resp.status)
            raise EndpointUnavailable(f"endpoint {self.url} answered {resp.status}: {message}")
        raise EndpointUnavailable(f"endpoint {self.url} unreachable: {last_exc}")

    def ping(self) -> tuple[bool, str | None]:
        import http.client

        try:
            conn = self._conn(fresh=True)
            conn.request("GET", self._path.rsplit("/", 1)[0] + "/ping")
            resp = conn.getresponse()
            resp.read()
            return resp.status == 200, resp.getheader("X-Model-Version")
        except (OSError, http.client.HTTPException):
            self._drop()
            return False, None


TARGET_MODEL_HEADER = "X-Amzn-SageMaker-Target-Model"


def _names_missing_model(message: str) -> bool:
    text = message.lower()
    return "download model data" in text or "target model" in text or "not found" in text


def _error_message(body: bytes) -> str:
    try:
        data = json.loads(body)
        return str(data.get("message") or data.get("error") or data)
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace")


class SageMakerRuntimePredictor(_Closing):
    """A SageMaker endpoint through boto3 ``sagemaker-runtime`` ``invoke_endpoint``."""

    def __init__(self, endpoint_name: str, region: str = "us-east-1", endpoint_url: str | None = None,
                 verbose: bool = True, client=None, target_model: str | None = None):
        self.endpoint_name = endpoint_name
        self.target_model = target_model
        self.region = region
        self.endpoint_url = endpoint_url
        self.verbose = verbose
        self._client = client
        self._given_client = client
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SageMakerRuntimePredictor({self.endpoint_name!r}, region={self.region!r})"

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                self._client = boto3.client("sagemaker-runtime", region_name=self.region,
                                            endpoint_url=self.endpoint_url,
                                            config=Config(retries={"max_attempts": 2, "mode": "standard"},
                                                          connect_timeout=5, read_timeout=30))
            return self._client

    def close(self) -> None:
        """Close boto3's connection pool (a client given to the constructor is the caller's)."""
        with self._lock:
            client, self._client = self._client, self._given_client
        if client is not None and client is not self._given_client:
            client.close()

    def predict(self, image: bytes, content_type: str = "image/jpeg", *,
                target_model: str | None = None) -> Prediction:
        """``invoke_endpoint``; with a target model, ``TargetModel=<name>.tar.gz`` (its archive
        under the multi-model endpoint's S3 prefix)."""
        from botocore.exceptions import BotoCoreError, ClientError

        from factory_assets.serving.models import target_model_path

        started = time.perf_counter()
        target_model = target_model or self.target_model
        extra = {"TargetModel": target_model_path(target_model)} if target_model else {}
        try:
            resp = self.client.invoke_endpoint(EndpointName=self.endpoint_name, ContentType=content_type,
                                               Accept=VERBOSE_JSON if self.verbose else "application/json",
                                               Body=image, **extra)
            body = resp["Body"].read()
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            message = exc.response.get("Error", {}).get("Message") or str(exc)
            # SageMaker answers a target model missing from S3 with 400 ValidationError "Failed to
            # download model data ..."; our runtime with 404. Neither is the image's fault.
            if target_model and (status == 404 or (status == 400 and _names_missing_model(message))):
                raise UnknownModel(f"endpoint {self.endpoint_name} has no model {target_model}: {message}",
                                   target_model) from exc
            if status in (400, 413, 415):
                raise BadInput(f"endpoint {self.endpoint_name} rejected the image ({status}): {message}",
                               status) from exc
            raise EndpointUnavailable(f"endpoint {self.endpoint_name}: {message}") from exc
        except BotoCoreError as exc:
            raise EndpointUnavailable(f"endpoint {self.endpoint_name} unreachable: {exc}") from exc
        latency = (time.perf_counter() - started) * 1000
        version = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-model-version")
        return parse_response(body, latency, version)


class InProcessPredictor(_Closing):
    """A ``StockModel`` in this process (CLI, tests of callers, batch scoring without a server).
    ``models`` (name -> model) answers ``target_model``; without it a target model must name
    ``model``'s own version (``f--c--<version>`` or ``<version>``), else ``UnknownModel``."""

    def __init__(self, model, models: dict | None = None):
        self.model = model
        self.models = dict(models or {})

    def _model_for(self, target_model: str | None):
        if not target_model:
            return self.model
        from factory_assets.serving.models import parse_model_name

        name = str(parse_model_name(target_model))
        if name in self.models:
            return self.models[name]
        if self.model is not None and parse_model_name(name).version == self.model.version and not self.models:
            return self.model
        raise UnknownModel(f"no model {target_model} in this process", target_model)

    def predict(self, image: bytes, content_type: str = "image/jpeg", *,
                target_model: str | None = None) -> Prediction:
        from factory_assets.vision.decode import ImageDecodeError

        started = time.perf_counter()
        model = self._model_for(target_model)
        details = getattr(model, "predict_details", None)
        try:
            if details is None:  # a model without details: presence only
                d = {"probabilities": model.predict_proba_bytes(image), "slots": None,
                     "model_kind": getattr(model, "kind", None)}
            else:
                d = details(image)
        except (ImageDecodeError, ValueError) as exc:
            raise BadInput(str(exc), 400) from exc
        return Prediction([float(p) for p in d["probabilities"]], model.version,
                          (time.perf_counter() - started) * 1000, dict(model.thresholds),
                          tuple(model.classes), model_kind=d.get("model_kind"), slots=d.get("slots"))
