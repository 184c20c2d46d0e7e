"""The twin as a picture: the 3x3 rack as the controller reports it, the rack as
vision sees it (with a per-slot model: each slot's type and probability, the slots
that disagree with the controller outlined in red and spelled out underneath, the ones
held back while the crane moves outlined in orange), the presence per colour as vision
sees it, and a station fault in red (PNG bytes)."""
from __future__ import annotations

from factory_assets.twin.state import COLOURS, SLOTS

BGR = {"BLUE": (200, 90, 30), "RED": (40, 40, 210), "WHITE": (235, 235, 235)}
COLOUR_BGR = {"blue": BGR["BLUE"], "red": BGR["RED"], "white": BGR["WHITE"]}


TRANSIT_BGR = (36, 165, 245)  # orange: in transit, not a discrepancy


def _rack_grid(img, x_left: int, slots: dict, font, outline: set | None = None, probs: dict | None = None,
               transit: set | None = None) -> None:
    import cv2

    for i, slot in enumerate(SLOTS):
        r, c = divmod(i, 3)
        x0, y0 = x_left + c * 62, 28 + r * 62
        bad = outline and slot in outline
        moving = not bad and transit and slot in transit
        colour = (0, 0, 220) if bad else TRANSIT_BGR if moving else (120, 120, 120)
        cv2.rectangle(img, (x0, y0), (x0 + 56, y0 + 56), colour, 2 if bad or moving else 1)
        t = slots.get(slot)
        if t in BGR:
            cv2.circle(img, (x0 + 28, y0 + 30), 18, BGR[t], -1)
            cv2.circle(img, (x0 + 28, y0 + 30), 18, (90, 90, 90), 1)
        cv2.putText(img, slot, (x0 + 3, y0 + 12), font, 0.35, (90, 90, 90), 1, cv2.LINE_AA)
        if probs and slot in probs:
            cv2.putText(img, f"{probs[slot]:.2f}", (x0 + 26, y0 + 53), font, 0.3, (60, 60, 60), 1, cv2.LINE_AA)


def render_twin_png(doc: dict | None) -> bytes:
    import cv2
    import numpy as np

    doc = doc or {}
    observed = doc.get("observed") or {}
    delta = doc.get("delta") or {}
    seen_slots = observed.get("slots") or {}
    slot_delta = delta.get("slots") or {}
    in_transit = doc.get("in_transit") or {}
    transit_slots = (in_transit.get("slots") or {}) if in_transit.get("active") else {}
    grid_w = 200 if seen_slots else 0  # a second rack: what the camera sees per slot
    faults = [f"{name} fault (code {st.get('code')}): {st.get('description') or st.get('meaning') or ''}"
              for name, st in (((doc.get("reported") or {}).get("stations")) or {}).items() if (st or {}).get("fault")]
    notes = ([(f, (0, 0, 200)) for f in faults] + [(n.get("message", ""), (0, 0, 200)) for n in slot_delta.values()]
             + [(f"{n.get('message', '')}: in transit (crane moving)", (20, 120, 200)) for n in transit_slots.values()])[:6]
    height = 230 + 16 * len(notes)
    img = np.full((height, 420 + grid_w, 3), 250, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(img, "reported (controller)", (10, 18), font, 0.45, (60, 60, 60), 1, cv2.LINE_AA)
    reported = ((doc.get("reported") or {}).get("slots")) or {}
    _rack_grid(img, 10, reported, font, outline=set(slot_delta), transit=set(transit_slots))
    if seen_slots:
        cv2.putText(img, "seen (camera)", (210, 18), font, 0.45, (60, 60, 60), 1, cv2.LINE_AA)
        _rack_grid(img, 210, {s: (v or {}).get("type") for s, v in seen_slots.items()}, font,
                   outline=set(slot_delta), probs={s: (v or {}).get("probability", 0.0) for s, v in seen_slots.items()},
                   transit=set(transit_slots))
    x = 220 + grid_w
    cv2.putText(img, "observed (vision)", (x, 18), font, 0.45, (60, 60, 60), 1, cv2.LINE_AA)
    for i, colour in enumerate(COLOURS):
        y = 40 + i * 55
        info = observed.get(colour) or {}
        present = info.get("present")
        fill = -1 if present else 2
        cv2.circle(img, (x + 25, y + 10), 16, COLOUR_BGR[colour], fill)
        cv2.circle(img, (x + 25, y + 10), 16, (90, 90, 90), 1)
        label = f"{colour}: {'yes' if present else 'no' if present is not None else '?'}"
        if "probability" in info:
            label += f"  p={info['probability']:.2f}"
        cv2.putText(img, label, (x + 50, y + 14), font, 0.42, (30, 30, 30), 1, cv2.LINE_AA)
        if colour in delta:
            cv2.putText(img, "disagrees with controller", (x + 50, y + 30), font, 0.35, (0, 0, 200), 1, cv2.LINE_AA)
    for i, (note, colour) in enumerate(notes):
        cv2.putText(img, str(note)[:90], (10, 222 + 16 * i), font, 0.4, colour, 1, cv2.LINE_AA)
    footer = f"version {doc.get('version', 0)}"
    if observed.get("frame_ts"):
        footer += f"  frame {str(observed['frame_ts'])[:23]}  model {str(observed.get('model_version', ''))[:10]}"
    cv2.putText(img, footer, (10, height - 8), font, 0.36, (80, 80, 80), 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", img)
    return buf.tobytes()
