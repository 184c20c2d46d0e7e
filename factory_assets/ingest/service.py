"""Validate incoming camera frames and factory messages, store them, quarantine the rest.

Transport-agnostic: the MQTT, folder and video ingesters all feed an ``Ingestor``.
Not thread-safe by design: each ingester drives it from one writer thread and
the inserts are batched (``insert_many``) for throughput.

Store, then forget: frames, factory messages and quarantine records stay in memory
until their write succeeded, so a failed ``flush`` (database down) can simply be
called again; what was already written is not stored twice (the frame identity,
``message_id`` and quarantine ``fingerprint`` indexes).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime

from factory_assets import config
from factory_assets.storage.frames import FrameSequence, build_frame, insert_frames
from factory_assets.storage.quarantine import quarantine_many, quarantine_update
from factory_assets.vision.decode import inspect_image
from factory_assets.vocabulary import (CAMERA_TOPIC, SENSOR_TOPICS, STOCK_TOPIC, FormatError, parse_data_url,
                                     parse_ts, utcnow)


logger = logging.getLogger(__name__)

QUARANTINE_LOG_EVERY_S = 30.0


class BadMessage(FormatError):
    """A message that cannot be stored as it is; ``reason`` names the quarantine reason."""


@dataclass
class IngestStats:
    frames: int = 0
    duplicates: int = 0
    messages: int = 0
    quarantined: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    reasons: dict = field(default_factory=dict)

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.frames / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        return (f"frames={self.frames} ({self.rate():.1f}/s) duplicates={self.duplicates} "
                f"messages={self.messages} quarantined={self.quarantined}")

    def summary(self) -> dict:
        return {"frames": self.frames, "duplicates": self.duplicates, "messages": self.messages,
                "quarantined": self.quarantined, "bytes": self.bytes,
                "seconds": round(time.monotonic() - self.started, 3),
                "frames_per_second": round(self.rate(), 2), "quarantine_reasons": dict(self.reasons)}


def _json_object(payload: bytes) -> dict:
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadMessage("malformed_json", f"payload is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise BadMessage("malformed_json", f"payload is JSON {type(doc).__name__}, expected an object")
    return doc


def _ts(doc: dict) -> datetime:
    if "ts" not in doc or doc["ts"] in (None, ""):
        raise BadMessage("missing_field", "message has no 'ts'")
    try:
        return parse_ts(doc["ts"])
    except (ValueError, OverflowError, OSError) as exc:
        raise BadMessage("bad_timestamp", f"'ts' is not a timestamp: {exc}") from exc


def journaled(fdb):
    """The same database with journaled writes (``j=True``): "stored" must survive the database
    being killed, since the message is then acknowledged and the broker forgets it. (SecantusDB,
    like MongoDB, loses the last unjournaled ``w:1`` writes on SIGKILL.)"""
    from dataclasses import replace

    from pymongo.write_concern import WriteConcern

    db = getattr(fdb, "db", None)
    if db is None or not hasattr(db, "with_options"):
        return fdb
    return replace(fdb, db=db.with_options(write_concern=WriteConcern(w=1, j=True)))


class Ingestor:
    def __init__(self, fdb, *, camera_id: str = "txt-cam", factory_id: str = "factory-1",
                 max_image_bytes: int | None = None, batch_size: int = 64, on_stored=None,
                 auto_flush: bool = True):
        self.fdb = journaled(fdb)
        self.camera_id = camera_id
        self.factory_id = factory_id
        self.max_image_bytes = max_image_bytes or config.max_image_bytes()
        self.batch_size = batch_size
        self.sequence = FrameSequence(self.fdb)
        self.stats = IngestStats()
        self._frames: list[dict] = []
        self._messages: dict[str, list[dict]] = {}
        self._quarantine: list[tuple[str, dict, str]] = []  # (fingerprint, upsert, reason), not yet written
        # False: the caller flushes (the MQTT writer acknowledges messages only after its own flush)
        self.auto_flush = auto_flush
        self.on_stored = on_stored  # callback(list of stored frame docs), for benchmarks and live updates
        self._quarantine_logged: dict[str, tuple[float, int]] = {}  # reason -> (last WARNING, quiet since)

    # -- entry points ------------------------------------------------------------
    def handle_mqtt(self, topic: str, payload: bytes, source: dict | None = None) -> None:
        """Validate one message and queue what it becomes (frame, message or quarantine record)."""
        source = source or {"kind": "mqtt", "topic": topic}
        try:
            if len(payload) > self.max_image_bytes * 4 // 3 + 1024:
                raise BadMessage("oversize", f"payload of {len(payload)} bytes is over the limit")
            if topic == CAMERA_TOPIC:
                self._camera_message(payload, source)
            else:
                self._factory_message(topic, payload, source)
        except FormatError as exc:
            self.reject(exc.reason, str(exc), source, payload, topic)
        except Exception as exc:  # noqa: BLE001 - a bug in validation must not drop the message
            logger.exception("unexpected error validating a message on %s", topic)
            self.reject("ingest_error", f"{type(exc).__name__}: {exc}", source, payload, topic)
        self._maybe_flush()

    def add_image(self, image: bytes, *, ts: datetime, source: dict, declared_type: str | None = None,
                  camera_id: str | None = None, factory_id: str | None = None, raw=None) -> bool:
        """Queue one image for storage; False (and quarantined) when it is bad."""
        ok = self._add_image(image, ts=ts, source=source, declared_type=declared_type, camera_id=camera_id,
                             factory_id=factory_id, raw=raw)
        self._maybe_flush()
        return ok

    def _add_image(self, image: bytes, *, ts: datetime, source: dict, declared_type: str | None = None,
                   camera_id: str | None = None, factory_id: str | None = None, raw=None) -> bool:
        try:
            info = inspect_image(image, declared_type, self.max_image_bytes)
        except FormatError as exc:
            self.reject(exc.reason, str(exc), source, raw if raw is not None else image, source.get("topic"))
            return False
        self._frames.append(build_frame(image, ts=ts, camera_id=camera_id or self.camera_id,
                                        factory_id=factory_id or self.factory_id,
                                        content_type=info.content_type, width=info.width,
                                        height=info.height, source=source))
        self.stats.bytes += len(image)
        return True

    def reject(self, reason: str, message: str, source: dict, payload, topic: str | None = None) -> None:
        """Queue a quarantine record; it is written (and counted) by the next ``flush``."""
        fingerprint, update = quarantine_update(reason=reason, message=message, source=source,
                                                payload=payload, topic=topic)
        self._quarantine.append((fingerprint, update, reason))
        # A stream of bad messages is one WARNING per reason every QUARANTINE_LOG_EVERY_S (the rest DEBUG)
        now = time.monotonic()
        last, quiet = self._quarantine_logged.get(reason, (-1e9, 0))
        if now - last >= QUARANTINE_LOG_EVERY_S:
            more = f" (and {quiet} more since the last report)" if quiet else ""
            logger.warning("quarantined (%s): %s [%s]%s", reason, message, source, more)
            self._quarantine_logged[reason] = (now, 0)
        else:
            logger.debug("quarantined (%s): %s [%s]", reason, message, source)
            self._quarantine_logged[reason] = (last, quiet + 1)

    def _maybe_flush(self) -> None:
        if self.auto_flush and self.pending >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        """Write everything pending. Each part leaves memory only once written: after an
        exception (database down) calling ``flush`` again retries exactly what is left."""
        if self._frames:
            docs = self._frames
            result = insert_frames(self.fdb, docs, self.sequence)  # re-sequences on every call
            self._frames = []
            self.stats.frames += result.inserted
            self.stats.duplicates += result.duplicates
            if self.on_stored and result.inserted:
                stored = set(result.inserted_ids)
                self.on_stored([d for d in docs if d.get("_id") in stored])
        for coll in list(self._messages):
            if self._messages[coll]:
                self._insert_messages(coll, self._messages[coll])
            del self._messages[coll]
        if self._quarantine:
            quarantine_many(self.fdb, [(fp, update) for fp, update, _ in self._quarantine])
            for _, _, reason in self._quarantine:
                self.stats.quarantined += 1
                self.stats.reasons[reason] = self.stats.reasons.get(reason, 0) + 1
            self._quarantine = []

    @property
    def pending(self) -> int:
        return len(self._frames) + sum(len(v) for v in self._messages.values()) + len(self._quarantine)

    # -- message kinds -----------------------------------------------------------
    def _camera_message(self, payload: bytes, source: dict) -> None:
        doc = _json_object(payload)
        ts = _ts(doc)
        data = doc.get("data")
        if not data:
            raise BadMessage("missing_field", "camera message has no 'data'")
        if not isinstance(data, str):
            raise BadMessage("bad_data_url", "'data' must be a data URL string")
        declared, image = parse_data_url(data)
        self._add_image(image, ts=ts, source=source, declared_type=declared,
                        camera_id=doc.get("camera_id"), factory_id=doc.get("factory_id"), raw=payload)

    def _factory_message(self, topic: str, payload: bytes, source: dict) -> None:
        doc = _json_object(payload)
        ts = _ts(doc)
        if topic == STOCK_TOPIC:
            items = doc.get("stockItems")
            if not isinstance(items, list):
                raise BadMessage("missing_field", "stock message has no 'stockItems' list")
            for item in items:
                if not isinstance(item, dict) or "location" not in item:
                    raise BadMessage("missing_field", "a stock item has no 'location'")
        coll = "sensors" if topic in SENSOR_TOPICS else "mqtt"
        message = {"topic": topic, "ts": ts, "received_at": utcnow(),
                   "factory_id": doc.get("factory_id", self.factory_id), "source": source,
                   "payload": doc,
                   # one document per message: a redelivery carries the same bytes
                   "message_id": hashlib.sha256(topic.encode() + b"\0" + payload).hexdigest()}
        self._messages.setdefault(coll, []).append(message)

    def _insert_messages(self, coll: str, docs: list[dict]) -> None:
        from pymongo.errors import BulkWriteError

        try:
            getattr(self.fdb, coll).insert_many(docs, ordered=False)
            stored = len(docs)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") != 11000 for e in errors):
                raise
            stored = len(docs) - len(errors)
        self.stats.messages += stored
