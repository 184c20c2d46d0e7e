"""The quarantine (``error_handling``): bad input kept with the reason, never dropped.

One document per distinct bad payload and source: a re-delivered or re-ingested
bad payload increments ``count`` instead of adding a document (so ``count`` is "times
seen", which a redelivery after a crash can raise; the documents are never doubled).
"""
from __future__ import annotations

import base64
import hashlib
from factory_assets.vocabulary import utcnow

PREVIEW_BYTES = 2048


def _preview(payload: bytes | str | None) -> tuple[str | None, str | None]:
    if payload is None:
        return None, None
    if isinstance(payload, str):
        return payload[:PREVIEW_BYTES], "text"
    head = payload[:PREVIEW_BYTES]
    try:
        return head.decode("utf-8"), "text"
    except UnicodeDecodeError:
        return base64.b64encode(head).decode("ascii"), "base64"


def quarantine_update(*, reason: str, message: str, source: dict, payload: bytes | str | None = None,
                      topic: str | None = None) -> tuple[str, dict]:
    """The fingerprint and the upsert (``$setOnInsert`` + ``$inc count``) recording one bad input,
    without writing it: ingesters batch these and retry the batch while the database is down."""
    raw = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else (payload or b"")
    source_key = "|".join(f"{k}={source[k]}" for k in sorted(source) if k in ("kind", "topic", "path", "url"))
    fingerprint = hashlib.sha256(reason.encode() + b"\0" + source_key.encode() + b"\0" + raw).hexdigest()
    preview, encoding = _preview(payload)
    now = utcnow()
    update = {"$setOnInsert": {"fingerprint": fingerprint, "reason": reason, "error": message,
                               "source": source, "topic": topic, "received_at": now,
                               "payload_size": len(raw), "payload_preview": preview,
                               "payload_encoding": encoding, "payload_truncated": len(raw) > PREVIEW_BYTES},
              "$set": {"last_seen_at": now}, "$inc": {"count": 1}}
    return fingerprint, update


def quarantine_many(fdb, updates: list[tuple[str, dict]]) -> None:
    """Write ``quarantine_update`` results in one ordered bulk (the same fingerprint twice counts twice)."""
    from pymongo import UpdateOne

    if updates:
        fdb.quarantine.bulk_write([UpdateOne({"fingerprint": fp}, update, upsert=True) for fp, update in updates],
                                  ordered=True)


def quarantine(fdb, *, reason: str, message: str, source: dict, payload: bytes | str | None = None,
               topic: str | None = None) -> str:
    """Record one bad input now; returns its fingerprint."""
    fingerprint, update = quarantine_update(reason=reason, message=message, source=source, payload=payload,
                                            topic=topic)
    fdb.quarantine.update_one({"fingerprint": fingerprint}, update, upsert=True)
    return fingerprint
