"""A SageMaker-compatible inference server for the stock model.

Composes four parts: ``serving.app`` (the inference-container contract as an
ASGI app: ``/ping``, ``/invocations``, ``/endpoints/{name}/invocations``, JSON
errors also in ``x-amzn-ErrorType``), ``serving.follower`` (which model is
served: the endpoint document in MongoDB, loaded beside the old model, warmed
up and swapped in one reference, so a deployment drops no request),
``serving.cache`` (many models by name, loaded on first use into a bounded LRU
cache, as SageMaker multi-model endpoints host them: docs/multi-model.md) and
``web`` (uvicorn on 127.0.0.1 with the bounds ``http.server`` lacked):

- a request body must be complete within ``body_timeout`` seconds (else 408 and
  the connection is closed) and at most 6 MiB (else 413): a stalled upload costs
  one idle coroutine until its deadline, not a thread;
- at most ``max_concurrent_requests`` requests in progress, 503 JSON beyond;
  at most ``max_connections`` connections (uvicorn's backstop);
- idle keep-alive connections closed after ``keep_alive_timeout`` seconds;
- SIGTERM: stop accepting, let requests in flight finish (at most
  ``graceful_shutdown`` seconds; SageMaker allows 30), exit 0.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from factory_assets.serving.app import (ACCEPTED_TYPES, MAX_PAYLOAD_BYTES, InferenceApp, Stats,  # noqa: F401
                                        sagemaker_error)
from factory_assets.serving.cache import ModelCache, cache_bytes_from_env
from factory_assets.serving.follower import EndpointFollower, LoadedModel, ModelSlot, warm_up  # noqa: F401

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceLimits:
    max_concurrent_requests: int = 32    # in progress at once (body received); 503 beyond
    max_connections: int = 1024          # open connections; uvicorn answers 503 beyond
    # bytes of request bodies being received at once, over all connections (503 beyond): without
    # it, 1,024 connections could each hold a body just under the 6 MiB payload limit (6 GiB)
    max_buffered_bytes: int = 128 * 1024 * 1024
    body_timeout: float = 10.0           # a request body must arrive within this (else 408)
    keep_alive_timeout: float = 5.0      # idle keep-alive connections closed after this
    graceful_shutdown: float = 30.0      # SIGTERM: in-flight requests get this long
    # Model calls run on this many threads; 0: on the event loop itself, which on 2 cores gives the
    # lowest latency and the same throughput (no hand-off between threads). None: 0 on up to 2 cores,
    # else one per core.
    predict_threads: int | None = None

    def prediction_threads(self) -> int:
        if self.predict_threads is not None:
            return self.predict_threads
        cores = os.cpu_count() or 1
        return 0 if cores <= 2 else cores


class InferenceServer:
    """The inference app on uvicorn; ``start()``/``stop()`` in the background, ``run()`` in the foreground."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8080, *, slot: ModelSlot | None = None,
                 endpoint_name: str | None = None, access_log: bool = False, log=None,
                 limits: InferenceLimits = InferenceLimits(), models: ModelCache | None = None,
                 multi_model: bool = False):
        """``log`` is accepted for old callers and ignored: records go to this module's logger.
        ``models``: the models served by name (an empty cache with no source when not given);
        ``multi_model``: no single model is expected (``/ping`` is 200 without one)."""
        from factory_assets.web import ConcurrencyLimit, RequestLimits, ServerLimits, WebServer

        self.slot = slot or ModelSlot()
        self.endpoint_name = endpoint_name
        self.limits = limits
        self.stats = Stats()
        self.models = models if models is not None else ModelCache()
        self.app = InferenceApp(self.slot, endpoint_name, stats=self.stats,
                                predict_threads=limits.prediction_threads(), models=self.models,
                                multi_model=multi_model)
        asgi = RequestLimits(ConcurrencyLimit(self.app, max_requests=limits.max_concurrent_requests,
                                              error=sagemaker_error),
                             max_body_bytes=MAX_PAYLOAD_BYTES, body_timeout=limits.body_timeout,
                             error=sagemaker_error, max_buffered_bytes=limits.max_buffered_bytes)
        self.web = WebServer(asgi, host, port, access_log=access_log, log_level="info" if access_log else "warning",
                             overload_error=sagemaker_error,
                             limits=ServerLimits(limit_concurrency=limits.max_connections,
                                                 timeout_keep_alive=limits.keep_alive_timeout,
                                                 timeout_graceful_shutdown=limits.graceful_shutdown))
        self.web.bind()  # like a socketserver: the port is ours (and ``url`` known) from here on
        self.follower: EndpointFollower | None = None

    @property
    def url(self) -> str:
        return self.web.url

    @property
    def port(self) -> int:
        return self.web.port

    @property
    def requests(self) -> int:
        return self.stats.requests

    @property
    def errors(self) -> dict[str, int]:
        return self.stats.errors

    def follow(self, uri: str | None = None, database: str | None = None, poll_seconds: float = 1.0) -> EndpointFollower:
        """Follow the MongoDB ``endpoints`` document named ``endpoint_name``."""
        if not self.endpoint_name:
            raise ValueError("an endpoint name is needed to follow the registry")
        if not self.models.source:  # a server that follows the registry hosts its models by name too (as build_server)
            from factory_assets.serving.models import RegistrySource, SourceChain

            self.models.source = SourceChain([RegistrySource(uri=uri, database=database)])
        self.follower = EndpointFollower(self.slot, self.endpoint_name, uri=uri, database=database,
                                         poll_seconds=poll_seconds, server_url=self.url)
        try:
            self.follower.sync_once()  # serve at once when a model is already deployed
        except Exception as exc:
            logger.warning("registry not reachable yet (%s); will keep trying", exc.__class__.__name__)
        self.follower.start()
        return self.follower

    def start(self) -> "InferenceServer":
        """Serve on a background thread (tests, benchmarks, embedding)."""
        self.web.start()
        return self

    def run(self) -> None:
        """Serve in the foreground until SIGTERM/SIGINT, then drain requests in flight."""
        try:
            self.web.run()
        finally:
            self._stop_following()
            self.app.close()

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, let requests in flight finish (bounded), close the socket."""
        self._stop_following()
        self.web.stop(timeout)
        self.app.close()

    def _stop_following(self) -> None:
        if self.follower:
            self.follower.stop()

    def __enter__(self) -> "InferenceServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


MODELS_DIR_ENV = "FACTORY_MODELS_DIR"
MODELS_S3_ENV = "FACTORY_MODELS_S3_URL"
S3_ENDPOINT_ENV = "FACTORY_S3_ENDPOINT_URL"


def build_server(host: str = "127.0.0.1", port: int = 8080, *, model_dir: str | None = None,
                 endpoint_name: str | None = None, uri: str | None = None, database: str | None = None,
                 poll_seconds: float = 1.0, access_log: bool = False, log=None,
                 limits: InferenceLimits = InferenceLimits(), models_dir: str | None = None,
                 models_s3_url: str | None = None, s3_endpoint_url: str | None = None,
                 model_cache_bytes: int | None = None, registry: bool | None = None,
                 allowed_roots=None) -> InferenceServer:
    """A bound, not yet serving server: a fixed model from ``model_dir``, or following ``endpoint_name``,
    and in both cases any model by name (docs/multi-model.md) from these sources, in this order:

    - the registry (MongoDB) when following an endpoint, or when ``registry`` is true;
    - ``models_dir`` (or ``FACTORY_MODELS_DIR``): ``<dir>/<name>.tar.gz`` or ``<dir>/<name>/``;
      ``POST /models`` may also name paths under it (and under ``allowed_roots``);
    - ``models_s3_url`` (or ``FACTORY_MODELS_S3_URL``): ``<prefix>/<name>.tar.gz``, the layout of
      a SageMaker multi-model endpoint (``s3_endpoint_url`` or ``FACTORY_S3_ENDPOINT_URL`` for a
      compatible service).

    The cache holds ``model_cache_bytes`` (or ``FACTORY_MODEL_CACHE_BYTES``, default 256 MiB).
    With neither ``model_dir`` nor ``endpoint_name`` the server only hosts models by name
    (``/ping`` is 200 at once). ``log`` is accepted for old callers and ignored."""
    import os

    from factory_assets.serving.models import DirectorySource, RegistrySource, S3Source, SourceChain

    _limit_threads()
    models_dir = models_dir or os.environ.get(MODELS_DIR_ENV) or None
    models_s3_url = models_s3_url or os.environ.get(MODELS_S3_ENV) or None
    if registry is None:
        registry = bool(endpoint_name) and not model_dir
    source = SourceChain([
        RegistrySource(uri=uri, database=database) if registry else None,
        DirectorySource(models_dir) if models_dir else None,
        S3Source(models_s3_url, endpoint_url=s3_endpoint_url or os.environ.get(S3_ENDPOINT_ENV) or None)
        if models_s3_url else None])
    roots = [r for r in [models_dir, *(allowed_roots or ())] if r]
    cache = ModelCache(cache_bytes_from_env() if model_cache_bytes is None else model_cache_bytes, source,
                       allowed_roots=roots)
    server = InferenceServer(host, port, endpoint_name=endpoint_name, access_log=access_log, limits=limits,
                             models=cache, multi_model=not model_dir and not endpoint_name)
    if model_dir:
        from factory_assets.vision.model import StockModel

        server.slot.swap(StockModel.load(model_dir))
        logger.info("serving %s from %s", server.slot.current.version, model_dir)
    elif endpoint_name:
        server.follow(uri, database, poll_seconds)
    if source or roots:
        logger.info("hosting models by name from %s (cache of %d bytes)", source.sources or roots, cache.max_bytes)
    return server


def serve(host: str = "127.0.0.1", port: int = 8080, **kwargs) -> InferenceServer:
    """``build_server`` started on a background thread."""
    return build_server(host, port, **kwargs).start()


def _limit_threads() -> None:
    """One OpenCV thread per prediction thread: on 2 cores, oversubscription only adds latency."""
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover
        pass
    _keep_heap()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>


def _keep_heap() -> None:
    """Keep freed memory in the heap instead of returning it to the OS after every request.

    Each prediction allocates about 1 MB of image arrays; with glibc's default
    thresholds the top of the heap was trimmed after each request and faulted back
    in by the next (250 page faults, about 0.3 ms a request: the whole gap between
    the server's model call and the same call in-process). Linux/glibc only."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: nothing to tune
        return
    mallopt(_M_MMAP_THRESHOLD, 16 * 1024 * 1024)  # a decoded image stays on the heap
    mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024)  # up to 64 MB of free heap kept for the next request
