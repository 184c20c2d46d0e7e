"""The API's order dispatcher: sends each factory's queued orders one at a time on MQTT and
follows their states (the decisions and the bookkeeping are ``twin.orders``; this module is
the MQTT client and the loop that runs them).

Every ``interval`` seconds, and at once when an order is placed, the broker connects or the
factory is heard on ``f/i/order``, one pass does for each factory with work:

1. take (or renew) the factory's lease (``order_dispatch``): one API process dispatches a
   factory at a time; a dead one's lease expires;
2. follow the factory's ``f/i/order`` / ``f/i/state/hbw`` messages the ingester stored, from
   the cursor (states move, a warehouse fault fails the order in work);
3. record the next send, if any (a queued order when the factory is ready, or a re-send with a
   fresh ``ts`` of one not acknowledged), then publish it (store, then act) and record whether
   the broker took it;
4. bring the twin's ``orders`` list in line (a versioned change, so live pages see it).

The client publishes ``f/o/order`` at QoS 1 under the factory's topic prefix and subscribes
to ``f/i/order`` itself: an ``ORDERED`` it hears holds back a re-send while the ingester has not
stored it yet (a lagging ingester would otherwise make us send a second piece).
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
from datetime import datetime

from factory_assets.twin import orders as tw
from factory_assets.vocabulary import ORDER_STATE_TOPIC, ORDER_TOPIC, utcnow
from factory_assets.vocabulary.mqtt import MqttTarget, TopicPrefix, match_prefix

logger = logging.getLogger(__name__)

DEFAULT_ORDER_TOPIC = ORDER_TOPIC
iso_ms = tw.controller_ts


class MqttOrderLink:
    """One paho client per API process: publishes orders (each factory under its prefix) and
    listens to ``f/i/order`` (connects in the background, reconnects by itself)."""

    def __init__(self, target: MqttTarget, *, prefixes: tuple[TopicPrefix, ...] = (),
                 default_factory: str = "factory-1", order_topic: str = ORDER_TOPIC, publish_timeout: float = 5.0):
        self.target = target
        self.prefixes = tuple(prefixes)
        self.default_factory = default_factory
        self.order_topic = order_topic
        self.publish_timeout = publish_timeout
        self.client_id = f"factory-assets-api-{uuid.uuid4().hex[:12]}"
        self.connected = threading.Event()
        self.on_wake = None  # called (paho's thread) on connection and on an f/i/order heard
        self._client = None
        self._lock = threading.Lock()
        self._heard: dict[tuple[str, str], datetime] = {}  # (factory, type) -> when ORDERED was last heard

    # -- prefixes -------------------------------------------------------------------------------
    def prefix_for(self, factory_id: str) -> TopicPrefix:
        """The prefix a factory's messages travel under: its own ``--prefix P=FACTORY``, else a
        ``--prefix P`` without a factory, else none."""
        own = next((p for p in self.prefixes if p.factory_id == factory_id), None)
        return own or next((p for p in self.prefixes if p.factory_id is None), TopicPrefix())

    def topic_for(self, factory_id: str) -> str:
        return self.prefix_for(factory_id).full(self.order_topic)

    def _factory_of(self, topic: str) -> str | None:
        matched = match_prefix(self.prefixes or (TopicPrefix(),), topic)
        if matched is None or matched[1] != ORDER_STATE_TOPIC:
            return None
        return matched[0].factory_id or self.default_factory

    # -- connection (paho's network thread runs the callbacks) ------------------------------------
    def start(self) -> "MqttOrderLink":
        import paho.mqtt.client as mqtt

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id)
        self.target.configure(client)
        client.on_connect = self._on_connect
        client.on_disconnect = lambda c, u, f, rc, p=None: self.connected.clear()
        client.on_message = self._on_message
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        client.max_queued_messages_set(100)
        client.connect_async(self.target.host, self.target.port, keepalive=30)
        client.loop_start()
        self._client = client
        logger.info("orders: MQTT client for %s (orders on %s)", self.target.redacted,
                    ", ".join(sorted({p.full(self.order_topic) for p in self.prefixes})) or self.order_topic)
        return self

    def stop(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            client.disconnect()
            client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            logger.warning("orders: MQTT connection to %s refused: %s", self.target.redacted, reason_code)
            return
        subscriptions = sorted({p.full(ORDER_STATE_TOPIC) for p in (self.prefixes or (TopicPrefix(),))})
        client.subscribe([(t, 1) for t in subscriptions])
        self.connected.set()
        self._wake()

    def _on_message(self, client, userdata, msg) -> None:
        factory = self._factory_of(msg.topic)
        if factory is None:
            return
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(payload, dict) and payload.get("state") in ("ORDERED", "IN_PROCESS", "SHIPPED"):
            with self._lock:
                self._heard[(factory, str(payload.get("type")))] = utcnow()
        self._wake()

    def _wake(self) -> None:
        if self.on_wake is not None:
            self.on_wake()

    def heard_ack(self, factory_id: str, kind: str, since: datetime) -> bool:
        """Did this process hear the factory take an order of ``kind`` since ``since``?"""
        with self._lock:
            heard = self._heard.get((factory_id, kind))
        return heard is not None and heard >= since

    # -- sending ------------------------------------------------------------------------------------
    def publish(self, factory_id: str, payload: dict) -> bool:
        """Publish one order message (QoS 1); True once the broker acknowledged it."""
        client = self._client
        if client is None or not self.connected.is_set():
            return False
        body = json.dumps(payload, separators=(",", ":"))
        topic = self.topic_for(factory_id)
        info = client.publish(topic, body, qos=1)
        try:
            info.wait_for_publish(self.publish_timeout)
        except (RuntimeError, ValueError) as exc:  # not connected / queue full
            logger.warning("order to %s on %s not taken by the broker: %s", factory_id, topic, exc)
            return False
        if not info.is_published():
            logger.warning("order to %s on %s: no acknowledgement from the broker within %.0f s", factory_id,
                           topic, self.publish_timeout)
            return False
        logger.info("order sent to %s on %s: %s", factory_id, topic, body)
        return True


class OrderDispatcher:
    """Runs the passes (see the module docstring) on the API's event loop, the database and
    MQTT work in worker threads. ``pass_once`` is the whole of one pass (tests call it)."""

    def __init__(self, fdb, link: MqttOrderLink | None, rules: tw.OrderRules | None = None, *,
                 interval: float = 1.0):
        self.fdb = fdb
        self.link = link
        self.rules = rules or tw.OrderRules()
        self.interval = interval
        self.owner = f"api-{uuid.uuid4().hex[:12]}"
        self.passes = 0  # passes completed (tests wait on it)
        self.sends = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kick: asyncio.Event | None = None
        self._pass_lock = threading.Lock()
        if link is not None:
            link.on_wake = self.kick

    def kick(self) -> None:
        """Run a pass soon (thread-safe)."""
        loop, kick = self._loop, self._kick
        if loop is not None and kick is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(kick.set)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def pass_once(self, now: datetime | None = None) -> int:
        """One pass over every factory with work; how many order messages were published."""
        with self._pass_lock:
            published = 0
            for factory_id in tw.factories_with_work(self.fdb):
                try:
                    published += self._factory_pass(factory_id, now)
                except Exception:  # noqa: BLE001 - one factory's trouble must not hold up the others
                    logger.exception("orders: pass for %s failed; the next pass tries again", factory_id)
            return published

    def _factory_pass(self, factory_id: str, now: datetime | None) -> int:
        if not tw.claim_factory(self.fdb, factory_id, self.owner, self.rules, now):
            return 0
        tw.restore_orders(self.fdb, self.fdb.twin.find_one({"_id": factory_id}, {"orders": 1}))
        tw.follow(self.fdb, factory_id, self.rules)
        published = 0
        link = self.link
        send = tw.next_send(self.fdb, factory_id, self.rules, now=now,
                            connected=link is not None and link.connected.is_set(),
                            heard_ack=link.heard_ack if link is not None else None)
        if send is not None:
            ok = link.publish(factory_id, send.payload)
            tw.record_broker_ack(self.fdb, send, ok)
            published += 1
            self.sends += 1
        tw.sync_twin(self.fdb, factory_id)
        return published

    async def run(self) -> None:
        """Passes until cancelled: every ``interval`` seconds and whenever kicked."""
        self._loop = asyncio.get_running_loop()
        self._kick = asyncio.Event()
        self._kick.set()  # a first pass at once: orders a previous process left
        while True:
            try:
                await asyncio.wait_for(self._kick.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._kick.clear()
            try:
                await asyncio.to_thread(self.pass_once)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 (MongoDB away: the next pass tries again)
                logger.exception("orders: dispatcher pass failed; retrying in %.0f s", self.interval)
            self.passes += 1

    def release(self) -> None:
        """Give up this process's leases (a clean stop: another process takes over at once)."""
        try:
            with self._pass_lock:  # after a pass still running in its worker thread
                for factory_id in tw.factories_with_work(self.fdb):
                    tw.release_factory(self.fdb, factory_id, self.owner)
        except Exception:  # noqa: BLE001 - best effort; the leases expire anyway
            logger.info("orders: could not release the dispatch leases; they expire in %.0f s", self.rules.lease_s)
