"""A simulated Fischertechnik factory: the warehouse camera, the stock reports and the
environment sensors, published over MQTT like the TXT controller does.

Topics and payloads (all ``ts`` are UTC ISO-8601 with milliseconds and ``Z``):

* ``i/cam``     ``{"ts", "data": "data:image/jpeg;base64,..."}``: a 320x240 JPEG, QoS 1;
* ``f/i/stock`` ``{"ts", "stockItems": [{"workpiece": {"id", "type", "state"} | null, "location"}, ...]}``
  with all 9 locations, QoS 1: at start, after every (re)connection, at the instant the
  stock changes (before the next frame) and every ``stock_interval_s``;
* ``i/bme680``  ``{"ts", "t", "rt", "h", "rh", "p", "iaq", "aq", "gr"}`` and
  ``i/ldr`` ``{"ts", "br", "ldr"}`` every ``sensor_interval_s``, QoS 0.

Ground truth: a frame shows the stock in force at its ``ts``. Everything is a pure
function of the seed and the simulated time (seconds since the start): the sequence
of stock changes (one slot at a time, about every ``change_every_s``), the lighting,
the sensor readings and the pictures. ``run_simulation`` stamps messages with
``start + scheduled offset``, so the same seed and fps give the same stocks and images
whatever the machine's speed.
"""
from __future__ import annotations

import base64
import json
import math
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np

from factory_assets.simulation.render import SLOTS, TYPES, encode_jpeg, render_warehouse
from factory_assets.vocabulary import CAMERA_TOPIC, ORDER_TOPIC, STOCK_TOPIC  # an order: {"type": "RED", "ts": ...}

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


# -- publishing over MQTT ----------------------------------------------------------------

@dataclass
class SimulationResult:
    frames: int = 0
    stock_reports: int = 0
    sensor_reports: int = 0
    stock_changes: int = 0
    dropped_frames: int = 0  # frames skipped because we fell behind the schedule
    connects: int = 0
    orders: int = 0  # f/o/order messages obeyed
    elapsed_s: float = 0.0
    changes: list[StockChange] = field(default_factory=list)


def run_simulation(mqtt_url: str, fps: float = 2.0, duration_s: float | None = None, max_frames: int | None = None,
                   seed: int = 0, stock_interval_s: float = 10.0, camera_id: str = "cam-1",
                   factory_id: str = "factory-1", on_publish=None, *, change_every_s: float = 20.0,
                   sensor_interval_s: float = 5.0, stop_event: threading.Event | None = None,
                   connect_timeout_s: float = 10.0, start: datetime | None = None,
                   include_ids: bool = False, client_id: str | None = None, log=None,
                   progress_every_s: float = 0.0, obey_orders: bool = True,
                   order_topic: str = ORDER_TOPIC) -> SimulationResult:
    """Publish the simulated factory to ``mqtt_url`` until ``duration_s``, ``max_frames`` or ``stop_event``.

    ``on_publish(topic, payload_dict, stock)`` is called after each publish with the
    stock in force at the message's ``ts`` (slot -> type or None): the ground truth.
    ``include_ids`` adds ``camera_id``/``factory_id`` to the camera messages (the real
    TXT controller does not send them). Survives broker restarts: paho reconnects
    (QoS 1 messages published meanwhile are queued and sent after the reconnection),
    and the stock is republished after every reconnection. With ``obey_orders`` it
    subscribes to ``order_topic`` and stores one workpiece of each ordered ``type`` in the
    first empty slot, then reports the stock at once (the platform's desired-state loop).
    """
    import queue
    import paho.mqtt.client as mqtt

    from factory_assets.ingest.mqtt import parse_mqtt_url

    if fps <= 0 or stock_interval_s <= 0 or sensor_interval_s <= 0:
        raise ValueError("fps, stock_interval_s and sensor_interval_s must be > 0")
    host, port = parse_mqtt_url(mqtt_url)
    stop_event = stop_event or threading.Event()
    result = SimulationResult()
    connected = threading.Event()
    republish = threading.Event()
    finishing = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties=None):
        if reason_code.is_failure:
            if log:
                log(f"MQTT connect to {host}:{port} refused: {reason_code}")
            return
        result.connects += 1
        if obey_orders:
            client.subscribe(order_topic, qos=1)
        if result.connects > 1:
            republish.set()
        connected.set()
        if log:
            log(f"simulator connected to {host}:{port} (connection #{result.connects})")

    def on_disconnect(client, userdata, flags, reason_code, properties=None):
        connected.clear()
        if log and not finishing.is_set():
            log(f"simulator disconnected ({reason_code}); reconnecting")

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                         client_id=client_id or f"factory-sim-{camera_id}-{time.time_ns() % 10**9:x}")
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    # QoS 1 messages not acknowledged by the broker yet (to flush at the end). Never hold
    # our lock while calling paho: paho calls on_publish holding its own message mutex.
    unacked: set[int] = set()
    acked_early: set[int] = set()  # acknowledged before publish() returned
    unacked_lock = threading.Lock()

    def on_acked(client, userdata, mid, reason_code=None, properties=None):
        with unacked_lock:
            if mid in unacked:
                unacked.discard(mid)
            else:
                acked_early.add(mid)

    client.on_publish = on_acked
    orders: queue.Queue = queue.Queue(maxsize=1000)

    def on_message(client, userdata, msg):
        try:
            kind = str(json.loads(msg.payload)["type"]).upper()
        except (ValueError, KeyError, TypeError):
            kind = None
        if kind not in TYPES:
            if log:
                log(f"ignored order on {msg.topic}: {bytes(msg.payload)[:100]!r}")
            return
        try:
            orders.put_nowait(kind)
        except queue.Full:
            pass

    def wait(delay: float) -> bool:
        """Sleep ``delay`` s or until an order arrives; True when stopped."""
        if not obey_orders:
            return stop_event.wait(delay)
        end = time.monotonic() + delay
        while orders.empty():
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            if stop_event.wait(min(remaining, 0.02)):
                return True
        return stop_event.is_set()

    client.on_message = on_message
    client.reconnect_delay_set(min_delay=1, max_delay=2)
    client.max_queued_messages_set(1000)  # bounded memory while the broker is away
    client.connect_async(host, port, keepalive=30)
    client.loop_start()
    t0 = time.monotonic()

    try:
        if not connected.wait(connect_timeout_s) and log:
            log(f"no broker at {host}:{port} yet; publishing anyway (paho keeps retrying)")
        sim = FactorySimulator(seed, change_every_s, start=start or datetime.now(timezone.utc),
                               camera_id=camera_id if include_ids else None,
                               factory_id=factory_id if include_ids else None)
        t0 = time.monotonic()

        def publish(topic: str, payload: dict, qos: int, stock: dict) -> None:
            info = client.publish(topic, json.dumps(payload, separators=(",", ":")), qos=qos)
            # QoS 1 while disconnected: rc is NO_CONN but paho keeps the message and sends it
            # after reconnecting (up to max_queued_messages, then rc is QUEUE_SIZE: dropped)
            with unacked_lock:
                if info.mid in acked_early:
                    acked_early.discard(info.mid)
                elif qos and info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                    unacked.add(info.mid)
            if on_publish is not None:
                on_publish(topic, payload, stock)

        def publish_stock(t: float) -> None:
            publish(STOCK_TOPIC, sim.stock_message(t), 1, sim.stock)
            result.stock_reports += 1

        def publish_sensors(t: float) -> None:
            stock = sim.stock
            publish(BME680_TOPIC, sim.bme680_message(t), 0, stock)
            publish(LDR_TOPIC, sim.ldr_message(t), 0, stock)
            result.sensor_reports += 2

        period = 1.0 / fps
        frame_k = 0
        next_stock = 0.0
        next_sensor = 0.0
        last_progress = 0.0
        while not stop_event.is_set():
            next_frame = frame_k * period
            if duration_s is not None and next_frame >= duration_s:
                break
            if max_frames is not None and result.frames >= max_frames:
                break
            # the next thing that happens in the factory: a stock change, a report, a frame
            while not orders.empty():  # orders first: the stock changes now, then it is reported
                kind = orders.get_nowait()
                t_order = max(sim.now, time.monotonic() - t0)
                change = sim.fulfil_order(kind, t_order)
                result.orders += 1
                if change is not None:
                    result.stock_changes += 1
                    result.changes.append(change)
                elif log:
                    log(f"order for {kind}: the rack is full")
                publish_stock(t_order)
                if log:
                    log(f"order for {kind} obeyed: {change.slot if change else 'rack full'}")
            t_next = min(next_frame, next_stock, next_sensor, sim.next_change_at)
            delay = t_next - (time.monotonic() - t0)
            if delay > 0 and wait(delay):
                break
            if not orders.empty():
                continue
            if republish.is_set():  # after a reconnection: tell the world the current stock
                republish.clear()
                # stamped just before the next change at the latest: the stock reported is in force then
                publish_stock(max(sim.now, min(time.monotonic() - t0, sim.next_change_at - 0.001)))
            if sim.next_change_at <= t_next:
                changes = sim.advance(sim.next_change_at)
                result.stock_changes += len(changes)
                result.changes.extend(changes)
                publish_stock(sim.now)
                next_stock = sim.now + stock_interval_s
            elif next_stock <= t_next:
                publish_stock(next_stock)
                next_stock += stock_interval_s
            elif next_sensor <= t_next:
                publish_sensors(next_sensor)
                next_sensor += sensor_interval_s
            else:
                behind = time.monotonic() - t0 - next_frame
                if behind > period and frame_k > 0:  # fell behind: skip to the present
                    skipped = int(behind // period)
                    result.dropped_frames += skipped
                    frame_k += skipped
                    continue
                msg, stock = sim.camera_message(next_frame)
                publish(CAMERA_TOPIC, msg, 1, stock)
                result.frames += 1
                frame_k += 1
                if log and progress_every_s and next_frame - last_progress >= progress_every_s:
                    last_progress = next_frame
                    log(f"t={next_frame:7.1f}s frames={result.frames} stock_changes={result.stock_changes} "
                        f"dropped={result.dropped_frames} stock={_stock_line(stock)}")
        # let the last QoS 1 messages reach the broker (bounded wait)
        deadline = time.monotonic() + 5.0
        while unacked and connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        finishing.set()
        result.elapsed_s = time.monotonic() - t0
        client.disconnect()
        client.loop_stop()
    return result


def _stock_line(stock: dict[str, str | None]) -> str:
    return " ".join(f"{s}:{(v or '-')[0]}" for s, v in stock.items())
