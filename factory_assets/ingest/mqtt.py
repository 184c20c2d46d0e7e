"""The MQTT ingester: the Fischertechnik TXT interface -> MongoDB. No frame lost, ever.

- **Store, then acknowledge.** paho runs with ``manual_ack``: a QoS 1 message is
  acknowledged only after the batch holding it is in MongoDB (or in quarantine).
  Until then the broker keeps it and redelivers it after any disconnect or crash.
- **Persistent session.** A stable client id (default derived from factory and
  camera) with ``clean_session=False``: frames published while the ingester is down
  or restarting are queued by the broker and delivered when it comes back
  (Mosquitto does this; amqtt 0.12 does not, see ``ingest/broker.py``).
- **Bounded memory, in bytes.** paho's network thread only enqueues; when the
  queued plus not-yet-stored payloads reach ``max_buffer_bytes`` (database slow or
  down) it blocks, so we stop reading the socket and the broker holds the rest.
- **Database outages of any length.** The writer thread retries the batch with
  exponential backoff until it is stored (or the ingester is stopped, in which case
  the unacknowledged messages are redelivered next time), logging at a sane rate.
  Only transient database errors are retried (``storage.errors.is_transient``): a message the
  database cannot or will not store (an integer over 64 bits, a lone surrogate, a
  document over 16 MiB, a write a validator refuses) is quarantined with its reason,
  at validation or by bisecting the refused batch, and the batch is acknowledged.
  Retrying it would never succeed and would hold every later message back.
- **Idempotent.** A redelivered message becomes the same frame identity or
  ``message_id``, so storing it again is a counted duplicate, never a second document.
  Messages received on an earlier connection are stored but not acknowledged (their
  packet ids may be reused by the broker on the new connection); the broker
  redelivers them and that copy is acknowledged.
"""
from __future__ import annotations

import collections
import logging
import re
import threading
import time
from dataclasses import dataclass

from factory_assets.ingest.service import Ingestor, retry_store
from factory_assets.vocabulary.mqtt import MqttTarget

logger = logging.getLogger(__name__)

SUBSCRIPTIONS = ("#",)  # i/cam, i/bme680, i/ldr, f/i/stock and any other factory topic
DEFAULT_MAX_BUFFER_BYTES = 64 * 1024 * 1024


def parse_mqtt_url(url: str) -> tuple[str, int]:
    """Host and port of a broker URL (``vocabulary.mqtt.MqttTarget`` has the login and TLS too)."""
    target = MqttTarget.parse(url)
    return target.host, target.port


def default_client_id(factory_id: str, camera_id: str) -> str:
    """The stable MQTT client id of the ingester of one factory camera (its persistent session)."""
    raw = f"factory-assets-ingest-{factory_id}-{camera_id}"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", raw)


@dataclass
class _Received:
    topic: str
    payload: bytes
    mid: int
    qos: int
    connection: int  # which connection delivered it: only the current one may acknowledge


class MqttIngester:
    def __init__(self, ingestor: Ingestor, url: str, *, client_id: str | None = None,
                 progress_every: float = 5.0, log=None, max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
                 keepalive: int = 30, stop_timeout: float = 10.0):
        self.ingestor = ingestor
        self.ingestor.auto_flush = False  # we flush, then acknowledge
        self.url = url
        self.host, self.port = parse_mqtt_url(url)
        self.client_id = client_id or default_client_id(ingestor.factory_id, ingestor.camera_id)
        self.progress_every = progress_every
        del log  # accepted for old callers; records go to this module's logger
        self.max_buffer_bytes = max_buffer_bytes
        self.keepalive = keepalive
        self.stop_timeout = stop_timeout
        self._cond = threading.Condition()
        self._queue: collections.deque[_Received] = collections.deque()
        self._held_bytes = 0  # queued + taken by the writer but not yet stored
        self._connection = 0
        self._stopping = threading.Event()  # no new messages taken; the writer drains
        self._stop = threading.Event()  # the writer gives up retrying
        self._writer: threading.Thread | None = None
        self._client = None
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # set on SUBACK: from then on nothing published is missed
        self.connects = 0
        self.acked = 0
        self.store_failures = 0
        self.throttled = 0  # times paho's thread waited for memory (database slower than the stream)
        self.failed: BaseException | None = None  # set when the writer thread died (a bug): run_forever ends

    @property
    def held_bytes(self) -> int:
        with self._cond:
            return self._held_bytes

    # -- paho callbacks (network thread) ----------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        if reason_code.is_failure:
            logger.warning("MQTT connect to %s:%s refused: %s", self.host, self.port, reason_code)
            return
        with self._cond:
            self._connection += 1
        client.subscribe([(topic, 1) for topic in SUBSCRIPTIONS])
        self.connects += 1
        self.connected.set()
        logger.info("MQTT connected to %s:%s as %s (connection #%d, session present: %s)", self.host,
                    self.port, self.client_id, self.connects, bool(flags.session_present))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties=None):
        if not any(rc.is_failure for rc in reason_codes):
            self.subscribed.set()
            logger.info("MQTT subscribed to %s (QoS 1)", ", ".join(SUBSCRIPTIONS))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None):
        self.connected.clear()
        self.subscribed.clear()
        if not self._stopping.is_set():
            logger.warning("MQTT disconnected (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, msg):
        payload = bytes(msg.payload)
        with self._cond:
            # Bounded memory: wait for the writer to store; meanwhile paho reads nothing more and
            # the broker keeps the rest. One message larger than the limit still passes alone.
            waited = False
            while (self._held_bytes and self._held_bytes + len(payload) > self.max_buffer_bytes
                   and not self._stopping.is_set()):
                if not waited:
                    self.throttled += 1
                    waited = True
                self._cond.wait(0.5)
            if self._stopping.is_set():
                return  # not acknowledged: the broker redelivers it to the next session
            self._queue.append(_Received(msg.topic, payload, msg.mid, msg.qos, self._connection))
            self._held_bytes += len(payload)
            self._cond.notify_all()

    # -- writer thread -------------------------------------------------------------
    def _take_batch(self) -> list[_Received]:
        with self._cond:
            if not self._queue:
                self._cond.wait(0.1)
            batch = []
            while self._queue and len(batch) < self.ingestor.batch_size:
                batch.append(self._queue.popleft())
            return batch

    def _write_loop(self):
        try:
            self._write_batches()
        except BaseException as exc:  # noqa: BLE001 - a dead writer would silently stop all acknowledgements
            self.failed = exc
            logger.exception("the MQTT writer failed; stopping (unacknowledged messages are redelivered)")

    def _write_batches(self):
        last_progress = time.monotonic()
        while True:
            batch = self._take_batch()
            if not batch:
                if self._stopping.is_set():
                    with self._cond:
                        if not self._queue:
                            break
                continue
            for item in batch:
                self.ingestor.handle_mqtt(item.topic, item.payload,
                                          {"kind": "mqtt", "topic": item.topic, "broker": f"{self.host}:{self.port}"})
            if not self._store():
                break  # stopped while the database was down: these stay unacknowledged
            self._acknowledge(batch)
            if self.progress_every and time.monotonic() - last_progress >= self.progress_every:
                logger.info("%s", self.ingestor.stats.line())
                last_progress = time.monotonic()

    def _store(self) -> bool:
        """Flush the ingestor until it succeeds (backoff, forever) or the ingester is stopped.

        ``flush`` quarantines what the database refuses, so what is retried here is the database
        being unavailable (transient errors) or refusing every write; nothing else is retried."""
        def failed(exc):
            self.store_failures += 1
            self.ingestor.stats.store_failures += 1

        if retry_store(self.ingestor.flush, stop=self._stop, on_failure=failed,
                       pending=lambda: self.ingestor.pending):
            return True
        logger.warning("stopping with %d records not stored; the broker redelivers their messages",
                       self.ingestor.pending)
        return False

    def _acknowledge(self, batch: list[_Received]) -> None:
        with self._cond:
            connection = self._connection
        client = self._client
        for item in batch:
            if item.qos > 0 and item.connection == connection and client is not None:
                client.ack(item.mid, item.qos)
                self.acked += 1
        with self._cond:
            self._held_bytes -= sum(len(item.payload) for item in batch)
            self._cond.notify_all()

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> "MqttIngester":
        import paho.mqtt.client as mqtt

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             clean_session=False, protocol=mqtt.MQTTv311, manual_ack=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.reconnect_delay_set(min_delay=0.1, max_delay=2)
        self._client = client
        self._writer = threading.Thread(target=self._write_loop, name="mqtt-writer", daemon=True)
        self._writer.start()
        client.connect_async(self.host, self.port, keepalive=self.keepalive)
        client.loop_start()
        return self

    def stop(self) -> dict:
        """Take no new message, store and acknowledge what was taken (giving up after
        ``stop_timeout`` when the database is down), then disconnect."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        if self._writer is not None:
            self._writer.join(timeout=self.stop_timeout)
            if self._writer.is_alive():
                self._stop.set()
                self._writer.join(timeout=30)
        if self._client is not None:
            self._client.disconnect()  # queued after the acknowledgements, so they are sent first
            self._client.loop_stop()
        return self.ingestor.stats.summary()

    def run_forever(self, duration: float | None = None) -> dict:
        import signal

        self.start()
        deadline = time.monotonic() + duration if duration else None
        done = threading.Event()
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, lambda *_: done.set())
        try:
            while not done.is_set() and (deadline is None or time.monotonic() < deadline):
                if self.failed is not None:
                    break
                done.wait(0.2)
        except KeyboardInterrupt:
            pass
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return self.stop()
