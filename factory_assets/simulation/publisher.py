"""Publishing the simulated factory over MQTT like the Fischertechnik TXT controller does.

Topics: ``i/cam`` (QoS 1), ``f/i/stock`` (QoS 1: at start, after every (re)connection, at
the instant the stock changes (before the next frame) and every ``stock_interval_s``),
``i/bme680`` and ``i/ldr`` (QoS 0, every ``sensor_interval_s``). The factory itself, its
stock and its pictures, is :class:`factory_assets.simulation.factory.FactorySimulator`.
``run_simulation`` stamps messages with ``start + scheduled offset``, so the same seed and
fps give the same stocks and images whatever the machine's speed.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from factory_assets.simulation.factory import (BME680_TOPIC, LDR_TOPIC, FactorySimulator, StockChange)
from factory_assets.simulation.render import TYPES
from factory_assets.vocabulary import CAMERA_TOPIC, ORDER_TOPIC, STOCK_TOPIC  # an order: {"type": "RED", "ts": ...}

logger = logging.getLogger(__name__)


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
                   include_ids: bool = False, client_id: str | None = None,
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
            logger.warning("MQTT connect to %s:%s refused: %s", host, port, reason_code)
            return
        result.connects += 1
        if obey_orders:
            client.subscribe(order_topic, qos=1)
        if result.connects > 1:
            republish.set()
        connected.set()
        logger.info("connected to %s:%s (connection #%d)", host, port, result.connects)

    def on_disconnect(client, userdata, flags, reason_code, properties=None):
        connected.clear()
        if not finishing.is_set():
            logger.warning("disconnected (%s); reconnecting", reason_code)

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
            logger.warning("ignored order on %s: %r", msg.topic, bytes(msg.payload)[:100])
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
        if not connected.wait(connect_timeout_s):
            logger.warning("no broker at %s:%s yet; publishing anyway (paho keeps retrying)", host, port)
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
                publish_stock(t_order)
                if change is not None:
                    logger.info("order for %s obeyed: stored in %s", kind, change.slot)
                else:
                    logger.warning("order for %s not obeyed: the rack is full", kind)
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
                if progress_every_s and next_frame - last_progress >= progress_every_s:
                    last_progress = next_frame
                    logger.info("t=%.1fs frames=%d stock_changes=%d dropped=%d stock=%s", next_frame,
                                result.frames, result.stock_changes, result.dropped_frames, _stock_line(stock))
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


def run_in_background(mqtt_url: str, **kwargs) -> tuple[threading.Event, threading.Thread, dict]:
    """``run_simulation`` on a daemon thread: ``(stop, thread, out)``. Set ``stop`` and join
    ``thread``; ``out["result"]`` is the :class:`SimulationResult`, or ``out["error"]`` what it raised."""
    stop = kwargs.pop("stop_event", None) or threading.Event()
    out: dict = {}

    def target() -> None:
        try:
            out["result"] = run_simulation(mqtt_url, stop_event=stop, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            out["error"] = exc

    thread = threading.Thread(target=target, name="factory-simulator", daemon=True)
    thread.start()
    return stop, thread, out
