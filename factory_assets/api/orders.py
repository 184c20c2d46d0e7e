"""Turning a pending order into the factory's own order message on MQTT.

The Fischertechnik cloud orders a workpiece with ``f/o/order`` ``{"type": "RED", "ts": ...}``;
we publish exactly that (QoS 1) and mark the order published once the broker
acknowledged it. The order was stored as ``pending`` before (store, then act), so an
order is never lost between the two: every API process with a broker sweeps the
pending, unpublished orders when its connection comes up (each reconnection) and every
``sweep_interval`` seconds, and sends them. An order that was not acknowledged in time
(broker down, a publish in flight when the connection dropped, an API process that
died after storing it) is therefore sent later, however it failed.

Before sending, a process claims the order (a conditional update with a lease), so two
API processes never both send it; a claim of a process that died expires after
``claim_seconds``. Delivery is at least once: a process that dies after the broker's
acknowledgement and before marking the order published leaves it to be sent again.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from datetime import datetime, timezone

from factory_assets.twin.desired import (claim_order, mark_published, release_claim, renew_claims,
                                         restore_orders, unpublished_orders)
from factory_assets.vocabulary import ORDER_TOPIC

logger = logging.getLogger(__name__)

DEFAULT_ORDER_TOPIC = ORDER_TOPIC


def iso_ms(dt: datetime) -> str:
    dt = dt.astimezone(timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def order_message(order: dict) -> dict:
    return {"type": order["type"], "ts": iso_ms(order["created_at"])}


class OrderPublisher:
    """One paho client per API process (connects in the background, reconnects by itself).

    ``publish`` sends one order and waits (bounded) for the broker's acknowledgement;
    ``sweep`` sends every pending order nobody is sending; ``run_sweeps`` (a task on the
    API's event loop) sweeps on each (re)connection and every ``sweep_interval`` seconds.
    An acknowledgement that arrives after the wait still marks the order published
    (``on_publish`` in paho's network thread)."""

    def __init__(self, mqtt_url: str, topic: str = DEFAULT_ORDER_TOPIC, *, ack_timeout: float = 5.0,
                 sweep_interval: float = 10.0, claim_seconds: float = 60.0):
        from factory_assets.ingest.mqtt import parse_mqtt_url

        self.host, self.port = parse_mqtt_url(mqtt_url)
        self.topic = topic
        self.ack_timeout = ack_timeout
        self.sweep_interval = sweep_interval
        self.claim_seconds = claim_seconds
        self.owner = f"api-{uuid.uuid4().hex[:12]}"
        self.connected = threading.Event()
        self.sweeps = 0  # sweeps completed (tests wait on it)
        self._client = None
        self._lock = threading.Lock()
        self._inflight: dict[str, object] = {}  # order id -> MQTTMessageInfo not acknowledged yet
        self._acked: list[str] = []  # late acknowledgements, marked published by the next sweep
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kick: asyncio.Event | None = None

    # -- connection (paho's network thread runs the callbacks) ------------------------------
    def start(self, fdb=None) -> "OrderPublisher":
        """Connect in the background. ``fdb`` is accepted for callers of the earlier signature:
        every database call now happens in ``publish`` and ``sweep``, never in paho's thread."""
        import paho.mqtt.client as mqtt

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"factory-assets-{self.owner}")
        client.on_connect = self._on_connect
        client.on_disconnect = lambda c, u, f, rc, p=None: self.connected.clear()
        client.on_publish = self._on_publish
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        client.max_queued_messages_set(1000)
        client.connect_async(self.host, self.port, keepalive=30)
        client.loop_start()
        self._client = client
        return self

    def stop(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            client.disconnect()
            client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            return
        self.connected.set()
        self._wake()  # a (re)connection: send what is waiting

    def _on_publish(self, client, userdata, mid, reason_code=None, properties=None) -> None:
        # paho's network thread: no database call here (it would hold up keepalives and every
        # other acknowledgement); the sweep it wakes marks the order published
        with self._lock:
            order_id = next((oid for oid, info in self._inflight.items() if info.mid == mid), None)
            if order_id is not None:
                del self._inflight[order_id]
                self._acked.append(order_id)
        if order_id is not None:
            self._wake()

    def _mark_acknowledged(self, fdb) -> None:
        """Mark the late acknowledgements published, before anything is sent again."""
        with self._lock:
            acked, self._acked = self._acked, []
        for i, order_id in enumerate(acked):
            try:
                if mark_published(fdb, order_id):
                    logger.info("order %s acknowledged by the broker (late)", order_id)
            except Exception:
                with self._lock:  # MongoDB away: kept for the next sweep (the claim is renewed meanwhile)
                    self._acked[:0] = acked[i:]
                raise

    def _wake(self) -> None:
        loop, kick = self._loop, self._kick
        if loop is not None and kick is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(kick.set)
            except RuntimeError:  # the loop closed meanwhile
                pass

    # -- sending ------------------------------------------------------------------------------
    def _send(self, fdb, order: dict):
        """Claim and publish one order without waiting; its MQTTMessageInfo, or None."""
        import paho.mqtt.client as mqtt

        client = self._client
        if client is None or not self.connected.is_set():
            return None
        if not claim_order(fdb, order["_id"], self.owner, self.claim_seconds):
            with self._lock:
                return self._inflight.get(order["_id"])  # this process is sending it already
        payload = json.dumps(order_message(order), separators=(",", ":"))
        info = client.publish(self.topic, payload, qos=1)
        # queued without a connection, paho sends it on reconnection; any other error: not queued
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            logger.warning("order %s not published yet (paho rc %s)", order["_id"], info.rc)
            release_claim(fdb, order["_id"], self.owner)
            return None
        with self._lock:
            self._inflight[order["_id"]] = info
        logger.info("order %s sent on %s: %s", order["_id"], self.topic, payload)
        return info

    def _acknowledged(self, fdb, order_id: str, info, timeout: float) -> bool:
        try:
            info.wait_for_publish(max(timeout, 0.0))
        except (RuntimeError, ValueError) as exc:  # not connected / queue full: the sweep resends
            logger.warning("order %s not acknowledged yet: %s", order_id, exc)
            return False
        if not info.is_published():
            return False
        with self._lock:
            if self._inflight.get(order_id) is info:
                del self._inflight[order_id]
        mark_published(fdb, order_id)
        return True

    def publish(self, fdb, order: dict) -> bool:
        """Publish one order; True once the broker acknowledged it (then it is marked published).
        False leaves it pending: a sweep sends it (or this send's late acknowledgement marks it)."""
        if self._client is None:
            return False
        if not self.connected.wait(self.ack_timeout):
            logger.warning("order %s: no broker connection; it is sent when the broker is back", order["_id"])
            return False
        info = self._send(fdb, order)
        if info is None:
            return False
        if not self._acknowledged(fdb, order["_id"], info, self.ack_timeout):
            logger.warning("order %s: no acknowledgement from the broker within %.0fs", order["_id"],
                           self.ack_timeout)
            return False
        return True

    def sweep(self, fdb, factory_id: str | None = None) -> int:
        """Send the pending orders nobody is sending (unclaimed, or a dead sender's expired
        claim); how many the broker acknowledged within ``ack_timeout``."""
        if self._client is None:
            return 0
        self._mark_acknowledged(fdb)
        with self._lock:
            mine = list(self._inflight) + list(self._acked)
        # still ours, connected or not: paho resends them on reconnection, and a claim left to
        # lapse during an outage would let another API process send the same order again
        renew_claims(fdb, mine, self.owner, self.claim_seconds)
        if not self.connected.is_set():
            return 0
        restore_orders(fdb)  # an order a crash left recorded on the twin but not stored
        sent = [(o["_id"], info) for o in unpublished_orders(fdb, factory_id)
                if (info := self._send(fdb, o)) is not None]
        deadline = time.monotonic() + self.ack_timeout
        acked = sum(self._acknowledged(fdb, oid, info, deadline - time.monotonic()) for oid, info in sent)
        if sent:
            logger.info("order sweep: %d sent, %d acknowledged", len(sent), acked)
        return acked

    republish_pending = sweep

    async def run_sweeps(self, fdb) -> None:
        """Sweep on every (re)connection and every ``sweep_interval`` seconds, until cancelled.
        Runs on the API's event loop; the sweep itself (database, acknowledgements) in its
        worker threads."""
        self._loop = asyncio.get_running_loop()
        self._kick = asyncio.Event()
        if self.connected.is_set():
            self._kick.set()  # connected before this task began: on_connect's wake-up was lost
        while True:
            try:
                await asyncio.wait_for(self._kick.wait(), self.sweep_interval)
            except asyncio.TimeoutError:
                pass
            self._kick.clear()
            try:
                await asyncio.to_thread(self.sweep, fdb)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 (MongoDB away: the next sweep tries again)
                logger.exception("order sweep failed; retrying in %.0fs", self.sweep_interval)
            self.sweeps += 1
