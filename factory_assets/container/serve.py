"""The ``serve`` entry point: our SageMaker-contract server. Inside the container it binds
0.0.0.0:8080 (``SAGEMAKER_BIND_HOST`` set by the Dockerfile); outside, 127.0.0.1. On
SIGTERM it stops accepting and gives requests in flight up to 30 s.

Two modes, as SageMaker runs the image:

- a single-model endpoint: the model SageMaker unpacked into ``/opt/ml/model`` answers
  ``/invocations``;
- a multi-model endpoint (``Mode: MultiModel``; the image's label
  ``com.amazonaws.sagemaker.capabilities.multi-models=true``): no ``/opt/ml/model``
  (or ``SAGEMAKER_MULTI_MODEL=true``, which our deployment sets). SageMaker loads each
  model through ``POST /models`` from ``/opt/ml/models/<name>/model`` and invokes it with
  ``POST /models/<name>/invoke``; ``/ping`` is 200 with no model loaded. The cache's limit
  is ``FACTORY_MODEL_CACHE_BYTES`` (default 256 MiB); beyond it ``POST /models`` answers
  507 and SageMaker unloads models it has not used lately.

Both modes answer the multi-model API (``/models``) for paths under ``/opt/ml/models``.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

from factory_assets.container.paths import MLPaths

logger = logging.getLogger(__name__)

GRACE_SECONDS = 30.0
MULTI_MODEL_ENV = "SAGEMAKER_MULTI_MODEL"


def multi_model_mode(paths: MLPaths, environ=None) -> bool:
    """Multi-model when SageMaker says so, or when there is no single model to serve."""
    from factory_assets.vision.model import ARTIFACT_NAME

    environ = os.environ if environ is None else environ
    if environ.get(MULTI_MODEL_ENV, "").strip().lower() == "true":
        return True
    return not (paths.model_dir / ARTIFACT_NAME).is_file()


def start(paths: MLPaths, host: str = "127.0.0.1", port: int = 8080):
    from factory_assets.serving.server import serve

    roots = [str(paths.models_dir)]
    if multi_model_mode(paths):
        return serve(host, port, allowed_roots=roots, registry=False)
    return serve(host, port, model_dir=str(paths.model_dir), allowed_roots=roots, registry=False)


def run(paths: MLPaths, host: str | None = None, port: int | None = None, grace: float = GRACE_SECONDS) -> int:
    host = host or os.environ.get("SAGEMAKER_BIND_HOST", "127.0.0.1")
    port = int(os.environ.get("SAGEMAKER_BIND_TO_PORT", "8080")) if port is None else port
    server = start(paths, host, port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # the entry point's readiness line on stdout (what a supervisor or the tests wait for), not a log record,
    # the URL last
    if server.slot.current is not None:
        print(f"serving {server.slot.current.version} on {server.url}", flush=True)
    else:
        print(f"serving multi-model ({paths.models_dir}, cache of {server.models.max_bytes} bytes) on {server.url}",
              flush=True)
    stop.wait()
    stopper = threading.Thread(target=server.stop, name="drain", daemon=True)
    stopper.start()
    stopper.join(grace)
    # and its final status line on stdout
    print("stopped" if not stopper.is_alive() else f"still draining after {grace:g} s; exiting", flush=True)
    return 0
