"""The MQTT ingester: the Fischertechnik TXT interface -> MongoDB. Nothing the broker keeps is lost.

- **Store, then acknowledge.** paho runs with ``manual_ack``: a QoS 1 message is
  acknowledged only after the batch holding it is in MongoDB (or in quarantine).
  Until then the broker keeps it and redelivers it after any disconnect or crash.
- **Camera frames are QoS 0** (the controller publishes ``i/cam`` so): never acknowledged
  and never redelivered. What holds for them: while the ingester is connected every frame
  is stored, also through database outages (they wait in memory, then in the socket and the
  broker's queue for this connection); while it is offline the broker queues them for its
  persistent session *if it is configured to* (Mosquitto ``queue_qos0_messages true``, which
  the broker ``up`` starts sets). Lost: frames inside a killed ingester (received, not yet
  stored) and in its socket at that moment, frames published while the broker is down, and
  frames beyond the broker's queue limit. docs/mqtt.md has the details and measurements.
- **The camera is switched on**: the TXT publishes no frame until ``c/cam``
  ``{"on": true, "fps": N}``. After every (re)connection and subscription the ingester
  publishes it (QoS 1, retained, so a controller that connects later gets it too) under each
  prefix, and again when that factory announces itself on ``i/broadcast`` (the controller
  does at start, until a message for it arrives: the dashboard's cue to send its
  configuration); ``camera_fps=None`` or 0 leaves the camera to others.
- **Persistent session.** A stable client id (default derived from factory and
  camera) with ``clean_session=False``: messages published while the ingester is down or
  restarting are queued by the broker and delivered when it comes back.
- **Logins, TLS, prefixes.** The broker is an :class:`~factory_assets.vocabulary.mqtt.MqttTarget`
  (``mqtt://user:password@host``, ``mqtts://``, CA and client certificate; the password may
  come from ``FACTORY_MQTT_PASSWORD``); logs show it redacted. With ``prefixes`` (a bridge or
  the cloud: ``/j1/txt/1/i/cam``) the ingester subscribes under each, strips the prefix and
  stamps each document with that prefix's factory id; ``source.topic`` keeps the full topic.
  A refused login is logged clearly (and again at most once a minute) and retried.
- **Three threads, overlapping.** paho's network thread only queues what arrives; a parser
  thread validates each message in turn (``Ingestor.prepare_mqtt``: JSON, base64, the JPEG's
  headers, the document); the writer thread stores the parsed records in batches and then
  acknowledges them. So the next batch is parsed while the database writes the one before.
- **Bounded memory, in bytes.** When the queued plus not-yet-stored payloads reach
  ``max_buffer_bytes`` (database slow or down) paho's thread blocks, so we stop reading the
  socket and the broker holds the rest.
- **Database outages of any length.** The writer thread retries the batch with
  exponential backoff until it is stored (or the ingester is stopped, in which case
  the unacknowledged QoS 1 messages are redelivered next time), logging at a sane rate.
  Only transient database errors are retried (``storage.errors.is_transient``): a message the
  database cannot or will not store (an integer over 64 bits, a lone surrogate, a
  document over 16 MiB, a write a validator refuses) is quarantined with its reason,
  at validation or by bisecting the refused batch, and the batch is acknowledged.
- **A clean stop loses no frame the broker has sent**: the ingester keeps reading while it
  stores and acknowledges what it received, then disconnects (from then on the broker
  queues for its session) and stores what arrived meanwhile.
- **Idempotent.** A redelivered message becomes the same frame identity or
  ``message_id``, so storing it again is a counted duplicate, never a second document.
  Messages received on an earlier connection are stored but not acknowledged (their
  packet ids may be reused by the broker on the new connection); the broker
  redelivers them and that copy is acknowledged.
- **Shards** (``ingest/shards.py``): ``prefixes`` are the factories this process owns and
  subscribes to, ``fleet_prefixes`` all of them (what arrives through a filter the session kept
  for a factory handed over is still attributed right); the session's filters are recorded in
  ``counters`` and one no longer owned is unsubscribed once another session holds it.
- **Each factory's clock**: the offset of its clock from ours, estimated from the messages
  stored (``ingest.clock``), is recorded in ``factory_clocks`` every few seconds.
"""
from __future__ import annotations

import collections
import json
import logging
import re
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from factory_assets.ingest.clock import ClockRecorder
from factory_assets.ingest.service import Ingestor, Prepared, retry_store
from factory_assets.ingest.shards import SessionRecords
from factory_assets.vocabulary import BROADCAST_TOPIC, CAMERA_CONTROL_TOPIC, utcnow
from factory_assets.vocabulary.mqtt import MqttTarget, TopicPrefix, match_prefix

logger = logging.getLogger(__name__)

SUBSCRIPTIONS = ("#",)  # without prefixes: i/cam, i/bme680, i/ldr, f/i/stock and any other factory topic
DEFAULT_MAX_BUFFER_BYTES = 64 * 1024 * 1024
DEFAULT_CAMERA_FPS = 2.0
REFUSAL_LOG_EVERY_S = 60.0
SESSION_TEND_EVERY_S = 30.0  # how often a session's kept filters are looked at (ingest/shards.py)
SESSION_FRESH_MIN_S = 10.0  # another session's record counts if refreshed within 3 looks (at least this)
BROADCAST_ANSWER_EVERY_S = 1.0  # at most one c/cam per factory per second in answer to i/broadcast


def parse_mqtt_url(url: str) -> tuple[str, int]:
    """Host and port of a broker URL (``vocabulary.mqtt.MqttTarget`` has the login and TLS too)."""
    target = MqttTarget.parse(url)
    return target.host, target.port


def default_client_id(factory_id: str, camera_id: str) -> str:
    """The stable MQTT client id of the ingester of one factory camera (its persistent session)."""
    raw = f"factory-assets-ingest-{factory_id}-{camera_id}"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", raw)


def camera_command(fps: float) -> bytes:
    """``c/cam`` as the controller reads it: switch the camera on at ``fps`` frames per second."""
    return json.dumps({"on": True, "fps": float(fps)}).encode()


@dataclass
class _Raw:
    """A message as paho delivered it, waiting for the parser thread."""
    topic: str  # the controller's topic (prefix stripped)
    full_topic: str  # as the broker delivered it
    payload: bytes
    mid: int
    qos: int
    connection: int  # which connection delivered it: only the current one may acknowledge
    received_at: datetime
    factory_id: str | None  # the prefix's factory, if it names one
    retained: bool
    attributed: bool  # under a factory of the fleet (or no prefixes at all): stored; else only acknowledged


@dataclass
class _Received:
    prepared: Prepared  # what the message becomes (parser thread), stored by the writer
    size: int  # payload bytes (the memory bound)
    mid: int
    qos: int
    connection: int


class MqttIngester:
    def __init__(self, ingestor: Ingestor, url: str | MqttTarget, *, client_id: str | None = None,
                 progress_every: float = 5.0, log=None, max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
                 keepalive: int = 30, stop_timeout: float = 10.0, camera_fps: float | None = DEFAULT_CAMERA_FPS,
                 prefixes=None, ca_file: str | None = None, cert_file: str | None = None,
                 key_file: str | None = None, password_env: str | None = None, fleet_prefixes=None,
                 session_records: bool = True, session_tend_every: float = SESSION_TEND_EVERY_S):
        self.ingestor = ingestor
        self.ingestor.auto_flush = False  # we flush, then acknowledge
        self.target = url if isinstance(url, MqttTarget) else MqttTarget.parse(
            url, ca_file=ca_file, cert_file=cert_file, key_file=key_file, password_env=password_env)
        self.url = self.target.redacted  # never the password
        self.host, self.port = self.target.host, self.target.port
        self._broker = f"{self.host}:{self.port}"  # source.broker of every document
        self.client_id = client_id or default_client_id(ingestor.factory_id, ingestor.camera_id)
        self.progress_every = progress_every
        del log  # accepted for old callers; records go to this module's logger
        self.max_buffer_bytes = max_buffer_bytes
        self.keepalive = keepalive
        self.stop_timeout = stop_timeout
        if camera_fps is not None and camera_fps < 0:
            raise ValueError(f"camera_fps must be > 0 (or 0/None to leave the camera alone), got {camera_fps}")
        self.camera_fps = camera_fps or None
        self.prefixes = tuple(p if isinstance(p, TopicPrefix) else TopicPrefix.parse(p) for p in (prefixes or ()))
        self.subscriptions = tuple(dict.fromkeys(p.subscription for p in self.prefixes)) or SUBSCRIPTIONS
        # the whole fleet's factories (a shard owns some, ``prefixes``): what arrives through a filter
        # this session still holds for a factory handed over is attributed to that factory (ingest/shards.py)
        fleet = tuple(p if isinstance(p, TopicPrefix) else TopicPrefix.parse(p) for p in (fleet_prefixes or ()))
        self.fleet = tuple(dict.fromkeys(self.prefixes + fleet))
        self.sessions = SessionRecords(ingestor.fdb) if session_records else None
        self._held: set[str] | None = None  # filters the session holds (the record), read after the first SUBACK
        self._unsubscribing: dict[int, str] = {}  # UNSUBSCRIBE mid -> filter
        self._unsubscribed: list[str] = []  # UNSUBACKed, not yet off the record
        self._tend_at = 0.0  # next look at the session's filters (now after a SUBACK or an UNSUBACK)
        self.session_tend_every = session_tend_every
        self._tend_failed_logged = -REFUSAL_LOG_EVERY_S
        self._unattributed_logged = -REFUSAL_LOG_EVERY_S
        self.released: list[str] = []  # filters of factories handed over, unsubscribed
        self.unattributed = 0  # messages under no factory of the fleet (a filter left from another configuration)
        self.clock = ClockRecorder(ingestor.clock)
        self._cond = threading.Condition()
        self._raw: collections.deque[_Raw] = collections.deque()  # paho -> parser
        self._parsing = False  # the parser holds a message between the two queues
        self._queue: collections.deque[_Received] = collections.deque()  # parser -> writer
        self._held_bytes = 0  # queued + taken by the writer but not yet stored
        self._taken = 0  # messages enqueued so far
        self._done = 0  # messages stored (and acknowledged when possible) so far
        self._connection = 0
        self._stopping = threading.Event()  # stop() called: the writer drains what was received
        self._disconnecting = threading.Event()  # no more waiting for memory: the connection is closing
        self._closed = threading.Event()  # disconnected: nothing more arrives, the writer ends when drained
        self._stop = threading.Event()  # the writer gives up retrying
        self._writer: threading.Thread | None = None
        self._parser: threading.Thread | None = None
        self._client = None
        self._camera_mids: set[int] = set()
        self._broadcast_answered: dict[str, float] = {}  # prefix -> when we last answered its i/broadcast
        self._refused_logged = -REFUSAL_LOG_EVERY_S
        self._failed_logged = -REFUSAL_LOG_EVERY_S
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # set on SUBACK: from then on nothing published is missed
        self.camera_switched = threading.Event()  # the broker acknowledged a c/cam command
        self.connects = 0
        self.refusals = 0  # CONNACKs refusing us (a wrong login, say)
        self.last_refusal: str | None = None
        self.connect_failures = 0  # connection attempts that failed before CONNACK (TCP, TLS)
        self.last_connect_error: str | None = None
        self.camera_commands = 0  # c/cam commands the broker acknowledged
        self.broadcast_answers = 0  # i/broadcast announcements answered with c/cam
        self.acked = 0
        self.store_failures = 0
        self.throttled = 0  # times paho's thread waited for memory (database slower than the stream)
        self.lost_on_stop = 0  # QoS 0 messages received but not stored when a stop gave up (database down)
        self.failed: BaseException | None = None  # set when the writer thread died (a bug): run_forever ends

    @property
    def held_bytes(self) -> int:
        with self._cond:
            return self._held_bytes

    # -- paho callbacks (network thread) ----------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        if reason_code.is_failure:
            self.refusals += 1
            self.last_refusal = str(reason_code)
            now = time.monotonic()
            if now - self._refused_logged >= REFUSAL_LOG_EVERY_S:
                self._refused_logged = now
                hint = (" Check the user name and password (mqtt://USER@host, the password in the URL or "
                        "FACTORY_MQTT_PASSWORD)" if any(w in str(reason_code).lower()
                                                        for w in ("password", "authori", "user")) else "")
                logger.error("MQTT broker %s refused the connection as %s: %s.%s Retrying (%d refusals so far; "
                             "next report in %.0f s)", self.url, self.client_id, reason_code, hint, self.refusals,
                             REFUSAL_LOG_EVERY_S)
            return
        with self._cond:
            self._connection += 1
        client.subscribe([(topic, 1) for topic in self.subscriptions])
        self.connects += 1
        self.connected.set()
        logger.info("MQTT connected to %s as %s (connection #%d, session present: %s)", self.url,
                    self.client_id, self.connects, bool(flags.session_present))

    def _on_connect_fail(self, client, userdata):
        # called by paho inside its ``except OSError``: the error being handled is the reason
        exc = sys.exc_info()[1]
        self.connect_failures += 1
        self.last_connect_error = f"{type(exc).__name__}: {exc}" if exc else "connection failed"
        now = time.monotonic()
        if now - self._failed_logged >= REFUSAL_LOG_EVERY_S:
            self._failed_logged = now
            logger.warning("cannot connect to MQTT broker %s: %s; retrying (%d failures so far; next report "
                           "in %.0f s)", self.url, self.last_connect_error, self.connect_failures,
                           REFUSAL_LOG_EVERY_S)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties=None):
        if any(rc.is_failure for rc in reason_codes):
            logger.error("MQTT broker %s refused the subscription to %s: %s", self.url,
                         ", ".join(self.subscriptions), ", ".join(str(rc) for rc in reason_codes))
            return
        self.subscribed.set()
        self._tend_at = 0.0  # record the filters the session now holds
        logger.info("MQTT subscribed to %s (QoS 1)", ", ".join(self.subscriptions))
        self._switch_camera_on(client)

    def _on_unsubscribe(self, client, userdata, mid, reason_codes=None, properties=None):
        with self._cond:
            topic_filter = self._unsubscribing.pop(mid, None)
            if topic_filter is None:
                return
            self._unsubscribed.append(topic_filter)  # the writer takes it off the session's record
        self._tend_at = 0.0
        logger.info("MQTT unsubscribed from %s: its factory is another session's now", topic_filter)

    def _switch_camera_on(self, client, prefixes=None) -> None:
        """``c/cam`` under each prefix (default: all), after every subscription (so after every
        reconnection) and when a factory announces itself on ``i/broadcast``."""
        if not self.camera_fps:
            return
        prefixes = prefixes or self.prefixes or (TopicPrefix(),)
        for topic in dict.fromkeys(p.full(CAMERA_CONTROL_TOPIC) for p in prefixes):
            info = client.publish(topic, camera_command(self.camera_fps), qos=1, retain=True)
            with self._cond:
                self._camera_mids.add(info.mid)
        logger.info("asked the camera for %g frames/s (c/cam%s)", self.camera_fps,
                    f" under {', '.join(p.prefix or '(no prefix)' for p in prefixes)}" if self.prefixes else "")

    def _answer_broadcast(self, client, prefix: TopicPrefix) -> None:
        now = time.monotonic()
        if now - self._broadcast_answered.get(prefix.prefix, -BROADCAST_ANSWER_EVERY_S) < BROADCAST_ANSWER_EVERY_S:
            return
        self._broadcast_answered[prefix.prefix] = now
        self.broadcast_answers += 1
        self._switch_camera_on(client, (prefix,))

    def _on_publish(self, client, userdata, mid, reason_code=None, properties=None):
        with self._cond:
            if mid not in self._camera_mids:
                return
            self._camera_mids.discard(mid)
        self.camera_commands += 1
        self.camera_switched.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None):
        with self._cond:
            self._connection += 1  # what this connection delivered can no longer be acknowledged
        self.connected.clear()
        self.subscribed.clear()
        if not self._stopping.is_set():
            logger.warning("MQTT disconnected from %s (%s); reconnecting", self.url, reason_code)

    def _on_message(self, client, userdata, msg):
        received_at = utcnow()
        payload = bytes(msg.payload)
        matched = match_prefix(self.fleet, msg.topic) if self.fleet else None
        topic, factory_id = (matched[1], matched[0].factory_id) if matched else (msg.topic, None)
        if (topic == BROADCAST_TOPIC and self.camera_fps and not msg.retain
                and (matched[0] in self.prefixes if matched else not self.prefixes)):
            self._answer_broadcast(client, matched[0] if matched else TopicPrefix())
        attributed = not self.fleet or matched is not None
        if not attributed:
            self._unattributed(msg.topic)
        with self._cond:
            # Bounded memory: wait for the writer to store; meanwhile paho reads nothing more and
            # the broker keeps the rest. One message larger than the limit still passes alone.
            waited = False
            while (self._held_bytes and self._held_bytes + len(payload) > self.max_buffer_bytes
                   and not self._disconnecting.is_set()):
                if not waited:
                    self.throttled += 1
                    waited = True
                self._cond.wait(0.5)
            # kept also while stopping: a QoS 0 frame is not sent again
            self._raw.append(_Raw(topic, msg.topic, payload, msg.mid, msg.qos, self._connection, received_at,
                                  factory_id, bool(msg.retain), attributed))
            self._held_bytes += len(payload)
            self._taken += 1
            self._cond.notify_all()

    def _unattributed(self, topic: str) -> None:
        self.unattributed += 1
        now = time.monotonic()
        if now - self._unattributed_logged >= REFUSAL_LOG_EVERY_S:
            self._unattributed_logged = now
            logger.info("ignoring %s: under none of the factories %s (a subscription this session kept from another "
                        "configuration; it is dropped once no factory is under it); %d such messages so far", topic,
                        ", ".join(p.prefix for p in self.fleet), self.unattributed)

    # -- writer thread -------------------------------------------------------------
    def _tend_session(self) -> None:
        """Record the filters the session holds; let go of those of factories another session
        holds now (or no factory of the fleet is under). At most every 30 s, and after every
        SUBACK and UNSUBACK. A database error is logged and retried next time."""
        now = time.monotonic()
        if self.sessions is None or not self.subscribed.is_set() or now < self._tend_at:
            return
        self._tend_at = now + self.session_tend_every
        try:
            if self._held is None:
                self._held = self.sessions.held(self.client_id)
            self._held |= set(self.subscriptions)
            with self._cond:
                released, self._unsubscribed = self._unsubscribed, []
                leaving = set(self._unsubscribing.values())
            self._held -= set(released)
            self.released += released
            fleet_filters = {p.subscription for p in self.fleet} | set(self.subscriptions)
            for topic_filter in sorted(self._held - set(self.subscriptions) - leaving):
                if topic_filter in fleet_filters and not self.sessions.held_elsewhere(
                        self.client_id, topic_filter, max(3 * self.session_tend_every, SESSION_FRESH_MIN_S)):
                    continue  # its factory's new shard has not subscribed yet: keep receiving (and storing) it
                client = self._client
                with self._cond:  # held while paho may answer: the UNSUBACK finds its mid
                    rc, mid = client.unsubscribe(topic_filter) if client is not None else (None, None)
                    if mid is not None and not rc:
                        self._unsubscribing[mid] = topic_filter
            self.sessions.record(self.client_id, self._held)
        except Exception as exc:  # noqa: BLE001 - bookkeeping: the messages keep flowing meanwhile
            if now - self._tend_failed_logged >= REFUSAL_LOG_EVERY_S:
                self._tend_failed_logged = now
                logger.warning("cannot record or tidy this session's subscriptions (%s: %s); retrying in %.0f s",
                               type(exc).__name__, str(exc)[:200], self.session_tend_every)

    # -- parser thread -------------------------------------------------------------
    def _parse_loop(self):
        """Validate what paho delivered, in order, into the writer's queue. Its own thread: paho's keeps
        reading the socket at once (a frame in our memory survives a broker restart, one in the socket
        may not) and the parsing of the next batch overlaps the database's write of the one before."""
        try:
            while True:
                with self._cond:
                    while not self._raw and not self._closed.is_set():
                        self._cond.wait(0.1)
                    if not self._raw:
                        return  # disconnected and everything parsed
                    raw = self._raw.popleft()
                    self._parsing = True
                prepared = Prepared() if not raw.attributed else self.ingestor.prepare_mqtt(
                    raw.topic, raw.payload, {"kind": "mqtt", "topic": raw.full_topic, "broker": self._broker},
                    received_at=raw.received_at, factory_id=raw.factory_id, retained=raw.retained)
                with self._cond:
                    self._queue.append(_Received(prepared, len(raw.payload), raw.mid, raw.qos, raw.connection))
                    self._parsing = False
                    self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - a dead parser would silently stop storing
            self.failed = exc
            logger.exception("the MQTT parser failed; stopping (unacknowledged messages are redelivered)")

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
            self._tend_session()
            batch = self._take_batch()
            if not batch:
                if self._closed.is_set():
                    with self._cond:
                        if not self._queue and not self._raw and not self._parsing:
                            break
                    if self._parser is not None and not self._parser.is_alive() and not self._queue:
                        break  # the parser died (a bug): what it did not parse stays unacknowledged
                continue
            for item in batch:
                self.ingestor.add_prepared(item.prepared)
            if not self._store():
                self._give_up(batch)
                break  # stopped while the database was down: these stay unacknowledged
            self._acknowledge(batch)
            self.clock.record_due(self.ingestor.fdb, logger)
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

        return retry_store(self.ingestor.flush, stop=self._stop, on_failure=failed,
                           pending=lambda: self.ingestor.pending)

    def _give_up(self, batch: list[_Received]) -> None:
        with self._cond:
            left = batch + list(self._queue) + list(self._raw)
        qos0 = sum(1 for item in left if item.qos == 0)
        self.lost_on_stop += qos0
        logger.warning("stopping with %d records not stored (database unavailable): the broker redelivers the "
                       "%d QoS 1 messages among them; %d QoS 0 messages (camera frames) are lost",
                       self.ingestor.pending, len(left) - qos0, qos0)

    def _acknowledge(self, batch: list[_Received]) -> None:
        with self._cond:
            connection = self._connection
        client = self._client
        for item in batch:
            if item.qos > 0 and item.connection == connection and client is not None:
                client.ack(item.mid, item.qos)
                self.acked += 1
        with self._cond:
            self._held_bytes -= sum(item.size for item in batch)
            self._done += len(batch)
            self._cond.notify_all()

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> "MqttIngester":
        import paho.mqtt.client as mqtt

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             clean_session=False, protocol=mqtt.MQTTv311, manual_ack=True)
        self.target.configure(client)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_unsubscribe = self._on_unsubscribe
        client.reconnect_delay_set(min_delay=0.1, max_delay=2)
        self._client = client
        self._parser = threading.Thread(target=self._parse_loop, name="mqtt-parser", daemon=True)
        self._parser.start()
        self._writer = threading.Thread(target=self._write_loop, name="mqtt-writer", daemon=True)
        self._writer.start()
        client.connect_async(self.host, self.port, keepalive=self.keepalive)
        client.loop_start()
        logger.info("MQTT ingester for %s as %s: subscribing to %s%s", self.url, self.client_id,
                    ", ".join(self.subscriptions),
                    f", camera at {self.camera_fps:g} frames/s" if self.camera_fps else ", camera left alone")
        return self

    def stop(self) -> dict:
        """Store and acknowledge what was received (still reading meanwhile: QoS 0 frames are not
        sent again), disconnect (the broker queues what follows for our session), then store what
        arrived in between. Gives up after ``stop_timeout`` per step when the database is down:
        the QoS 1 messages not stored are redelivered next time, QoS 0 ones are lost (logged)."""
        self._stopping.set()
        with self._cond:
            target = self._taken
            self._cond.notify_all()
        if self._writer is not None:
            with self._cond:
                self._cond.wait_for(lambda: self._done >= target or not self._writer.is_alive(),
                                    self.stop_timeout)
        self._disconnecting.set()
        with self._cond:
            self._cond.notify_all()
        if self._client is not None:
            self._client.disconnect()  # after the acknowledgements, so they are sent first
            self._client.loop_stop()  # no message arrives after this
        self._closed.set()
        if self._writer is not None:
            self._writer.join(timeout=self.stop_timeout)
            if self._writer.is_alive():
                self._stop.set()
                self._writer.join(timeout=30)
        if self._parser is not None:
            self._parser.join(timeout=30)
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
