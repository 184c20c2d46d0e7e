"""Validate incoming camera frames and factory messages, store them, quarantine the rest.

Transport-agnostic: the MQTT, folder and video ingesters all feed an ``Ingestor``.
Not thread-safe by design: each ingester drives it from one writer thread and
the inserts are batched (``insert_many``) for throughput.

Store, then forget: frames, factory messages and quarantine records stay in memory
until their write succeeded, so a failed ``flush`` (database down) can simply be
called again; what was already written is not stored twice (the frame identity,
``message_id`` and quarantine ``fingerprint`` indexes).

Storable or quarantined, never stuck: validation encodes each document as BSON (an
integer over 64 bits, a lone surrogate, a document over 16 MiB cannot be) and
quarantines what fails with reason ``unstorable``. A database error is retried unless it
refuses the document itself (``storage.errors``: a validator, its size, its field names).
The server names the documents of a batch it refuses; each is quarantined with the error
and the rest of the batch is stored and counted once. A batch the driver cannot send at
all is bisected down to the record it fails on.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from factory_assets import config
from factory_assets.ingest.clock import ClockEstimator
from factory_assets.storage.errors import DUPLICATE_KEY, is_transient
from factory_assets.storage.factories import FactoryNotes
from factory_assets.storage.frames import FrameSequence, build_frame, insert_frames, settle_earlier_blocks
from factory_assets.storage.quarantine import quarantine_many, quarantine_update
from factory_assets.ingest.images import inspect_frame
from factory_assets.vocabulary import (CAMERA_TOPIC, COMMAND_TOPIC_PREFIXES, SENSOR_TOPICS, STOCK_TOPIC,
                                       FormatError, parse_data_url, parse_ts, utcnow)
from factory_assets.vocabulary.messages import parse_stock_report


logger = logging.getLogger(__name__)

QUARANTINE_LOG_EVERY_S = 30.0
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024  # MongoDB's BSON document limit (the server's maxBsonObjectSize)
# A factory message (JSON, no image: stock reports, sensors, states) is a few hundred bytes. 1 MiB
# bounds what parsing one costs (JSON may grow ~6x as Python objects and BSON) far below 16 MiB.
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
MAX_ID_CHARS = 128  # camera_id / factory_id carried by a message
MAX_BACKOFF_S = 5.0
FAILURE_LOG_EVERY_S = 30.0

class WriteRefused(Exception):
    """One document's error in a batch the server answered (its ``writeErrors`` entry)."""

    def __init__(self, error: dict):
        super().__init__(f"{error.get('errmsg', 'refused')} (code {error.get('code')})")


class BadMessage(FormatError):
    """A message that cannot be stored as it is; ``reason`` names the quarantine reason."""


class DatabaseRefused(RuntimeError):
    """The database refused a write that is not transient and then refused the quarantine record
    too: it is refusing writes, not one record. Nothing left memory; ``flush`` again later."""


def retry_store(store, *, stop: threading.Event | None = None, on_failure=None, pending=lambda: 0,
                what: str = "store") -> bool:
    """Call ``store()`` until it returns: transient database errors (``is_transient``) and
    ``DatabaseRefused`` are retried with exponential backoff (0.1 s doubling to 5 s), logged at
    most every 30 s; anything else propagates. False when ``stop`` was set while retrying."""
    attempt, failing_since, last_log = 0, None, -FAILURE_LOG_EVERY_S
    while True:
        try:
            store()
        except Exception as exc:  # noqa: BLE001 - classified below
            if not (is_transient(exc) or isinstance(exc, DatabaseRefused)):
                raise
            if on_failure is not None:
                on_failure(exc)
            now = time.monotonic()
            if failing_since is None:
                failing_since = now
            if now - last_log >= FAILURE_LOG_EVERY_S:
                logger.warning("%s failed (%s: %s); %d records kept in memory, retrying with backoff "
                               "(next report in %.0f s)", what, type(exc).__name__, str(exc)[:200], pending(),
                               FAILURE_LOG_EVERY_S)
                last_log = now
            delay = min(0.1 * 2 ** attempt, MAX_BACKOFF_S)
            if stop is not None:
                if stop.wait(delay):
                    return False
            else:
                time.sleep(delay)
            attempt += 1
            continue
        if failing_since is not None:
            logger.info("%s recovered after %.1fs and %d attempts", what, time.monotonic() - failing_since,
                        attempt + 1)
        return True


def storable_text(text: str) -> str:
    """``text`` with what UTF-8 cannot hold (lone surrogates, e.g. from undecodable file names)
    spelled out as ``\\udcff`` escapes, so it can go into a BSON string."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _storable(value):
    """Strings made storable, in dicts and lists too (sources and topics of quarantine records)."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, dict):
        return {storable_text(str(k)): _storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_storable(v) for v in value]
    return value


def check_storable(doc: dict, what: str) -> int:
    """Raise ``BadMessage("unstorable")`` unless ``doc`` encodes as BSON within MongoDB's limit;
    its size in bytes."""
    import bson

    try:
        size = len(bson.encode(doc))
    except (bson.errors.InvalidDocument, OverflowError, UnicodeEncodeError, TypeError, ValueError) as exc:
        raise BadMessage("unstorable", f"{what} cannot be stored in MongoDB: {type(exc).__name__}: "
                                       f"{storable_text(str(exc))[:300]}") from exc
    if size > MAX_DOCUMENT_BYTES:
        raise BadMessage("unstorable", f"{what} is {size} bytes as BSON, over MongoDB's {MAX_DOCUMENT_BYTES} "
                                       "byte document limit")
    return size


def check_frame_storable(frame: dict) -> None:
    """``check_storable`` for a frame document without copying its image into BSON: the rest is
    encoded (where a string could fail) and the image's length added (the frame is inserted, and
    encoded, once more by the driver)."""
    size = check_storable({**frame, "image": b""}, "the frame document") + len(frame["image"])  # exactly
    if size > MAX_DOCUMENT_BYTES:
        raise BadMessage("unstorable", f"the frame document is {size} bytes as BSON, over MongoDB's "
                                       f"{MAX_DOCUMENT_BYTES} byte document limit")


def _short_id(doc: dict, key: str) -> str | None:
    """``camera_id`` / ``factory_id`` as a message may give it: absent, null or empty (the
    ingester's own is used) or a short string."""
    value = doc.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_ID_CHARS:
        shown = type(value).__name__ if not isinstance(value, str) else f"{len(value)} characters"
        raise BadMessage("bad_id", f"'{key}' must be a string of at most {MAX_ID_CHARS} characters, got {shown}")
    return value


@dataclass
class IngestStats:
    frames: int = 0
    duplicates: int = 0
    messages: int = 0
    quarantined: int = 0
    bytes: int = 0
    store_failures: int = 0  # failed attempts to write (database down), each retried
    frame_batches: int = 0  # frame inserts (frames / frame_batches: how full the batches were)
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
                "quarantined": self.quarantined, "bytes": self.bytes, "store_failures": self.store_failures,
                "frame_batches": self.frame_batches,
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


# Stands in for a camera message's data URL while the rest is parsed: random, so no payload can hold it
_DATA_URL_STAND_IN = uuid.uuid4().hex.encode()
_CONTROL = re.compile(r"[\x00-\x1f]")


def _camera_json(payload: bytes) -> tuple[dict, tuple[str | None, bytes] | None]:
    """``_json_object`` of a camera message and, when it could be read apart, its data URL
    decoded (``parse_data_url``), without running the JSON scanner over the image.

    The data URL (``"data:image/jpeg;base64,..."``: 40 of a camera message's 45 KB) holds no
    quote, no backslash and no control character, so its JSON string ends at the next quote and
    is its own text. The message is parsed with a stand-in for it; when ``data`` holds the
    stand-in, that text was the value of ``data``: its base64 is decoded (which checks every
    character of it) and its header checked for control characters. Anything else (escapes, another
    key holding ``"data:``, a repeated key, bad base64, not UTF-8...) is parsed whole, as before,
    and gives the same document or the same error, in the same order."""
    start = payload.find(b'"data:')
    end = payload.find(b'"', start + 1) if start >= 0 else -1
    if end > 0 and payload.find(b"\\", start, end) < 0:
        try:
            doc = json.loads(payload[:start + 1] + _DATA_URL_STAND_IN + payload[end:])
            if isinstance(doc, dict) and doc.get("data") == _DATA_URL_STAND_IN.decode():
                url = payload[start + 1:end].decode("ascii")
                header = url.partition(",")[0]
                if not _CONTROL.search(header):
                    decoded = parse_data_url(url)  # base64 validated: letters, digits, + / = only
                    doc["data"] = url
                    return doc, decoded
        except (UnicodeDecodeError, json.JSONDecodeError, FormatError):
            pass
    return _json_object(payload), None


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


@dataclass
class Prepared:
    """What one message or image becomes, decided without touching the database or the
    ingestor's state (``Ingestor.prepare_mqtt`` may run on another thread): a frame document,
    a factory message (its collection, document and raw payload), or a quarantine record."""
    frame: dict | None = None
    message: tuple[str, dict, bytes] | None = None  # (collection, document, raw payload)
    quarantine: tuple[str, dict, str] | None = None  # (fingerprint, upsert, reason)
    image_bytes: int = 0
    clock: tuple[str, datetime, datetime] | None = None  # (factory, ts, received_at): a clock sample

    @property
    def ok(self) -> bool:
        return self.quarantine is None


class Ingestor:
    def __init__(self, fdb, *, camera_id: str = "txt-cam", factory_id: str = "factory-1",
                 max_image_bytes: int | None = None, batch_size: int = 64, on_stored=None,
                 auto_flush: bool = True, max_message_bytes: int | None = None):
        self.fdb = journaled(fdb)
        self.camera_id = camera_id
        self.factory_id = factory_id
        self.max_image_bytes = max_image_bytes or config.max_image_bytes()
        self.max_message_bytes = max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES  # any topic but i/cam
        self.batch_size = batch_size
        self.sequence = FrameSequence(self.fdb)
        self.stats = IngestStats()
        self._frames: list[dict] = []
        self._messages: dict[str, list[tuple[dict, bytes]]] = {}  # collection -> (document, raw payload)
        self._quarantine: list[tuple[str, dict, str]] = []  # (fingerprint, upsert, reason), not yet written
        # False: the caller flushes (the MQTT writer acknowledges messages only after its own flush)
        self.auto_flush = auto_flush
        self.on_stored = on_stored  # callback(list of stored frame docs), for benchmarks and live updates
        self._quarantine_logged: dict[str, tuple[float, int]] = {}  # reason -> (last WARNING, quiet since)
        # each factory's clock offset, from the (ts, received_at) of the messages it stores
        self.clock = ClockEstimator()
        # the fleet's ``factories`` collection: a write when a factory, camera or prefix is new to this
        # process, else a factory's last_seen at most every minute (storage.factories)
        self.factory_notes = FactoryNotes()

    # -- entry points ------------------------------------------------------------
    def handle_mqtt(self, topic: str, payload: bytes, source: dict | None = None, *,
                    received_at: datetime | None = None, factory_id: str | None = None,
                    retained: bool = False) -> None:
        """Validate one message and queue what it becomes (frame, message or quarantine record).

        ``topic`` is the controller's topic (a bridge's prefix already stripped; the full topic
        is ``source["topic"]``). ``factory_id``: the factory this message comes from (its
        prefix's), over one the payload names and the ingester's own. ``received_at``: when it
        arrived (default now). ``retained``: the broker replayed a retained message, which
        says nothing about the factory's clock now."""
        self.add_prepared(self.prepare_mqtt(topic, payload, source, received_at=received_at, factory_id=factory_id,
                                            retained=retained))
        self._maybe_flush()

    def prepare_mqtt(self, topic: str, payload: bytes, source: dict | None = None, *,
                     received_at: datetime | None = None, factory_id: str | None = None,
                     retained: bool = False) -> Prepared:
        """``handle_mqtt``'s validation alone: what the message becomes, for ``add_prepared``.
        Reads only the ingestor's settings, so it may run on another thread than the writer
        (the MQTT ingester prepares on paho's thread while its writer stores the batch before)."""
        source = source or {"kind": "mqtt", "topic": topic}
        received_at = received_at or utcnow()
        try:
            if topic == CAMERA_TOPIC:
                if len(payload) > self.max_image_bytes * 4 // 3 + 1024:  # base64 of the largest image
                    raise BadMessage("oversize", f"payload of {len(payload)} bytes is over the limit")
                return self._camera_message(payload, source, received_at=received_at, factory_id=factory_id,
                                            clock=not retained)
            if len(payload) > self.max_message_bytes:
                raise BadMessage("oversize", f"payload of {len(payload)} bytes is over the "
                                             f"{self.max_message_bytes} byte limit of a factory message")
            return self._factory_message(topic, payload, source, received_at=received_at, factory_id=factory_id,
                                         clock=not retained)
        except FormatError as exc:
            return Prepared(quarantine=self._quarantine_record(exc.reason, str(exc), source, payload, topic))
        except Exception as exc:  # noqa: BLE001 - a bug in validation must not drop the message
            logger.exception("unexpected error validating a message on %s", topic)
            return Prepared(quarantine=self._quarantine_record("ingest_error", f"{type(exc).__name__}: {exc}",
                                                               source, payload, topic))

    def add_prepared(self, prepared: Prepared) -> None:
        """Queue what ``prepare_mqtt`` (or ``prepare_image``) decided; written by the next ``flush``."""
        if prepared.frame is not None:
            self._frames.append(prepared.frame)
            self.stats.bytes += prepared.image_bytes
        elif prepared.message is not None:
            coll, message, payload = prepared.message
            self._messages.setdefault(coll, []).append((message, payload))
        elif prepared.quarantine is not None:
            self._quarantine.append(prepared.quarantine)
            self._log_quarantined(prepared.quarantine[2], prepared.quarantine)
        if prepared.clock is not None:
            self.clock.add(*prepared.clock)

    def add_image(self, image: bytes, *, ts: datetime, source: dict, declared_type: str | None = None,
                  camera_id: str | None = None, factory_id: str | None = None, raw=None) -> bool:
        """Queue one image for storage; False (and quarantined) when it is bad."""
        ok = self._add_image(image, ts=ts, source=source, declared_type=declared_type, camera_id=camera_id,
                             factory_id=factory_id, raw=raw)
        self._maybe_flush()
        return ok

    def _add_image(self, image: bytes, *, ts: datetime, source: dict, declared_type: str | None = None,
                   camera_id: str | None = None, factory_id: str | None = None, raw=None,
                   received_at: datetime | None = None) -> bool:
        prepared = self.prepare_image(image, ts=ts, source=source, declared_type=declared_type, camera_id=camera_id,
                                      factory_id=factory_id, raw=raw, received_at=received_at)
        self.add_prepared(prepared)
        return prepared.ok

    def prepare_image(self, image: bytes, *, ts: datetime, source: dict, declared_type: str | None = None,
                      camera_id: str | None = None, factory_id: str | None = None, raw=None,
                      received_at: datetime | None = None) -> Prepared:
        """The frame document of one image, or its quarantine record (thread-safe, see ``prepare_mqtt``)."""
        try:
            info = inspect_frame(image, declared_type, self.max_image_bytes)
            frame = build_frame(image, ts=ts, camera_id=camera_id or self.camera_id,
                                factory_id=factory_id or self.factory_id, content_type=info.content_type,
                                width=info.width, height=info.height, source=source, received_at=received_at)
            check_frame_storable(frame)
        except FormatError as exc:
            return Prepared(quarantine=self._quarantine_record(exc.reason, str(exc), source,
                                                               raw if raw is not None else image, source.get("topic")))
        return Prepared(frame=frame, image_bytes=len(image))

    def reject(self, reason: str, message: str, source: dict, payload, topic: str | None = None) -> None:
        """Queue a quarantine record; it is written (and counted) by the next ``flush``."""
        record = self._quarantine_record(reason, message, source, payload, topic)
        self._quarantine.append(record)
        self._log_quarantined(reason, record)

    @staticmethod
    def _quarantine_record(reason: str, message: str, source: dict, payload, topic) -> tuple[str, dict, str]:
        # what the message could not be stored for may also spoil its quarantine record (a lone
        # surrogate quoted in the error, a file name that is not UTF-8): those strings are escaped
        message, source, topic = storable_text(str(message)), _storable(source), _storable(topic)
        if isinstance(payload, str):
            payload = storable_text(payload)
        fingerprint, update = quarantine_update(reason=reason, message=message, source=source,
                                                payload=payload, topic=topic)
        return fingerprint, update, reason

    def _log_quarantined(self, reason: str, record: tuple[str, dict, str]) -> None:
        fields = record[1]["$setOnInsert"]
        message, source = fields["error"], fields["source"]
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
        """Write everything pending. Each record leaves memory only once written (or quarantined):
        after an exception calling ``flush`` again retries exactly what is left.

        Raises only a transient database error (``is_transient``: database down) or
        ``DatabaseRefused``. A write the database refuses for any other reason is bisected to
        the record(s) it refuses; each is quarantined with reason ``unstorable`` and the error,
        the rest is stored."""
        self._note_factories()
        self._write_isolating(self._frames, self._insert_frames, self._frame_refused)
        if self.sequence.unsettled:
            # blocks of refused attempts: every frame they held is now stored or quarantined and
            # none of their writes is in flight (a refusal is a final answer), so readers may pass
            try:
                settle_earlier_blocks(self.sequence)
            except Exception as exc:
                if is_transient(exc):
                    raise
                raise DatabaseRefused(f"cannot settle sequence blocks: {type(exc).__name__}: {str(exc)[:200]}") \
                    from exc
        for coll in list(self._messages):
            self._write_isolating(self._messages[coll], lambda part, c=coll: self._insert_messages(c, part),
                                  self._message_refused)
            del self._messages[coll]
        self._write_isolating(self._quarantine, self._write_quarantine, self._quarantine_refused)

    def _note_factories(self) -> None:
        """Record the factories of the pending batch in ``factories`` before it is stored (so a
        factory is listed by the time any of its documents can be read): cheap, see FactoryNotes.
        A refused write is logged and passed (the batch matters more); a transient error propagates."""
        seen: dict = {}
        for doc in self._frames:
            self._seen(seen, doc, doc.get("camera_id"), CAMERA_TOPIC)
        for docs in self._messages.values():
            for doc, _ in docs:
                self._seen(seen, doc, None, doc.get("topic"))
        if not seen:
            return
        try:
            self.factory_notes.record(self.fdb, seen)
        except Exception as exc:  # noqa: BLE001 - classified: transient propagates
            if is_transient(exc):
                raise
            logger.warning("factories: could not record %s (%s: %s)", ", ".join(sorted(seen)),
                           type(exc).__name__, str(exc)[:200])

    @staticmethod
    def _seen(seen: dict, doc: dict, camera_id, topic) -> None:
        fid = doc.get("factory_id")
        if not isinstance(fid, str):
            return
        at, cameras, prefixes = seen.get(fid) or (doc.get("received_at"), set(), set())
        received = doc.get("received_at")
        if isinstance(received, datetime) and (not isinstance(at, datetime) or received > at):
            at = received
        if isinstance(camera_id, str):
            cameras.add(camera_id)
        wire = (doc.get("source") or {}).get("topic") if isinstance(doc.get("source"), dict) else None
        if isinstance(wire, str) and isinstance(topic, str) and wire.endswith(topic) and len(wire) > len(topic):
            prefixes.add(wire[:-len(topic)])
        seen[fid] = (at if isinstance(at, datetime) else None, cameras, prefixes)

    @property
    def pending(self) -> int:
        return len(self._frames) + sum(len(v) for v in self._messages.values()) + len(self._quarantine)

    # -- writing, and finding the record a refused write was refused for -----------
    @staticmethod
    def _write_isolating(pending: list, write, refused) -> None:
        """``write`` the records of ``pending`` (removing each written one from it); on an error
        that is not transient, bisect: a single record still refused goes to ``refused(record, exc)``.
        Transient errors propagate with the unwritten records still in ``pending``."""
        size = len(pending)
        while pending:
            part = pending[:size]
            try:
                write(part)
            except Exception as exc:  # noqa: BLE001 - classified: transient propagates, the rest is isolated
                if is_transient(exc):
                    raise
                if len(part) > 1:
                    size = (len(part) + 1) // 2
                    continue
                try:
                    write(part)  # refused alone, twice in a row: it is this record, not a passing fault
                except Exception as again:  # noqa: BLE001 - classified as above
                    if is_transient(again):
                        raise
                    refused(part[0], again)  # raises when even the quarantine refuses: the record stays
                del pending[:1]
            else:
                del pending[:len(part)]
            size = len(pending)

    def _insert_frames(self, docs: list[dict]) -> None:
        result = insert_frames(self.fdb, docs, self.sequence)  # re-sequences on every call
        self.stats.frame_batches += 1
        self.stats.frames += result.inserted
        self.stats.duplicates += result.duplicates
        if self.on_stored and result.inserted:
            stored = set(result.inserted_ids)
            try:
                self.on_stored([d for d in docs if d.get("_id") in stored])
            except Exception:  # noqa: BLE001 - a listener's failure must not un-store the frames
                logger.exception("on_stored callback failed")
        for doc, error in result.refused:
            # What the write stored is counted above; if this quarantine write fails, a retry of
            # the batch finds those frames as duplicates and this one refused again.
            doc.pop("_id", None)
            self._frame_refused(doc, WriteRefused(error))

    def _insert_messages(self, coll: str, part: list[tuple[dict, bytes]]) -> None:
        from pymongo.errors import BulkWriteError

        docs = [doc for doc, _ in part]
        refused = []
        try:
            getattr(self.fdb, coll).insert_many(docs, ordered=False)
            stored = len(docs)
        except BulkWriteError as exc:
            if is_transient(exc):
                raise
            errors = exc.details.get("writeErrors", [])
            refused = [e for e in errors if e.get("code") != DUPLICATE_KEY]
            stored = len(docs) - len(errors)
        self.stats.messages += stored
        for error in refused:  # the server answered for each document: the rest is stored
            doc, raw = part[error["index"]]
            doc.pop("_id", None)
            self._message_refused((doc, raw), WriteRefused(error))

    def _write_quarantine(self, part: list[tuple[str, dict, str]]) -> None:
        quarantine_many(self.fdb, [(fp, update) for fp, update, _ in part])
        for _, _, reason in part:
            self.stats.quarantined += 1
            self.stats.reasons[reason] = self.stats.reasons.get(reason, 0) + 1

    def _quarantine_now(self, *, message: str, source: dict, payload, topic, refused: Exception) -> None:
        """Write the ``unstorable`` record of a refused record at once. That write succeeding is
        what shows the database refuses this record rather than every write; when it fails, the
        record stays pending (``DatabaseRefused``, or the transient error)."""
        record = self._quarantine_record("unstorable", message, source, payload, topic)
        try:
            self._write_quarantine([record])
        except Exception as exc:
            if is_transient(exc):
                raise
            raise DatabaseRefused(f"the database refused a record ({type(refused).__name__}: "
                                  f"{str(refused)[:200]}) and its quarantine record ({type(exc).__name__}: "
                                  f"{str(exc)[:200]})") from exc
        self._log_quarantined("unstorable", record)

    def _frame_refused(self, doc: dict, exc: Exception) -> None:
        source = doc.get("source") or {}
        self._quarantine_now(message=f"the database refused the frame: {type(exc).__name__}: {str(exc)[:500]}",
                             source=source, payload=bytes(doc.get("image") or b""), topic=source.get("topic"),
                             refused=exc)

    def _message_refused(self, item: tuple[dict, bytes], exc: Exception) -> None:
        doc, raw = item
        self._quarantine_now(message=f"the database refused the message: {type(exc).__name__}: {str(exc)[:500]}",
                             source=doc.get("source") or {}, payload=raw, topic=doc.get("topic"), refused=exc)

    def _quarantine_refused(self, record: tuple[str, dict, str], exc: Exception) -> None:
        # escaped strings should make this unreachable; still, a quarantine record the database
        # refuses is replaced by one holding just its reason, rather than holding the batch back
        fingerprint, update, reason = record
        fields = update.get("$setOnInsert", {})
        plain_fp, plain = quarantine_update(
            reason=reason, message=f"quarantine record refused ({type(exc).__name__}); original error: "
                                   f"{storable_text(str(fields.get('error')))[:300]}",
            source={"kind": storable_text(str((fields.get("source") or {}).get("kind")))},
            payload=fingerprint.encode(), topic=None)
        try:
            self._write_quarantine([(plain_fp, plain, reason)])
        except Exception as again:
            if is_transient(again):
                raise
            raise DatabaseRefused(f"the database refuses quarantine records: {type(again).__name__}: "
                                  f"{str(again)[:200]}") from again

    # -- message kinds -----------------------------------------------------------
    def _camera_message(self, payload: bytes, source: dict, *, received_at: datetime,
                        factory_id: str | None = None, clock: bool = True) -> Prepared:
        doc, decoded = _camera_json(payload)
        ts = _ts(doc)
        camera_id, named_factory = _short_id(doc, "camera_id"), _short_id(doc, "factory_id")
        data = doc.get("data")
        if not data:
            raise BadMessage("missing_field", "camera message has no 'data'")
        if not isinstance(data, str):
            raise BadMessage("bad_data_url", "'data' must be a data URL string")
        declared, image = decoded or parse_data_url(data)
        del doc, data, decoded  # the base64 text: a frame's bytes are held once, as the image
        factory = factory_id or named_factory or self.factory_id
        prepared = self.prepare_image(image, ts=ts, source=source, declared_type=declared, camera_id=camera_id,
                                      factory_id=factory, raw=payload, received_at=received_at)
        if prepared.ok and clock:
            prepared.clock = (factory, ts, received_at)
        return prepared

    def _factory_message(self, topic: str, payload: bytes, source: dict, *, received_at: datetime,
                         factory_id: str | None = None, clock: bool = True) -> Prepared:
        doc = _json_object(payload)
        command = is_command_topic(topic)
        if command and doc.get("ts") in (None, ""):
            # c/cam and the other configuration commands carry no ts: stored at their arrival
            ts, ts_source = received_at, "received_at"
        else:
            ts, ts_source = _ts(doc), None
        factory = factory_id or _short_id(doc, "factory_id") or self.factory_id
        if topic == STOCK_TOPIC:
            parse_stock_report(doc)  # FormatError -> quarantined with its reason
        coll = "sensors" if topic in SENSOR_TOPICS else "mqtt"
        wire_topic = source.get("topic") or topic  # with its prefix: two factories' messages stay apart
        message = {"topic": topic, "ts": ts, "received_at": received_at, "factory_id": factory,
                   "source": source, "payload": doc,
                   # one document per message: a redelivery carries the same bytes
                   "message_id": hashlib.sha256(wire_topic.encode() + b"\0" + payload).hexdigest()}
        if ts_source:
            message["ts_source"] = ts_source
        check_storable(message, f"the {topic} message")
        # commands are stamped by their sender, not by the factory's clock
        return Prepared(message=(coll, message, payload),
                        clock=(factory, ts, received_at) if clock and not command else None)


def is_command_topic(topic: str) -> bool:
    """A topic the controller receives (``c/cam``, ``f/o/order``...), not one it publishes."""
    return topic.startswith(COMMAND_TOPIC_PREFIXES)
