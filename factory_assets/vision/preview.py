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
