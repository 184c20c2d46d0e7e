"""The one web stack: ASGI applications (Starlette/FastAPI) served by uvicorn.

The inference server and the twin API both run on it, with the same bounds:
a request body must arrive completely within ``body_timeout`` seconds and be at
most ``max_body_bytes`` (checked before the application sees it, so a stalled
upload costs one idle coroutine, not a thread); request headers must be complete
within ``header_timeout`` of connecting or of the last response (else the
connection is closed); ``ConcurrencyLimit`` bounds the requests inside the app
(503 in the app's error format beyond); at most ``limit_concurrency``
connections and tasks at once (uvicorn answers 503 beyond); idle keep-alive
connections are closed after ``timeout_keep_alive``; on SIGTERM in-flight
requests get ``timeout_graceful_shutdown`` seconds (SageMaker allows 30).
"""
from factory_assets.web.limits import ConcurrencyLimit, RequestLimits, json_error
from factory_assets.web.server import ServerLimits, WebServer

__all__ = ["ConcurrencyLimit", "RequestLimits", "ServerLimits", "WebServer", "json_error"]
