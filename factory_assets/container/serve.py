"""The ``serve`` entry point: our SageMaker-contract server on the model in
``/opt/ml/model``. Inside the container it binds 0.0.0.0:8080 (``SAGEMAKER_BIND_HOST``
set by the Dockerfile); outside, 127.0.0.1. On SIGTERM it stops accepting and gives
requests in flight up to 30 s."""
from __future__ import annotations

import logging
import os
import signal
import threading

from factory_assets.container.paths import MLPaths

logger = logging.getLogger(__name__)

GRACE_SECONDS = 30.0


def start(paths: MLPaths, host: str = "127.0.0.1", port: int = 8080):
    from factory_assets.serving.server import serve

    return serve(host, port, model_dir=str(paths.model_dir))


def run(paths: MLPaths, host: str | None = None, port: int | None = None, grace: float = GRACE_SECONDS) -> int:
    host = host or os.environ.get("SAGEMAKER_BIND_HOST", "127.0.0.1")
    port = int(os.environ.get("SAGEMAKER_BIND_TO_PORT", "8080")) if port is None else port
    server = start(paths, host, port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # the entry point's readiness line on stdout (what a supervisor or the tests wait for), not a log record,
    print(f"serving {server.slot.current.version} on {server.url}", flush=True)
    stop.wait()
    stopper = threading.Thread(target=server.stop, name="drain", daemon=True)
    stopper.start()
    stopper.join(grace)
    # and its final status line on stdout
    print("stopped" if not stopper.is_alive() else f"still draining after {grace:g} s; exiting", flush=True)
    return 0
