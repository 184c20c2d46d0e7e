"""The simulated Fischertechnik factory itself: its stock, the camera pictures, the stock
reports and the environment sensors, as pure functions of a seed and the simulated time.
No network: :mod:`factory_assets.simulation.publisher` publishes it over MQTT.

Payloads (all ``ts`` are UTC ISO-8601 with milliseconds and ``Z``):

* ``i/cam``     ``{"ts", "data": "data:image/jpeg;base64,..."}``: a 320x240 JPEG;
* ``f/i/stock`` ``{"ts", "stockItems": [{"workpiece": {"id", "type", "state"} | null, "location"}, ...]}``
  with all 9 locations;
* ``i/bme680``  ``{"ts", "t", "rt", "h", "rh", "p", "iaq", "aq", "gr"}`` and ``i/ldr`` ``{"ts", "br", "ldr"}``.

Ground truth: a frame shows the stock in force at its ``ts``. Everything is a pure
function of the seed and the simulated time (seconds since the start): the sequence
of stock changes (one slot at a time, about every ``change_every_s``), the lighting,
the sensor readings and the pictures.
"""
from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np

from factory_assets.simulation.render import SLOTS, TYPES, encode_jpeg, render_warehouse

BME680_TOPIC = "i/bme680"
LDR_TOPIC = "i/ldr"


def iso_ms(dt: datetime) -> str:
    """``2026-11-23T10:00:00.123Z``."""
    dt = dt.astimezone(timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class StockChange:
    t: float  # seconds since the simulation start
    slot: str
    before: dict | None  # the workpiece that was there (None: the slot was empty)
    after: dict | None  # the workpiece now there (None: it was retrieved)

    @property
    def kind(self) -> str:
        return "store" if self.after is not None else "retrieve"


FILL_CYCLE = 16  # stock changes from one fill-level peak to the next


class FactorySimulator:
    """The true state of the simulated factory, evolving deterministically with ``seed``.

    Time is in seconds since the simulation start (``start``, a UTC datetime);
    ``frame(ts)`` and the message builders also accept datetimes. Time only moves
    forward: asking for an earlier time than the last one returns the current stock.
    """

    def __init__(self, seed: int = 0, change_every_s: float = 20.0, *, start: datetime | None = None,
                 initial_fill: float = 0.5, lighting_period_s: float = 300.0, jpeg_quality: int = 85,
                 camera_id: str | None = None, factory_id: str | None = None):
        if change_every_s <= 0:
            raise ValueError("change_every_s must be > 0")
        self.seed = int(seed)
        self.change_every_s = float(change_every_s)
        self.start = (start or datetime.now(timezone.utc)).astimezone(timezone.utc)
        self.lighting_period_s = lighting_period_s
        self.jpeg_quality = jpeg_quality
        self.camera_id = camera_id
        self.factory_id = factory_id
        self._events = np.random.default_rng([self.seed, 1])  # stock evolution only
        self._env_phase = float(np.random.default_rng([self.seed, 2]).uniform(0, 2 * math.pi))
        self._fill_phase = float(np.random.default_rng([self.seed, 4]).uniform(0, 2 * math.pi))
        self._batch_type: str | None = None
        self.items: dict[str, dict | None] = {}
        for slot in SLOTS:
            if self._events.random() < initial_fill:
                self.items[slot] = self._new_workpiece()
            else:
                self.items[slot] = None
        self.now = 0.0
        self.changes: list[StockChange] = []
        self.next_change_at = self._next_interval()

    # -- stock evolution -----------------------------------------------------------
    def _new_workpiece(self) -> dict:
        uid = "04" + self._events.bytes(6).hex()  # a 7-byte NFC UID, as on the real tags
        # Raw material arrives in batches: mostly the colour of the current batch.
        batch = self._batch_type
        kind = batch if batch and self._events.random() < 0.7 else TYPES[int(self._events.integers(len(TYPES)))]
        return {"id": uid, "type": kind, "state": "RAW"}

    def _next_interval(self) -> float:
        return self.now + self.change_every_s * float(self._events.uniform(0.5, 1.5))

    def _change(self, t: float) -> StockChange:
        full = [s for s in SLOTS if self.items[s] is not None]
        empty = [s for s in SLOTS if self.items[s] is None]
        # The fill level drifts between nearly empty and nearly full over FILL_CYCLE changes
        # (orders drain the rack, deliveries refill it), so every mix of colours shows up.
        k = len(self.changes)
        if k % 6 == 0:
            self._batch_type = TYPES[int(self._events.integers(len(TYPES)))]
        target = 0.5 + 0.45 * math.sin(2 * math.pi * k / FILL_CYCLE + self._fill_phase)
        p_store = float(np.clip(0.5 + 1.5 * (target - len(full) / len(SLOTS)), 0.05, 0.95))
        store = bool(empty) and (not full or self._events.random() < p_store)
        slot = (empty if store else full)[int(self._events.integers(len(empty if store else full)))]
        before = self.items[slot]
        after = self._new_workpiece() if store else None
        self.items[slot] = after
        return StockChange(t, slot, before, after)

    def advance(self, t: float | datetime) -> list[StockChange]:
        """Move the factory to time ``t``; the stock changes that happened on the way (in order)."""
        t = self._seconds(t)
        done = []
        while self.next_change_at <= t:
            self.now = self.next_change_at
            change = self._change(self.now)
            self.changes.append(change)
            done.append(change)
            self.next_change_at = self._next_interval()
        self.now = max(self.now, t)
        return done

    @property
    def stock(self) -> dict[str, str | None]:
        """Slot -> workpiece type (``None`` = empty) now."""
        return {s: (w["type"] if w else None) for s, w in self.items.items()}

    def fulfil_order(self, kind: str, t: float | datetime) -> StockChange | None:
        """An order for one more ``kind`` (``"RED"``...): stored in the first empty slot at ``t``.
        None when the rack is full. Its id comes from its own stream, so the random stock
        evolution is the same with or without orders."""
        t = self._seconds(t)
        self.advance(t)
        empty = [s for s in SLOTS if self.items[s] is None]
        if not empty:
            return None
        uid = "04" + np.random.default_rng([self.seed, 6, len(self.changes)]).bytes(6).hex()
        change = StockChange(max(self.now, t), empty[0], None, {"id": uid, "type": kind, "state": "RAW"})
        self.items[empty[0]] = change.after
        self.changes.append(change)
        return change

    # -- environment ---------------------------------------------------------------
    def lighting(self, t: float | datetime) -> float:
        """Room lighting level at ``t`` (slow daylight-like swing between ~0.6 and ~1.1)."""
        t = self._seconds(t)
        return 0.85 + 0.25 * math.sin(2 * math.pi * t / self.lighting_period_s + self._env_phase)

    def _env_rng(self, t: float, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, stream, int(round(t * 1000))])

    # -- pictures and messages -----------------------------------------------------
    def frame(self, ts: float | datetime) -> tuple[bytes, dict[str, str | None]]:
        """The camera's JPEG at ``ts`` and the stock it shows (advances the factory to ``ts``)."""
        t = self._seconds(ts)
        self.advance(t)
        stock = self.stock
        img = render_warehouse(stock, rng=self._env_rng(t, 3), lighting=self.lighting(t))
        return encode_jpeg(img, self.jpeg_quality), stock

    def camera_message(self, ts: float | datetime) -> tuple[dict, dict[str, str | None]]:
        jpeg, stock = self.frame(ts)
        msg = {"ts": self.ts_string(ts), "data": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")}
        return self._ids(msg), stock

    def stock_message(self, ts: float | datetime) -> dict:
        """``f/i/stock`` for the stock in force at ``ts`` (does not advance the factory)."""
        items = [{"workpiece": dict(self.items[s]) if self.items[s] else None, "location": s} for s in SLOTS]
        return {"ts": self.ts_string(ts), "stockItems": items}

    def bme680_message(self, ts: float | datetime) -> dict:
        t = self._seconds(ts)
        r = self._env_rng(t, 4)
        temp = 22.0 + 1.5 * math.sin(2 * math.pi * t / 900 + self._env_phase) + r.normal(0, 0.05)
        hum = 41.0 - 4.0 * math.sin(2 * math.pi * t / 1200 + self._env_phase) + r.normal(0, 0.2)
        iaq = max(0.0, 55.0 + 20.0 * math.sin(2 * math.pi * t / 600 + self._env_phase) + r.normal(0, 2))
        return {"ts": self.ts_string(ts), "t": round(temp, 1), "rt": round(temp + 3.1 + r.normal(0, 0.05), 1),
                "h": round(hum, 1), "rh": round(hum - 6.0 + r.normal(0, 0.2), 1),
                "p": round(1013.2 + 0.8 * math.sin(2 * math.pi * t / 3600) + r.normal(0, 0.03), 1),
                "iaq": int(round(iaq)), "aq": 3 if t > 300 else (1 if t > 60 else 0),
                "gr": int(round(120_000 - 600 * iaq + r.normal(0, 500)))}

    def ldr_message(self, ts: float | datetime) -> dict:
        t = self._seconds(ts)
        br = min(100.0, max(0.0, 80.0 * self.lighting(t) + self._env_rng(t, 5).normal(0, 0.8)))
        return {"ts": self.ts_string(ts), "br": round(br, 1), "ldr": int(round(15000 * (1 - br / 100.0) + 500))}

    def ts_string(self, ts: float | datetime) -> str:
        return iso_ms(self.start + timedelta(seconds=self._seconds(ts)))

    def _ids(self, msg: dict) -> dict:
        if self.camera_id:
            msg["camera_id"] = self.camera_id
        if self.factory_id:
            msg["factory_id"] = self.factory_id
        return msg

    def _seconds(self, ts: float | datetime) -> float:
        if isinstance(ts, datetime):
            return (ts.astimezone(timezone.utc) - self.start).total_seconds()
        return float(ts)
