"""Reading the simulated camera's pictures and the controller's messages in the simulator tests."""
from __future__ import annotations

import base64

import cv2
import numpy as np

from factory_assets.simulation.render import SLOTS, slot_box


def read_slot(img: np.ndarray, slot: str) -> str | None:
    """What a slot of a picture holds, from the colour where a disc would lie (mean hue,
    saturation, and brightness against the empty space above it in the same slot)."""
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV).astype(np.float32)
    x0, y0, x1, y1 = slot_box(slot)
    cx = (x0 + x1) // 2
    disc = hsv[y1 - 14:y1 - 4, cx - 12:cx + 12].reshape(-1, 3)
    above = hsv[y0 + 4:y0 + 16, cx - 12:cx + 12].reshape(-1, 3)
    h = np.radians(disc[:, 0] * 2)
    hue = (np.degrees(np.arctan2(np.sin(h).mean(), np.cos(h).mean())) % 360) / 2  # OpenCV hue, 0..180
    sat = disc[:, 1].mean()
    brighter = disc[:, 2].mean() / max(above[:, 2].mean(), 1.0)
    if sat > 120 and 90 <= hue <= 130:
        return "BLUE"
    if sat > 120 and (hue >= 165 or hue <= 10):
        return "RED"
    if sat < 60 and brighter > 1.4:
        return "WHITE"
    return None


def read_stock(img: np.ndarray) -> dict[str, str | None]:
    return {slot: read_slot(img, slot) for slot in SLOTS}


def decode(jpeg: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, "not a decodable JPEG"
    return img


def jpeg_of(camera_message: dict) -> bytes:
    prefix = "data:image/jpeg;base64,"
    assert camera_message["data"].startswith(prefix)
    return base64.b64decode(camera_message["data"][len(prefix):])


def shows(camera_message: dict) -> dict[str, str | None]:
    """The rack a camera message's picture shows."""
    return read_stock(decode(jpeg_of(camera_message)))


def stock_of(stock_message: dict) -> dict[str, str | None]:
    return {it["location"]: (it["workpiece"]["type"] if it["workpiece"] else None)
            for it in stock_message["stockItems"]}
