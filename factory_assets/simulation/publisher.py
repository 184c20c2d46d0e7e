"""Publishing the simulated factory over MQTT as the Fischertechnik TXT controller does.

The controller's side: ``i/cam`` at QoS 0, not retained, and only while the camera is
switched on (``c/cam`` ``{"on": true, "fps": N}`` / ``{"on": false}``); everything else at
QoS 1: ``f/i/stock`` (when the warehouse decides a change, before its crane moves, and when
the crane is back), ``f/i/order``, ``f/i/state/<station>``, ``i/bme680`` and ``i/ldr`` (every
``sensor_interval_s``, 60 s like the controller). It takes ``f/o/order`` and
``f/o/state/ack`` by the controller's rules (:class:`~factory_assets.simulation.factory.FactorySimulator`).
Another customer (``customer=True``) is a second MQTT client that sends its own ``f/o/order``
through the broker. Every topic, published or subscribed, is under ``prefix``. A factory's
further cameras (``extra_cameras``) publish their own ``i/cam`` beside the controller's, each
message with its ``camera_id``, on the same schedule (switched by the same ``c/cam``).

``run_simulation`` stamps messages with ``start + scheduled offset`` (plus ``clock_offset_s``,
the controller's clock error), so the same seed and fps give the same stocks and images
whatever the machine's speed: the factory's own events run on a schedule of simulated
seconds, and the customer's orders are applied at the instant the factory sent them (after
the broker delivered them back). Orders from elsewhere (the platform) apply when they arrive.
"""
from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from factory_assets.simulation.factory import Camera, FactorySimulator, StockChange, Timings
from factory_assets.vocabulary import (BME680_TOPIC, BROADCAST_TOPIC, CAMERA_CONTROL_TOPIC, CAMERA_TOPIC,
                                       DEFAULT_QOS, LDR_TOPIC, ORDER_TOPIC, STOCK_TOPIC, TOPIC_QOS)
from factory_assets.vocabulary.mqtt import MqttTarget, TopicPrefix

logger = logging.getLogger(__name__)

ACK_TOPIC = "f/o/state/ack"  # the dashboard's Quit button: clears a station's fault
CAMERA_DEFAULT_FPS = 15.0  # the TXT camera's rate when c/cam switches it on without an fps


@dataclass
class SimulationResult:
    frames: int = 0  # every camera's
    stock_reports: int = 0
    sensor_reports: int = 0
    stock_changes: int = 0  # changes reported (each in .changes with its report and arrival time)
    dropped_frames: int = 0  # frames skipped because we fell behind the schedule
    connects: int = 0
    orders: int = 0  # f/o/order messages the controller took
    ignored_orders: int = 0  # stale, malformed (or, with busy_orders="ignore", arriving while busy)
    customer_orders: int = 0  # orders the other customer sent through the broker
    faults: int = 0
    camera_switches: int = 0  # c/cam messages obeyed
    published: dict = field(default_factory=dict)  # topic (unprefixed) -> messages published
    elapsed_s: float = 0.0
    changes: list[StockChange] = field(default_factory=list)
    cameras: int = 1  # cameras that published (the controller's and its further ones)


class _Camera:
    """The TXT camera: off until c/cam; frames on a grid of 1/fps from ``anchor``."""

    def __init__(self, on: bool, fps: float, follow: bool):
        self.on, self.fps, self.follow = on, fps, follow
        self.anchor, self.k = 0.0, 0
        self.shots = 0  # frame times published

    def next_t(self) -> float:
        return self.anchor + self.k / self.fps if self.on else math.inf

    def switch(self, on: bool, fps: float | None, t: float) -> None:
        if fps and fps > 0 and self.follow and fps != self.fps:
            self.fps, self.on = fps, False  # a new rate starts a new grid below
        if on and not self.on:
            if self.follow:
                self.anchor, self.k = t, 0
            else:  # the requested fixed rate: the same grid k/fps whenever it is switched on
                self.anchor, self.k = 0.0, max(self.k, math.ceil(t * self.fps - 1e-9))
        self.on = on


def run_simulation(mqtt_url: str, fps: float | None = 2.0, duration_s: float | None = None,
                   max_frames: int | None = None, seed: int = 0, stock_interval_s: float | None = None,
                   camera_id: str = "cam-1", factory_id: str = "factory-1", on_publish=None, *,
                   change_every_s: float = 20.0, sensor_interval_s: float = 60.0,
                   stop_event: threading.Event | None = None, connect_timeout_s: float = 10.0,
                   start: datetime | None = None, include_ids: bool = False, client_id: str | None = None,
                   progress_every_s: float = 0.0, obey_orders: bool = True, camera_on: bool = False,
                   timings: Timings | None = None, clock_offset_s: float = 0.0, prefix: str | TopicPrefix = "",
                   ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None,
                   password_env: str | None = None, customer: bool = True, arrivals: bool = True,
                   busy_orders: str = "latch", customer_timeout_s: float = 5.0,
                   broadcast_retry_s: float = 5.0, pose=None,
                   extra_cameras: tuple[Camera, ...] = ()) -> SimulationResult:
    """Publish the simulated factory to ``mqtt_url`` until ``duration_s``, ``max_frames`` or ``stop_event``.

    ``mqtt_url`` is anything :meth:`MqttTarget.parse` takes (logins, ``mqtts://``, with
    ``ca_file``/``cert_file``/``key_file``; the password may come from ``FACTORY_MQTT_PASSWORD``).
    The camera publishes nothing until ``c/cam`` switches it on (``camera_on=True``: already on,
    e.g. by the local dashboard). ``fps`` is the frame rate (a fixed schedule, whatever c/cam
    asks); ``fps=None`` follows the rate c/cam asks for, as the controller does.
    ``on_publish(topic, payload_dict, stock)`` is called after each publish (unprefixed topic)
    with the ground truth: for ``i/cam`` (and every topic but one) the rack as the camera shows
    it at the message's ``ts``; for ``f/i/stock`` the stock it reports. ``stock_interval_s``
    also republishes the stock periodically (the controller does not). ``include_ids`` adds
    ``camera_id``/``factory_id`` to the camera messages (the controller does not send them).
    Like the controller it announces itself on ``i/broadcast`` at start, again every
    ``broadcast_retry_s`` until a message for it (c/cam, an order) arrives. ``pose`` (a
    :class:`~factory_assets.simulation.render.CameraPose`; default the reference camera) is
    where this factory's camera looks at its rack. ``extra_cameras``: further cameras on the
    same rack (:class:`~factory_assets.simulation.factory.Camera`), each publishing ``i/cam``
    with its ``camera_id`` at every frame time of the controller's camera; ``max_frames`` and
    ``dropped_frames`` count frame times, ``frames`` every camera's frames.
    Survives broker restarts: paho reconnects and resubscribes; QoS 1 messages published
    meanwhile are queued and sent after the reconnection, QoS 0 frames are lost meanwhile.
    """
    import paho.mqtt.client as mqtt

    if (fps is not None and fps <= 0) or sensor_interval_s <= 0 or (stock_interval_s is not None
                                                                    and stock_interval_s <= 0):
        raise ValueError("fps, stock_interval_s and sensor_interval_s must be > 0")
    target = MqttTarget.parse(mqtt_url, ca_file=ca_file, cert_file=cert_file, key_file=key_file,
                              password_env=password_env)
    topics = prefix if isinstance(prefix, TopicPrefix) else TopicPrefix.parse(prefix or "")
    stop_event = stop_event or threading.Event()
    result = SimulationResult()
    connected = threading.Event()
    finishing = threading.Event()
    inbox: queue.Queue = queue.Queue(maxsize=10_000)  # (controller topic, payload bytes, monotonic time)
    subscriptions = [CAMERA_CONTROL_TOPIC] + ([ORDER_TOPIC, ACK_TOPIC] if obey_orders else [])
    who = f"{factory_id}: " if topics.prefix else ""  # a fleet's factories share the log

    def on_connect(client, userdata, flags, reason_code, properties=None):
        if reason_code.is_failure:
            logger.warning("MQTT connect to %s refused: %s", target.redacted, reason_code)
            return
        result.connects += 1
        client.subscribe([(topics.full(t), 1) for t in subscriptions])
        connected.set()
        logger.info("%sconnected to %s (connection #%d)%s", who, target.redacted, result.connects,
                    f", topics under {topics.prefix}" if topics.prefix else "")

    def on_disconnect(client, userdata, flags, reason_code, properties=None):
        connected.clear()
        if not finishing.is_set():
            logger.warning("%sdisconnected from %s (%s); reconnecting", who, target.redacted, reason_code)

    def on_message(client, userdata, msg):
        inner = topics.strip(msg.topic)
        if inner not in subscriptions:
            return
        try:
            inbox.put_nowait((inner, bytes(msg.payload), time.monotonic()))
        except queue.Full:
            logger.warning("dropped a %s message: the simulator is not keeping up", inner)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                         client_id=client_id or f"factory-sim-{factory_id}-{camera_id}-{time.time_ns() % 10**9:x}")
    target.configure(client)
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_message = on_message
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
    client.reconnect_delay_set(min_delay=1, max_delay=2)
    client.max_queued_messages_set(1000)  # bounded memory while the broker is away
    client.connect_async(target.host, target.port, keepalive=30)
    client.loop_start()
    shopper = None
    if customer and obey_orders:
        shopper = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                              client_id=f"factory-customer-{factory_id}-{camera_id}-{time.time_ns() % 10**9:x}")
        target.configure(shopper)
        shopper.reconnect_delay_set(min_delay=1, max_delay=2)
        shopper.connect_async(target.host, target.port, keepalive=30)
        shopper.loop_start()
    t0 = time.monotonic()
    deferred: list = []  # messages taken from the inbox while waiting for the customer's order

    try:
        if not connected.wait(connect_timeout_s):
            logger.warning("no broker at %s yet; publishing anyway (paho keeps retrying)", target.redacted)
        sim = FactorySimulator(seed, change_every_s, start=start or datetime.now(timezone.utc),
                               camera_id=camera_id if include_ids else None,
                               factory_id=factory_id if include_ids else None, timings=timings,
                               clock_offset_s=clock_offset_s, arrivals=arrivals, demand=customer,
                               busy_orders=busy_orders, pose=pose, extra_cameras=extra_cameras)
        result.cameras = sim.cameras
        camera = _Camera(camera_on, fps if fps is not None else CAMERA_DEFAULT_FPS, follow=fps is None)
        t0 = time.monotonic()

        def now_s() -> float:
            return time.monotonic() - t0

        def publish(topic: str, payload: dict, stock: dict) -> None:
            qos = TOPIC_QOS.get(topic, DEFAULT_QOS)
            info = client.publish(topics.full(topic), json.dumps(payload, separators=(",", ":")), qos=qos)
            # QoS 1 while disconnected: rc is NO_CONN but paho keeps the message and sends it
            # after reconnecting (up to max_queued_messages, then rc is QUEUE_SIZE: dropped)
            with unacked_lock:
                if info.mid in acked_early:
                    acked_early.discard(info.mid)
                elif qos and info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                    unacked.add(info.mid)
            result.published[topic] = result.published.get(topic, 0) + 1
            if topic == STOCK_TOPIC:
                result.stock_reports += 1
            if on_publish is not None:
                on_publish(topic, payload, stock)

        def drain() -> None:
            while sim.outbox:
                message = sim.outbox.popleft()
                publish(message.topic, message.payload, message.stock)
            if len(result.changes) < len(sim.changes):
                result.changes.extend(sim.changes[len(result.changes):])
                result.stock_changes = len(result.changes)
            result.orders, result.ignored_orders, result.faults = \
                sim.accepted_orders, sim.ignored_orders, sim.faults

        heard = threading.Event()  # a message for the controller arrived: it stops announcing itself
        if camera_on:
            heard.set()  # switched on already: the dashboard is there

        def customer_order(payload: dict, t: float) -> dict | None:
            """The other customer's order, sent by its own client; the factory takes it as received."""
            body = json.dumps(payload, separators=(",", ":")).encode()
            shopper.publish(topics.full(ORDER_TOPIC), body, qos=1)
            result.customer_orders += 1
            deadline = time.monotonic() + customer_timeout_s
            while not stop_event.is_set():
                try:
                    item = inbox.get(timeout=max(0.0, min(0.1, deadline - time.monotonic())))
                except queue.Empty:
                    if time.monotonic() >= deadline:
                        logger.warning("the customer's %s order did not come back through the broker", payload["type"])
                        return None
                    continue
                if item[0] == ORDER_TOPIC and item[1] == body:
                    heard.set()
                    return json.loads(body)
                deferred.append(item)
            return None

        if shopper is not None:
            sim.customer_hook = customer_order

        def handle(item) -> None:
            topic, body, received = item
            heard.set()
            t = max(sim.now, received - t0)
            if topic == CAMERA_CONTROL_TOPIC:
                control = _camera_control(body)
                if control is None:
                    logger.warning("ignored c/cam %r: not {\"on\": true|false[, \"fps\": N]}", body[:100])
                    return
                on, rate = control
                camera.switch(on, rate, t)
                result.camera_switches += 1
                logger.info("%scamera %s (%g fps)", who, "on" if on else "off", camera.fps)
            elif topic == ORDER_TOPIC:
                sim.receive_order(body, t)
            elif topic == ACK_TOPIC:
                sim.receive_ack(body, t)
            drain()

        next_stock = 0.0 if stock_interval_s else math.inf
        next_sensor = 0.0
        next_broadcast = 0.0
        last_progress = 0.0
        drain()
        while not stop_event.is_set():
            while deferred:
                handle(deferred.pop(0))
            next_frame = camera.next_t()
            if max_frames is not None and camera.shots >= max_frames:
                break
            if heard.is_set() and next_broadcast > 0:
                next_broadcast = math.inf
            t_next = min(next_frame, next_stock, next_sensor, sim.next_event_at, next_broadcast)
            if duration_s is not None and t_next >= duration_s:
                break
            delay = t_next - now_s()
            if delay > 0:
                try:  # sleep until the next thing happens, or a message arrives
                    handle(inbox.get(timeout=min(delay, 0.1)))
                except queue.Empty:
                    pass
                continue
            if sim.next_event_at <= t_next:
                sim.advance(t_next)
                drain()
            elif next_broadcast <= t_next:
                publish(BROADCAST_TOPIC, sim.broadcast_message(next_broadcast), sim.shown_stock)
                next_broadcast += broadcast_retry_s
            elif next_stock <= t_next:
                publish(STOCK_TOPIC, sim.stock_message(next_stock), sim.stock)
                next_stock += stock_interval_s
            elif next_sensor <= t_next:
                shown = sim.shown_stock
                publish(BME680_TOPIC, sim.bme680_message(next_sensor), shown)
                publish(LDR_TOPIC, sim.ldr_message(next_sensor), shown)
                result.sensor_reports += 2
                next_sensor += sensor_interval_s
            else:
                period = 1.0 / camera.fps
                behind = now_s() - next_frame
                if behind > period and result.frames > 0:  # fell behind: skip to the present
                    skipped = int(behind // period)
                    result.dropped_frames += skipped
                    camera.k += skipped
                    continue
                for j in range(sim.cameras):  # the controller's camera, then each further one
                    msg, stock = sim.camera_message(next_frame, j)
                    drain()
                    publish(CAMERA_TOPIC, msg, stock)
                    result.frames += 1
                camera.k += 1
                camera.shots += 1
                if progress_every_s and next_frame - last_progress >= progress_every_s:
                    last_progress = next_frame
                    logger.info("%st=%.1fs frames=%d stock_changes=%d orders=%d dropped=%d stock=%s", who,
                                next_frame, result.frames, result.stock_changes, result.orders, result.dropped_frames,
                                _stock_line(sim.stock))
        # let the last QoS 1 messages reach the broker (bounded wait)
        deadline = time.monotonic() + 5.0
        while unacked and connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        finishing.set()
        result.elapsed_s = time.monotonic() - t0
        client.disconnect()
        client.loop_stop()
        if shopper is not None:
            shopper.disconnect()
            shopper.loop_stop()
    return result


def _camera_control(body: bytes) -> tuple[bool, float | None] | None:
    """``c/cam`` as the controller reads it: ``on`` (a boolean), ``fps`` when positive."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("on"), (bool, int)) or isinstance(data.get("on"), float):
        return None
    rate = data.get("fps")
    rate = float(rate) if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0 else None
    return bool(data["on"]), rate


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
