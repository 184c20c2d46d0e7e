"""Small pictures for people: thumbnails and grids as PNG bytes (no I/O)."""
from __future__ import annotations


def thumbnail_png(image_bytes: bytes, width: int = 240) -> bytes:
    import cv2

    from factory_assets.vision.decode import decode_image

    img = decode_image(image_bytes)
    h, w = img.shape[:2]
    if w > width:
        img = cv2.resize(img, (width, int(h * width / w)), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".png", img)
    return buf.tobytes()


def grid_png(images: list[bytes], captions: list[str] | None = None, cols: int = 4, cell_width: int = 160) -> bytes:
    """A grid of thumbnails with a caption under each."""
    import cv2
    import numpy as np

    from factory_assets.vision.decode import decode_image

    cell_h = cell_width * 3 // 4
    cells = []
    for i, data in enumerate(images):
        img = cv2.resize(decode_image(data), (cell_width, cell_h), interpolation=cv2.INTER_AREA)
        band = np.full((18, cell_width, 3), 255, np.uint8)
        if captions:
            cv2.putText(band, captions[i][:28], (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
        cells.append(np.vstack([img, band]))
    if not cells:
        cells = [np.full((cell_h + 18, cell_width, 3), 255, np.uint8)]
    while len(cells) % cols:
        cells.append(np.full_like(cells[0], 255))
    rows = [np.hstack(cells[r:r + cols]) for r in range(0, len(cells), cols)]
    ok, buf = cv2.imencode(".png", np.vstack(rows))
    return buf.tobytes()


def confusion_png(confusion: dict[str, dict[str, int]]) -> bytes:
    """One 2x2 confusion matrix per class (rows: truth yes/no, columns: predicted yes/no)."""
    import cv2
    import numpy as np

    classes = list(confusion)
    cell = 44
    width = 20 + len(classes) * (2 * cell + 40)
    img = np.full((2 * cell + 60, width, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for k, name in enumerate(classes):
        c = confusion[name]
        x0 = 20 + k * (2 * cell + 40)
        cv2.putText(img, name, (x0, 18), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        cells = [[c.get("tp", 0), c.get("fn", 0)], [c.get("fp", 0), c.get("tn", 0)]]
        total = max(sum(sum(r) for r in cells), 1)
        for i in range(2):
            for j in range(2):
                v = cells[i][j]
                good = i == j
                shade = int(255 - 180 * v / total)
                color = (shade, 255, shade) if good else (shade, shade, 255)
                y, x = 28 + i * cell, x0 + j * cell
                cv2.rectangle(img, (x, y), (x + cell, y + cell), color, -1)
                cv2.rectangle(img, (x, y), (x + cell, y + cell), (120, 120, 120), 1)
                cv2.putText(img, str(v), (x + 14, y + 28), font, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, "pred yes | no", (x0, 2 * cell + 46), font, 0.35, (80, 80, 80), 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", img)
    return buf.tobytes()


def slot_overlay_png(model, image_bytes: bytes) -> bytes:
    """A frame with a per-slot model's slot boxes drawn where the model looks (its learned
    geometry, moved by the frame's alignment shift) and each slot's predicted state: the
    picture to check after calibrating a new camera position."""
    import cv2

    from factory_assets.vision.decode import decode_image
    from factory_assets.vision.features import WORK_SIZE, estimate_shift, gradient_image, shrink
    from factory_assets.vision.slots import slots_doc

    img = decode_image(image_bytes)
    h, w = img.shape[:2]
    sx, sy = w / WORK_SIZE[0], h / WORK_SIZE[1]
    dx, dy = estimate_shift(model.reference, gradient_image(shrink(img))) if model.config.align else (0.0, 0.0)
    states = slots_doc(model.predict_slot_proba([img])[0])
    hx, hy = model.geometry.half_box
    colours = {"empty": (160, 160, 160), "blue": (220, 120, 30), "red": (40, 40, 220), "white": (255, 255, 255)}
    out = img.copy()
    for slot, info in states.items():
        cx, cy = model.geometry.centre(slot)
        x0, y0 = int((cx + dx - hx) * sx), int((cy + dy - hy) * sy)
        x1, y1 = int((cx + dx + hx) * sx), int((cy + dy + hy) * sy)
        colour = colours.get(info["state"], (0, 255, 255))
        cv2.rectangle(out, (x0, y0), (x1, y1), colour, 1)
        cv2.putText(out, f"{slot} {info['state']} {info['probability']:.2f}", (x0 + 2, y0 + 10),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.3, colour, 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".png", out)
    return buf.tobytes()
