"""The stock classes the warehouse model predicts, in the one order used everywhere
(manifest columns, probability columns, thresholds)."""
from __future__ import annotations

CLASSES: tuple[str, ...] = ("blue", "red", "white")
