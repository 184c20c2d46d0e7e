"""Each factory's clock offset, estimated from the messages the ingester stores.

The TXT controller sets its clock by NTP only at boot and then drifts; every message it
sends carries ``ts`` in its clock, and the ingester notes ``received_at`` in ours. For one
message ``received_at - ts = latency - offset`` (``offset`` = factory clock minus ours,
as ``storage.clocks`` keeps it), and the latency is never negative. So the messages that
travelled fastest tell the offset best: ``offset ~= -(smallest received_at - ts)``.

Robustly, over a bounded window:

- Messages are grouped in **buckets** of ``bucket_s`` seconds of arrival time; each bucket
  keeps its smallest ``received_at - ts`` (the fastest message in it).
- The estimate is the **median of the last** ``buckets`` **bucket minima** (at most
  ``max_age_s`` old). A burst of delayed messages (a broker's backlog after an outage, a
  replayed or retained old message) arrives within few buckets and cannot move a median,
  nor can a message stamped in the future by a publisher whose clock is wrong, unless it
  fills half the window. A real step of the controller's clock (a reboot) is followed
  once it fills half the window.
- ``spread_s`` is the interquartile range of the bucket minima: how much the fastest
  latency varies (a LAN: milliseconds).

Pure Python and thread-safe: the writer thread adds samples and records; nothing here
touches the database (``storage.clocks.record_offset`` does, called by the ingester).
"""
from __future__ import annotations

import collections
import math
import statistics
import threading
import time
from dataclasses import dataclass
from datetime import datetime

DEFAULT_BUCKET_S = 2.0
DEFAULT_BUCKETS = 31
DEFAULT_MAX_AGE_S = 3600.0
DEFAULT_RECORD_EVERY_S = 5.0


@dataclass(frozen=True)
class ClockEstimate:
    offset_s: float  # factory clock minus ours
    samples: int  # messages in the window
    buckets: int  # buckets in the window (the median's inputs)
    spread_s: float  # interquartile range of the bucket minima


class ClockEstimator:
    """Per factory, the median of the last ``buckets`` per-bucket smallest ``received_at - ts``."""

    def __init__(self, *, bucket_s: float = DEFAULT_BUCKET_S, buckets: int = DEFAULT_BUCKETS,
                 max_age_s: float = DEFAULT_MAX_AGE_S):
        if bucket_s <= 0 or buckets < 1 or max_age_s <= 0:
            raise ValueError("bucket_s and max_age_s must be > 0 and buckets >= 1")
        self.bucket_s = bucket_s
        self.buckets = buckets
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        # factory -> deque of [bucket key, smallest received_at - ts in it, messages in it]
        self._windows: dict[str, collections.deque] = {}

    def add(self, factory_id: str, ts: datetime, received_at: datetime) -> None:
        """One stored message: ``ts`` in the factory's clock, ``received_at`` in ours (both aware)."""
        delay = (received_at - ts).total_seconds()
        if not math.isfinite(delay):
            return
        arrived = received_at.timestamp()
        key = math.floor(arrived / self.bucket_s)
        with self._lock:
            window = self._windows.setdefault(factory_id, collections.deque())
            if window and window[-1][0] >= key:  # the same bucket (or our clock stepped back: join it)
                bucket = window[-1]
                bucket[1] = min(bucket[1], delay)
                bucket[2] += 1
            else:
                window.append([key, delay, 1])
            oldest = math.floor((arrived - self.max_age_s) / self.bucket_s)
            while len(window) > self.buckets or (window and window[0][0] < oldest):
                window.popleft()

    def estimate(self, factory_id: str) -> ClockEstimate | None:
        with self._lock:
            window = list(self._windows.get(factory_id, ()))
        if not window:
            return None
        minima = sorted(-b[1] for b in window)  # each bucket's largest ts - received_at
        if len(minima) >= 4:
            q = statistics.quantiles(minima, n=4, method="inclusive")
            spread = q[2] - q[0]
        else:
            spread = minima[-1] - minima[0]
        return ClockEstimate(offset_s=statistics.median(minima), samples=sum(b[2] for b in window),
                             buckets=len(window), spread_s=spread)

    def factories(self) -> list[str]:
        with self._lock:
            return list(self._windows)


class ClockRecorder:
    """Writes each factory's estimate with ``storage.clocks.record_offset``, at most every
    ``every_s`` seconds per factory and only when it changed. Called by the writer thread
    after each stored batch; a failed write is retried at the next call (never raised:
    the clock must not hold frames back)."""

    def __init__(self, estimator: ClockEstimator, *, every_s: float = DEFAULT_RECORD_EVERY_S,
                 monotonic=time.monotonic):
        self.estimator = estimator
        self.every_s = every_s
        self._monotonic = monotonic
        self._last: dict[str, tuple[float, ClockEstimate]] = {}  # factory -> (when, what) recorded
        self.records = 0
        self.failures = 0

    def record_due(self, fdb, logger=None) -> int:
        """Record the estimates that are due; how many were written."""
        from factory_assets.storage.clocks import record_offset

        now = self._monotonic()
        written = 0
        for factory_id in self.estimator.factories():
            estimate = self.estimator.estimate(factory_id)
            if estimate is None:
                continue
            last = self._last.get(factory_id)
            if last is not None and (now - last[0] < self.every_s or last[1] == estimate):
                continue
            try:
                record_offset(fdb, factory_id, estimate.offset_s, samples=estimate.samples,
                              spread_s=estimate.spread_s)
            except Exception as exc:  # noqa: BLE001 - the clock is advisory: log and retry next time
                self.failures += 1
                if logger is not None:
                    logger.debug("clock offset of %s not recorded: %s: %s", factory_id, type(exc).__name__, exc)
                continue
            if logger is not None and (last is None or abs(last[1].offset_s - estimate.offset_s) >= 1.0):
                logger.info("factory %s clock: %+.3f s from ours (spread %.3f s over %d messages)", factory_id,
                            estimate.offset_s, estimate.spread_s, estimate.samples)
            self._last[factory_id] = (now, estimate)
            self.records += 1
            written += 1
        return written
