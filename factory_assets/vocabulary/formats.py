"""The controller's message formats, as rules: what each topic's payload looks like when the
Fischertechnik TXT controller sends it (facts from its public programs,
``fischertechnik/txt_training_factory``; written down here, nothing copied).

``problems(topic, payload)`` lists every way a payload departs from those rules (empty: it is
exactly what the controller would send). The simulator's output and the fixture corpus are
checked against the same rules, so neither can drift from the controller again. The ingester
is more lenient than these rules (it stores what other controller generations send too);
these rules are what *we* publish and what a real controller publishes.
"""
from __future__ import annotations

import re

from factory_assets.vocabulary import (ALERT_TOPIC, BME680_TOPIC, BROADCAST_TOPIC, CAMERA_CONTROL_TOPIC,
                                       CAMERA_TOPIC, LDR_TOPIC, NFC_TOPIC, ORDER_STATE_TOPIC, ORDER_STATES,
                                       ORDER_TOPIC, PTU_POSITION_TOPIC, SLOTS, STATION_STATE_PREFIX, STATIONS,
                                       STOCK_TOPIC, TYPES)

# ``2026-11-23T10:00:00.123Z``: UTC, milliseconds, ``Z`` (the controller's ``getnowstr``)
TS_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
WORKPIECE_STATES: tuple[str, ...] = ("RAW", "PROCESSED", "REJECTED")
# ``br`` of i/ldr: the brightness in percent as a *string* rounded to one decimal, e.g. "53.3"; the
# controller prints it with the stream's default format, so a whole value has no decimal: "53", "100"
BRIGHTNESS_PATTERN = re.compile(r"^-?\d+(\.\d)?$")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ts(payload: dict, out: list[str]) -> None:
    ts = payload.get("ts")
    if not isinstance(ts, str) or not TS_PATTERN.match(ts):
        out.append(f"'ts' must be YYYY-MM-DDTHH:MM:SS.fffZ, got {ts!r}")


def _fields(payload: dict, checks: dict, out: list[str]) -> None:
    for key, (ok, what) in checks.items():
        if key not in payload:
            out.append(f"missing '{key}'")
        elif not ok(payload[key]):
            out.append(f"'{key}' must be {what}, got {payload[key]!r}"[:200])


def station_of(topic: str) -> str | None:
    """``f/i/state/hbw`` -> ``hbw``; None for any other topic."""
    if topic.startswith(STATION_STATE_PREFIX):
        station = topic[len(STATION_STATE_PREFIX):]
        return station if station in STATIONS else None
    return None


def _workpiece(wp, where: str, out: list[str]) -> None:
    if wp is None:
        return
    if not isinstance(wp, dict):
        out.append(f"{where}: 'workpiece' must be an object or null")
        return
    if wp.get("type") not in TYPES:
        out.append(f"{where}: workpiece 'type' must be one of {', '.join(TYPES)}, got {wp.get('type')!r}")
    if wp.get("state") not in WORKPIECE_STATES:
        out.append(f"{where}: workpiece 'state' must be one of {', '.join(WORKPIECE_STATES)}, "
                   f"got {wp.get('state')!r}")
    if not isinstance(wp.get("id"), str):
        out.append(f"{where}: workpiece 'id' must be the NFC tag's UID as a string (or \"\")")


def problems(topic: str, payload) -> list[str]:
    """Every way ``payload`` (parsed JSON) departs from what the controller sends on ``topic``
    (unprefixed). Unknown topics have no rules (an empty list)."""
    if not isinstance(payload, dict):
        return [f"payload must be a JSON object, got {type(payload).__name__}"]
    out: list[str] = []
    if topic not in (CAMERA_CONTROL_TOPIC,):
        _ts(payload, out)
    if topic == CAMERA_TOPIC:
        data = payload.get("data")
        if not (isinstance(data, str) and data.startswith("data:image/jpeg;base64,")):
            out.append("'data' must be a data:image/jpeg;base64 URL")
    elif topic == STOCK_TOPIC:
        items = payload.get("stockItems")
        if not isinstance(items, list):
            out.append("'stockItems' must be a list")
        else:
            seen = [i.get("location") for i in items if isinstance(i, dict)]
            if items and sorted(seen) != sorted(SLOTS):
                out.append(f"'stockItems' must list each of the nine slots once, got {seen}")
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    out.append(f"stock item {i} must be an object")
                    continue
                _workpiece(item.get("workpiece", "missing"), f"stock item {i} ({item.get('location')})", out)
    elif topic == BME680_TOPIC:
        _fields(payload, {k: (_number, "a number") for k in ("t", "rt", "h", "rh", "p", "iaq", "gr")}
                | {"aq": (_int, "an integer 0..3")}, out)
    elif topic == LDR_TOPIC:
        _fields(payload, {"ldr": (_int, "an integer"),
                          "br": (lambda v: isinstance(v, str) and bool(BRIGHTNESS_PATTERN.match(v)),
                                 "a string rounded to one decimal, e.g. \"53.3\" or \"53\"")}, out)
    elif topic == ALERT_TOPIC:
        # data: the image data URL (id "cam") or the sensor value as a number (bme680/t, bme680/h)
        _fields(payload, {"id": (lambda v: isinstance(v, str), "a string"),
                          "data": (lambda v: isinstance(v, str) or _number(v), "a string or a number"),
                          "code": (_int, "an integer")}, out)
        if payload.get("id") == "cam" and not str(payload.get("data", "")).startswith("data:image/"):
            out.append("a camera alert's 'data' must be an image data URL")
    elif topic == PTU_POSITION_TOPIC:
        _fields(payload, {"pan": (_number, "a number"), "tilt": (_number, "a number")}, out)
    elif topic == ORDER_STATE_TOPIC:
        _fields(payload, {"state": (lambda v: v in ORDER_STATES, f"one of {', '.join(ORDER_STATES)}"),
                          "type": (lambda v: v in TYPES or v in ("", "NONE"),
                                   f"one of {', '.join(TYPES)} (NONE before the first order)")}, out)
    elif topic == ORDER_TOPIC:
        _fields(payload, {"type": (lambda v: v in TYPES, f"exactly one of {', '.join(TYPES)}")}, out)
    elif topic == CAMERA_CONTROL_TOPIC:
        _fields(payload, {"on": (lambda v: isinstance(v, bool), "true or false")}, out)
        if payload.get("on") is True:
            _fields(payload, {"fps": (lambda v: _number(v) and v > 0, "a positive number")}, out)
    elif station_of(topic):
        station = station_of(topic)
        _fields(payload, {"station": (lambda v: v == station, f"{station!r}"),
                          "code": (_int, "an integer"), "description": (lambda v: isinstance(v, str), "a string"),
                          "active": (_int, "0 or 1")}, out)
        if (station == "vgr") != ("target" in payload):
            out.append("'target' is sent by the vgr station only")
    elif topic in (BROADCAST_TOPIC, NFC_TOPIC):
        pass  # free-form beyond 'ts'
    return out


def is_empty_workpiece(workpiece) -> bool:
    """An empty slot as any controller generation writes it: ``null`` (this controller),
    ``{}``, ``{"id": "", "state": "RAW", "type": ""}`` or ``type: "NONE"``."""
    if workpiece is None:
        return True
    if not isinstance(workpiece, dict):
        return False
    kind = workpiece.get("type")
    return kind is None or (isinstance(kind, str) and kind.strip().upper() in ("", "NONE"))
