"""The stock classes the warehouse model predicts, in the one order used everywhere
(manifest columns, probability columns, thresholds)."""
from __future__ import annotations

CLASSES: tuple[str, ...] = ("blue", "red", "white")

# The rack's nine slots as the controller names them (rows A..C top to bottom,
# columns 1..3 left to right) and the four states a per-slot model tells apart.
SLOTS: tuple[str, ...] = tuple(f"{row}{col}" for row in "ABC" for col in "123")
SLOT_STATES: tuple[str, ...] = ("empty",) + CLASSES
TYPE_TO_STATE: dict[str, int] = {"BLUE": 1, "RED": 2, "WHITE": 3}
STATE_TO_TYPE: dict[int, str | None] = {0: None, 1: "BLUE", 2: "RED", 3: "WHITE"}
