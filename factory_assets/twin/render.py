"""The twin as a picture: the 3x3 rack as the controller reports it, and the
presence per colour as vision sees it (PNG bytes)."""
from __future__ import annotations

from factory_assets.twin.state import COLOURS, SLOTS

BGR = {"BLUE": (200, 90, 30), "RED": (40, 40, 210), "WHITE": (235, 235, 235)}
COLOUR_BGR = {"blue": BGR["BLUE"], "red": BGR["RED"], "white": BGR["WHITE"]}


def render_twin_png(doc: dict | None) -> bytes:
    import cv2
    import numpy as np

    doc = doc or {}
    img = np.full((230, 420, 3), 250, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(img, "reported (controller)", (10, 18), font, 0.45, (60, 60, 60), 1, cv2.LINE_AA)
    slots = ((doc.get("reported") or {}).get("slots")) or {}
    for i, slot in enumerate(SLOTS):
        r, c = divmod(i, 3)
        x0, y0 = 10 + c * 62, 28 + r * 62
        cv2.rectangle(img, (x0, y0), (x0 + 56, y0 + 56), (120, 120, 120), 1)
        t = slots.get(slot)
        if t in BGR:
            cv2.circle(img, (x0 + 28, y0 + 30), 18, BGR[t], -1)
            cv2.circle(img, (x0 + 28, y0 + 30), 18, (90, 90, 90), 1)
        cv2.putText(img, slot, (x0 + 3, y0 + 12), font, 0.35, (90, 90, 90), 1, cv2.LINE_AA)
    observed = doc.get("observed") or {}
    delta = doc.get("delta") or {}
    cv2.putText(img, "observed (vision)", (220, 18), font, 0.45, (60, 60, 60), 1, cv2.LINE_AA)
    for i, colour in enumerate(COLOURS):
        y = 40 + i * 55
        info = observed.get(colour) or {}
        present = info.get("present")
        fill = -1 if present else 2
        cv2.circle(img, (245, y + 10), 16, COLOUR_BGR[colour], fill)
        cv2.circle(img, (245, y + 10), 16, (90, 90, 90), 1)
        label = f"{colour}: {'yes' if present else 'no' if present is not None else '?'}"
        if "probability" in info:
            label += f"  p={info['probability']:.2f}"
        cv2.putText(img, label, (270, y + 14), font, 0.42, (30, 30, 30), 1, cv2.LINE_AA)
        if colour in delta:
            cv2.putText(img, "disagrees with controller", (270, y + 30), font, 0.35, (0, 0, 200), 1, cv2.LINE_AA)
    footer = f"version {doc.get('version', 0)}"
    if observed.get("frame_ts"):
        footer += f"  frame {str(observed['frame_ts'])[:23]}  model {str(observed.get('model_version', ''))[:10]}"
    cv2.putText(img, footer, (10, 222), font, 0.36, (80, 80, 80), 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", img)
    return buf.tobytes()
