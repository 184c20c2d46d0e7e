"""Small builders shared by tests: real JPEG bytes and TXT-style MQTT payloads."""
from __future__ import annotations

import base64
import json

import cv2
import numpy as np


def jpeg_bytes(color=(40, 90, 200), size=(320, 240), seed: int = 0, quality: int = 85) -> bytes:
    rng = np.random.default_rng(seed)
    img = np.full((size[1], size[0], 3), color, np.uint8)
    img = np.clip(img.astype(np.int16) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def png_bytes(color=(200, 200, 200), size=(64, 48)) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((size[1], size[0], 3), color, np.uint8))
    assert ok
    return buf.tobytes()


def cam_payload(image: bytes, ts: str = "2026-11-23T10:00:00.123Z", content_type: str = "image/jpeg") -> bytes:
    data = f"data:{content_type};base64," + base64.b64encode(image).decode("ascii")
    return json.dumps({"ts": ts, "data": data}).encode()


def stock_payload(ts: str, slots: dict[str, str | None]) -> bytes:
    items = [{"workpiece": ({"id": f"wp-{loc}", "type": t, "state": "RAW"} if t else None), "location": loc}
             for loc, t in slots.items()]
    return json.dumps({"ts": ts, "stockItems": items}).encode()


def predict_once(predictor, image: bytes, content_type: str = "image/jpeg"):
    """One prediction from a predictor made for it; its connections are closed afterwards."""
    with predictor:
        return predictor.predict(image, content_type)
