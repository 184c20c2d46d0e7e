"""Following the endpoint document: which model the server serves, and the hot swap.

``ModelSlot`` holds the served model; swapping replaces one reference, so a
request that picked up the old model finishes on it while new requests get the
new one. ``EndpointFollower`` polls the MongoDB ``endpoints`` document and, when
its ``model_version`` changes, loads that model from the registry (GridFS)
beside the old one, warms it up, swaps, and reports the served version back
(``served_version``/``InService``). Nothing here knows about HTTP.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from factory_assets.vocabulary.clock import utcnow

logger = logging.getLogger(__name__)

OUTAGE_LOG_EVERY_S = 60.0


@dataclass(frozen=True)
class LoadedModel:
    version: str
    model: object
    loaded_at: datetime


class ModelSlot:
    """The model being served. Swapping replaces one reference (atomic in CPython)."""

    def __init__(self):
        self.current: LoadedModel | None = None
        self.swaps = 0

    def swap(self, model) -> LoadedModel:
        warm_up(model)
        loaded = LoadedModel(model.version, model, utcnow())
        self.current = loaded
        self.swaps += 1
        return loaded


def warm_up(model) -> None:
    """One prediction before serving: a model that cannot predict is never swapped in."""
    import cv2
    import numpy as np

    ok, buf = cv2.imencode(".jpg", np.full((240, 320, 3), 128, np.uint8))
    probs = model.predict_proba_bytes(buf.tobytes())
    if len(probs) != len(model.classes):
        raise ValueError(f"model {model.version} returned {len(probs)} probabilities")


_warm_up = warm_up  # the name server.py used


class EndpointFollower(threading.Thread):
    """Polls the endpoint document and hot-swaps to its configured model version."""

    def __init__(self, slot: ModelSlot, endpoint_name: str, *, uri: str | None = None, database: str | None = None,
                 poll_seconds: float = 1.0, server_url: str | None = None):
        super().__init__(name=f"follow-{endpoint_name}", daemon=True)
        self.slot = slot
        self.endpoint_name = endpoint_name
        self.uri = uri
        self.database = database
        self.poll_seconds = poll_seconds
        self.server_url = server_url
        self._stop = threading.Event()
        self._failed: dict[str, float] = {}
        self._fdb = None
        self._unavailable_since: float | None = None  # the registry outage being reported
        self._last_outage_log = 0.0

    def stop(self) -> None:
        self._stop.set()

    def fdb(self):
        if self._fdb is None:
            from factory_assets.storage.mongo import connect

            self._fdb = connect(self.uri, self.database)
        return self._fdb

    def sync_once(self) -> str | None:
        """Load the configured version if it is not the one served; returns the served version."""
        from factory_assets.serving.models import load_model
        from factory_assets.storage.models import get_endpoint, report_served

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
                    logger.info("now serving %s (loaded in %.2fs; was %s)", wanted, time.perf_counter() - started,
                                current.version if current else "none")
                except Exception as exc:  # keep serving the old model
                    self._failed[wanted] = time.monotonic()
                    logger.error("cannot load model %s: %s; still serving %s (retrying in 30 s)", wanted, exc,
                                 current.version if current else "nothing")
        served = self.slot.current.version if self.slot.current else None
        if served != doc.get("served_version") or (served and served == wanted and doc.get("status") != "InService"):
            report_served(fdb, self.endpoint_name, served, url=self.server_url)
        return served

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
            except Exception as exc:  # MongoDB restarting: keep serving, try again
                self._fdb = None
                now = time.monotonic()
                if self._unavailable_since is None:
                    self._unavailable_since = now
                if now - self._last_outage_log >= OUTAGE_LOG_EVERY_S:  # one line per outage and then per minute
                    self._last_outage_log = now
                    logger.warning("endpoint document unavailable for %.0fs (%s: %s); still serving %s",
                                   now - self._unavailable_since, exc.__class__.__name__, str(exc)[:200],
                                   self.slot.current.version if self.slot.current else "nothing")
            else:
                if self._unavailable_since is not None:
                    logger.info("endpoint document reachable again after %.1fs",
                                time.monotonic() - self._unavailable_since)
                    self._unavailable_since, self._last_outage_log = None, 0.0
            self._stop.wait(self.poll_seconds)
