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

# MQTT topics of the Fischertechnik factory (TXT controller and cloud interface).
CAMERA_TOPIC = "i/cam"
SENSOR_TOPICS: tuple[str, ...] = ("i/bme680", "i/ldr")
STOCK_TOPIC = "f/i/stock"
ORDER_TOPIC = "f/o/order"

# Defaults naming the simulated factory and the endpoint `make run` deploys to.
DEFAULT_FACTORY_ID = "factory-1"
DEFAULT_CAMERA_ID = "txt-cam"
DEFAULT_ENDPOINT = "factory-stock"

__all__ = [
    "CAMERA_TOPIC", "CLASSES", "COLOURS", "COLOUR_TO_TYPE", "DEFAULT_CAMERA_ID", "DEFAULT_ENDPOINT",
    "DEFAULT_FACTORY_ID", "FormatError", "ORDER_TOPIC", "SENSOR_TOPICS", "SLOTS", "SLOT_STATES",
    "STATE_TO_TYPE", "STOCK_TOPIC", "TYPES", "TYPE_TO_COLOUR", "TYPE_TO_STATE", "parse_data_url",
    "day_key", "parse_day", "parse_ts", "reported_presence", "slot_colours", "stock_slots", "utcnow",
]
