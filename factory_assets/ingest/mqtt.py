"""The MQTT ingester: the Fischertechnik TXT interface -> MongoDB.

paho's network thread only enqueues; one writer thread validates and stores in
batches, so a slow database never stalls the broker connection. paho reconnects
after a broker restart (and we re-subscribe in ``on_connect``); a bad message is
quarantined and the loop goes on.
"""
from __future__ import annotations

import queue
import threading
import time
import uuid
from urllib.parse import urlparse

from factory_assets.ingest.service import Ingestor

SUBSCRIPTIONS = ("#",)  # i/cam, i/bme680, i/ldr, f/i/stock and any other factory topic


def parse_mqtt_url(url: str) -> tuple[str, int]:
    parsed = urlparse(url if "://" in url else f"mqtt://{url}")
    if parsed.scheme not in ("mqtt", "tcp"):
        raise ValueError(f"unsupported MQTT URL scheme {parsed.scheme!r} (use mqtt://host:port)")
    return parsed.hostname or "127.0.0.1", parsed.port or 1883


class MqttIngester:
    def __init__(self, ingestor: Ingestor, url: str, *, client_id: str | None = None,
                 progress_every: float = 5.0, log=print):
        self.ingestor = ingestor
        self.url = url
        self.host, self.port = parse_mqtt_url(url)
        self.client_id = client_id or f"factory-assets-ingest-{uuid.uuid4().hex[:8]}"
        self.progress_every = progress_every
        self.log = log
        self._queue: queue.Queue = queue.Queue(maxsize=10_000)
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self._client = None
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # set on SUBACK: from then on nothing published is missed
        self.connects = 0

    # -- paho callbacks (network thread) ----------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        if reason_code.is_failure:
            self.log(f"MQTT connect to {self.host}:{self.port} refused: {reason_code}")
            return
        client.subscribe([(topic, 1) for topic in SUBSCRIPTIONS])
        self.connects += 1
        self.connected.set()
        self.log(f"MQTT connected to {self.host}:{self.port} (connection #{self.connects})")

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties=None):
        if not any(rc.is_failure for rc in reason_codes):
            self.subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None):
        self.connected.clear()
        self.subscribed.clear()
        if not self._stop.is_set():
            self.log(f"MQTT disconnected ({reason_code}); reconnecting")

    def _on_message(self, client, userdata, msg):
        self._queue.put((msg.topic, bytes(msg.payload), time.monotonic()))

    # -- writer thread -------------------------------------------------------------
    def _write_loop(self):
        last_progress = time.monotonic()
        while not (self._stop.is_set() and self._queue.empty()):
            try:
                topic, payload, _ = self._queue.get(timeout=0.05)
            except queue.Empty:
                self._flush()
                continue
            try:
                self.ingestor.handle_mqtt(topic, payload, {"kind": "mqtt", "topic": topic,
                                                           "broker": f"{self.host}:{self.port}"})
            except Exception as exc:  # never die on one message (e.g. database hiccup)
                self.log(f"error handling message on {topic}: {exc!r}")
            if self._queue.empty() or self.ingestor.pending >= self.ingestor.batch_size:
                self._flush()
            if self.progress_every and time.monotonic() - last_progress >= self.progress_every:
                self.log(self.ingestor.stats.line())
                last_progress = time.monotonic()
        self._flush()

    def _flush(self):
        for attempt in range(30):
            try:
                self.ingestor.flush()
                return
            except Exception as exc:  # database unreachable: keep the batch and retry
                self.log(f"store failed ({exc!r}); retrying")
                time.sleep(min(0.2 * (attempt + 1), 2.0))

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> "MqttIngester":
        import paho.mqtt.client as mqtt

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.reconnect_delay_set(min_delay=0.1, max_delay=2)
        self._client = client
        self._writer = threading.Thread(target=self._write_loop, name="mqtt-writer", daemon=True)
        self._writer.start()
        client.connect_async(self.host, self.port, keepalive=30)
        client.loop_start()
        return self

    def stop(self) -> dict:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
        self._stop.set()
        if self._writer is not None:
            self._writer.join(timeout=30)
        return self.ingestor.stats.summary()

    def run_forever(self, duration: float | None = None) -> dict:
        self.start()
        deadline = time.monotonic() + duration if duration else None
        try:
            while deadline is None or time.monotonic() < deadline:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
        return self.stop()
