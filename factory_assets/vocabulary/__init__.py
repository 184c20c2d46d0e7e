"""The factory's vocabulary, defined once and imported by every domain.

Colours in class order, the rack's slots, workpiece types, MQTT topics, and the
formats of the messages the factory sends (timestamps, ``data:`` URLs, the
controller's ``f/i/stock`` report). Pure Python: no MongoDB, no OpenCV, no Dagster.
"""
from __future__ import annotations

from factory_assets.vocabulary.clock import day_key, parse_day, utcnow
from factory_assets.vocabulary.messages import (
    FormatError,
    parse_data_url,
    parse_ts,
    reported_presence,
    slot_colours,
    stock_slots,
)

# The stock classes the models predict, in the one order used everywhere
# (manifest columns, probability columns, thresholds, the inference response).
CLASSES: tuple[str, ...] = ("blue", "red", "white")
COLOURS = CLASSES

# The rack's nine slots as the controller names them: rows A..C top to bottom,
# columns 1..3 left to right.
SLOTS: tuple[str, ...] = tuple(f"{row}{col}" for row in "ABC" for col in "123")

# Workpiece types as the controller writes them, and how they map to colours.
TYPES: tuple[str, ...] = ("BLUE", "RED", "WHITE")
TYPE_TO_COLOUR: dict[str, str] = {"BLUE": "blue", "RED": "red", "WHITE": "white"}
COLOUR_TO_TYPE: dict[str, str] = {c: t for t, c in TYPE_TO_COLOUR.items()}

# The four states a per-slot model tells apart (index = class id).
SLOT_STATES: tuple[str, ...] = ("empty",) + CLASSES
TYPE_TO_STATE: dict[str, int] = {"BLUE": 1, "RED": 2, "WHITE": 3}
STATE_TO_TYPE: dict[int, str | None] = {0: None, 1: "BLUE", 2: "RED", 3: "WHITE"}

# MQTT topics of the Fischertechnik factory (TXT controller and cloud interface), as the
# controller's programs name them (fischertechnik/txt_training_factory, TxtMqttFactoryClient).
CAMERA_TOPIC = "i/cam"  # camera frames, published at QoS 0 and only after CAMERA_CONTROL_TOPIC
BME680_TOPIC = "i/bme680"
LDR_TOPIC = "i/ldr"
SENSOR_TOPICS: tuple[str, ...] = (BME680_TOPIC, LDR_TOPIC)
ALERT_TOPIC = "i/alert"  # {ts, id, data, code}; data is an image data URL when id is "cam"
PTU_POSITION_TOPIC = "i/ptu/pos"  # {ts, pan, tilt}
BROADCAST_TOPIC = "i/broadcast"
CAMERA_CONTROL_TOPIC = "c/cam"  # {"on": true, "fps": N}: the TXT sends no frame before it
STOCK_TOPIC = "f/i/stock"  # published *before* the crane moves (see CRANE_TRAVEL_S)
ORDER_TOPIC = "f/o/order"  # {"ts", "type"}: ship one workpiece of that type out of the warehouse
ORDER_STATE_TOPIC = "f/i/order"  # {"ts", "state", "type"}: the progress of the order in work
NFC_TOPIC = "f/i/nfc/ds"
STATION_STATE_PREFIX = "f/i/state/"  # + station: {ts, station, code, description, active[, target]}
STATIONS: tuple[str, ...] = ("hbw", "vgr", "mpo", "sld", "dsi", "dso")
STATION_NAMES: dict[str, str] = {"hbw": "high-bay warehouse", "vgr": "vacuum gripper robot",
                                 "mpo": "multi-processing station", "sld": "sorting line",
                                 "dsi": "input station", "dso": "output station"}

# Topics the controller *receives*: configuration (c/cam, c/bme680, c/ldr, c/link; without
# ts), o/ptu, and f/o/ (orders, acknowledgements). Seen on "#", they are not the factory's
# clock: the ingester stores them with ts = received_at when they carry none.
COMMAND_TOPIC_PREFIXES: tuple[str, ...] = ("c/", "o/", "f/o/")

# QoS as the controller publishes: camera frames at 0 (not retained), everything else at 1.
TOPIC_QOS: dict[str, int] = {CAMERA_TOPIC: 0}
DEFAULT_QOS = 1

# Orders: the states the controller publishes on f/i/order, in order, and its rules.
ORDER_STATES: tuple[str, ...] = ("WAITING_FOR_ORDER", "ORDERED", "IN_PROCESS", "SHIPPED")
ORDER_MAX_AGE_S = 10.0  # the controller drops an order whose ts is further than this from its clock

# The crane: the warehouse reports its new stock before the crane moves; the piece is in
# (or out of) the rack some seconds later. Unconfirmed on the real factory ("tens of seconds"):
# the simulator models a travel time per slot in this range, and frames within
# DEFAULT_SETTLE_S of a reported change are neither auto-labelled nor flagged as discrepancies.
CRANE_TRAVEL_S: tuple[float, float] = (6.0, 18.0)
DEFAULT_SETTLE_S = 25.0

# Station state codes (the controller's LED codes) and what they mean.
STATION_CODES: dict[int, str] = {0: "off", 1: "ready", 2: "busy", 3: "waiting, then ready", 4: "error",
                                 6: "waiting, then error", 7: "calibrating"}
STATION_ERROR_CODES: frozenset = frozenset({4, 6})
STATION_ERROR_CODE = 4

# Defaults naming the simulated factory and the endpoint `make run` deploys to.
DEFAULT_FACTORY_ID = "factory-1"
DEFAULT_CAMERA_ID = "txt-cam"
DEFAULT_ENDPOINT = "factory-stock"

__all__ = [
    "ALERT_TOPIC", "BME680_TOPIC", "BROADCAST_TOPIC", "CAMERA_CONTROL_TOPIC", "COMMAND_TOPIC_PREFIXES",
    "CRANE_TRAVEL_S", "DEFAULT_QOS",
    "DEFAULT_SETTLE_S", "LDR_TOPIC", "NFC_TOPIC", "ORDER_MAX_AGE_S", "ORDER_STATES", "ORDER_STATE_TOPIC",
    "PTU_POSITION_TOPIC", "STATIONS", "STATION_CODES", "STATION_ERROR_CODE", "STATION_ERROR_CODES", "STATION_NAMES",
    "STATION_STATE_PREFIX", "TOPIC_QOS",
    "CAMERA_TOPIC", "CLASSES", "COLOURS", "COLOUR_TO_TYPE", "DEFAULT_CAMERA_ID", "DEFAULT_ENDPOINT",
    "DEFAULT_FACTORY_ID", "FormatError", "ORDER_TOPIC", "SENSOR_TOPICS", "SLOTS", "SLOT_STATES",
    "STATE_TO_TYPE", "STOCK_TOPIC", "TYPES", "TYPE_TO_COLOUR", "TYPE_TO_STATE", "parse_data_url",
    "day_key", "parse_day", "parse_ts", "reported_presence", "slot_colours", "stock_slots", "utcnow",
]
