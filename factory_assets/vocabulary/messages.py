"""The formats of the factory's messages: timestamps, ``data:`` URLs, the stock report.

One parser for each, so a camera message is read in one place on its way in
(rather than walking up to vision for its image and down to storage for its time).
"""
from __future__ import annotations

import base64
import binascii
from datetime import datetime, timezone


class FormatError(ValueError):
    """A message field that cannot be read; ``reason`` is a short machine-readable code
    (the quarantine's reason)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def parse_ts(value) -> datetime:
    """Capture time as an aware UTC datetime: accepts datetime, ISO-8601 strings
    (``Z`` or offset; naive means UTC) and epoch seconds/milliseconds."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, bool):
        raise ValueError(f"not a timestamp: {value!r}")
    if isinstance(value, (int, float)):
        seconds = value / 1000.0 if value > 1e11 else float(value)
        return datetime.fromtimestamp(seconds, tz=timezone.utc)
    if isinstance(value, str) and value.strip():
        text = value.strip()
        if text.endswith("Z") or text.endswith("z"):
            text = text[:-1] + "+00:00"
        dt = datetime.fromisoformat(text)
        return dt.astimezone(timezone.utc) if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
    raise ValueError(f"not a timestamp: {value!r}")


def parse_data_url(value: str) -> tuple[str | None, bytes]:
    """``data:image/jpeg;base64,...`` (or bare base64) -> (declared type, bytes)."""
    declared = None
    payload = value
    if value.startswith("data:"):
        header, sep, payload = value.partition(",")
        if not sep:
            raise FormatError("bad_data_url", "data URL has no comma")
        meta = header[5:].split(";")
        declared = meta[0] or None
        if "base64" not in meta[1:]:
            raise FormatError("bad_data_url", "data URL is not base64-encoded")
    try:
        return declared, base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FormatError("bad_base64", f"invalid base64: {exc}") from exc


def stock_slots(payload: dict | None) -> dict:
    """A ``f/i/stock`` payload -> slot -> workpiece type (``"BLUE"``...; empty and unknown slots None)."""
    from factory_assets.vocabulary import SLOTS

    slots: dict = {s: None for s in SLOTS}
    for item in (payload or {}).get("stockItems") or []:
        loc = (item or {}).get("location")
        if loc not in slots:
            continue
        kind = (item.get("workpiece") or {}).get("type")
        slots[loc] = str(kind).upper() if kind else None
    return slots


def slot_colours(slots: dict) -> dict:
    """slot -> workpiece type  ->  slot -> colour (``"blue"``...) or None."""
    from factory_assets.vocabulary import TYPE_TO_COLOUR

    return {s: TYPE_TO_COLOUR.get(t) if t else None for s, t in slots.items()}


def reported_presence(slots: dict) -> dict:
    """slot -> workpiece type  ->  colour -> present anywhere in the rack."""
    from factory_assets.vocabulary import CLASSES, TYPE_TO_COLOUR

    types = {t for t in slots.values() if t}
    return {c: any(TYPE_TO_COLOUR.get(t) == c for t in types) for c in CLASSES}
