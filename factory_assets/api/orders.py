"""Turning a pending order into the factory's own order message on MQTT.

The Fischertechnik cloud orders a workpiece with ``f/o/order`` ``{"type": "RED", "ts": ...}``;
we publish exactly that (QoS 1) and mark the order published once the broker
acknowledged it. The order was stored as ``pending`` before (store, then act): an
order whose publish failed stays pending and unpublished, and ``republish_pending``
sends it when the broker is back.
"""
from __future__ import annotations

import json
import logging
import threading
import uuid
from datetime import datetime, timezone

from factory_assets.twin.desired import mark_published, orders
from factory_assets.vocabulary import ORDER_TOPIC

logger = logging.getLogger(__name__)

DEFAULT_ORDER_TOPIC = ORDER_TOPIC


def iso_ms(dt: datetime) -> str:
    dt = dt.astimezone(timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def order_message(order: dict) -> dict:
    return {"type": order["type"], "ts": iso_ms(order["created_at"])}


class OrderPublisher:
    """One paho client per API process (connects in the background, reconnects by itself)."""

    def __init__(self, mqtt_url: str, topic: str = DEFAULT_ORDER_TOPIC, *, ack_timeout: float = 5.0):
        from factory_assets.ingest.mqtt import parse_mqtt_url

        self.host, self.port = parse_mqtt_url(mqtt_url)
        self.topic = topic
        self.ack_timeout = ack_timeout
        self.connected = threading.Event()
        self._client = None

    def start(self) -> "OrderPublisher":
        import paho.mqtt.client as mqtt

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"factory-assets-api-{uuid.uuid4().hex[:8]}")
        client.on_connect = lambda c, u, f, rc, p=None: (not rc.is_failure) and self.connected.set()
        client.on_disconnect = lambda c, u, f, rc, p=None: self.connected.clear()
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        client.max_queued_messages_set(1000)
        client.connect_async(self.host, self.port, keepalive=30)
        client.loop_start()
        self._client = client
        return self

    def stop(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def publish(self, fdb, order: dict) -> bool:
        """Publish one order; True once the broker acknowledged it (then it is marked published)."""
        if self._client is None:
            return False
        self.connected.wait(self.ack_timeout)
        payload = json.dumps(order_message(order), separators=(",", ":"))
        info = self._client.publish(self.topic, payload, qos=1)
        try:
            info.wait_for_publish(self.ack_timeout)
        except (RuntimeError, ValueError) as exc:  # not connected / queue full
            logger.warning("order %s not published yet: %s", order["_id"], exc)
            return False
        if not info.is_published():
            logger.warning("order %s: no acknowledgement from the broker within %.0fs", order["_id"], self.ack_timeout)
            return False
        mark_published(fdb, order["_id"])
        logger.info("order %s published on %s: %s", order["_id"], self.topic, payload)
        return True

    def republish_pending(self, fdb, factory_id: str | None = None) -> int:
        query = {"status": "pending", "published_at": None}
        if factory_id:
            query["factory_id"] = factory_id
        return sum(self.publish(fdb, o) for o in orders(fdb).find(query).sort("created_at", 1).limit(100))
