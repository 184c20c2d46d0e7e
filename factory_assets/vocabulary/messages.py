"""The formats of the factory's messages: timestamps, ``data:`` URLs, the stock report,
and camera URLs as they may be shown (``redact_url``).

One parser for each, so a camera message is read in one place on its way in
(rather than walking up to vision for its image and down to storage for its time).
"""
from __future__ import annotations

import base64
import binascii
from datetime import datetime, timezone

try:  # SIMD base64: a camera frame's data URL in 4 us instead of 180 (the ingester's largest cost)
    from pybase64 import b64decode as _b64decode
except ImportError:  # the same answers, slower
    _b64decode = base64.b64decode


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
        return declared, _b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FormatError("bad_base64", f"invalid base64: {exc}") from exc


def parse_stock_report(payload) -> dict:
    """A ``f/i/stock`` payload as the ingester accepts it -> slot -> workpiece type (None when empty).

    Raises ``FormatError`` (the quarantine's reason) unless ``stockItems`` is a list of objects,
    each with a ``location`` that is one of the rack's slots (``"A1"``..``"C3"``) and a
    ``workpiece`` that is an object or null, whose ``type``, when given, is a known type
    (any case). An empty slot may be written as ``null`` (this controller), ``{}``, a
    workpiece whose ``type`` is ``""`` or ``"NONE"`` (other controller generations): all read
    as empty. Readers of stored reports (``stock_slots``) can then rely on that shape."""
    from factory_assets.vocabulary import SLOTS, TYPES
    from factory_assets.vocabulary.formats import is_empty_workpiece

    items = payload.get("stockItems") if isinstance(payload, dict) else None
    if not isinstance(items, list):
        raise FormatError("missing_field", "stock message has no 'stockItems' list")
    slots: dict = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "location" not in item:
            raise FormatError("missing_field", f"stock item {i} has no 'location'")
        loc = item["location"]
        if not isinstance(loc, str) or loc not in SLOTS:
            raise FormatError("bad_stock_item", f"stock item {i}: 'location' must be one of the rack slots "
                                                f"{SLOTS[0]}..{SLOTS[-1]}, got {_shown(loc)}")
        workpiece = item.get("workpiece")
        if workpiece is not None and not isinstance(workpiece, dict):
            raise FormatError("bad_stock_item", f"stock item {i} ({loc}): 'workpiece' must be an object or null, "
                                                f"got {_shown(workpiece)}")
        if is_empty_workpiece(workpiece):  # null, {}, type "" or "NONE": every generation's empty slot
            slots[loc] = None
            continue
        kind = workpiece.get("type")
        if not (isinstance(kind, str) and kind.upper() in TYPES):
            raise FormatError("bad_stock_item", f"stock item {i} ({loc}): workpiece 'type' must be one of "
                                                f"{', '.join(TYPES)}, got {_shown(kind)}")
        slots[loc] = kind.upper()
    return slots


def _shown(value, limit: int = 60) -> str:
    """A value for an error message: its type and a short, storable repr."""
    text = repr(value)
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(value).__name__} {text}".encode("utf-8", "backslashreplace").decode("utf-8")


def stock_slots(payload: dict | None) -> dict:
    """A ``f/i/stock`` payload -> slot -> workpiece type (``"BLUE"``...; empty and unknown slots None).

    Lenient, for stored reports of any age or origin: an item that is not an object, whose
    ``location`` is not a slot name or whose ``workpiece`` is not an object is ignored
    (the ingester quarantines such reports, see ``parse_stock_report``)."""
    from factory_assets.vocabulary import SLOTS

    slots: dict = {s: None for s in SLOTS}
    items = payload.get("stockItems") if isinstance(payload, dict) else None
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        loc = item.get("location")
        if not isinstance(loc, str) or loc not in slots:
            continue
        workpiece = item.get("workpiece")
        kind = workpiece.get("type") if isinstance(workpiece, dict) else None
        kind = str(kind).strip().upper() if kind else None
        slots[loc] = kind if kind and kind != "NONE" else None
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


def redact_url(url: str) -> str:
    """A URL or path fit for logs, errors and stored documents: credentials become ``***``.

    ``rtsp://user:pass@cam:554/live`` -> ``rtsp://***@cam:554/live``. Unlike a MongoDB URI, a
    camera's URL often carries its password unencoded, so the credentials end at the *last*
    ``@`` of the authority; when an ``@`` follows a ``/`` too (a password holding ``/``, or a
    path holding ``@``) everything up to that ``@`` is hidden: a host too many is hidden rather
    than a password shown. Anything without ``scheme://`` (a file path) is returned as it is."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest or not scheme or not all(c.isalnum() or c in "+.-" for c in scheme):
        return url
    end = len(rest)
    for mark in "/?#":
        pos = rest.find(mark)
        if pos != -1:
            end = min(end, pos)
    authority = rest[:end]
    at = authority.rfind("@") if "@" in authority else rest.rfind("@")
    return f"{scheme}://***@{rest[at + 1:]}"
