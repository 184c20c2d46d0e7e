"""A tiny synthetic warehouse dataset in SageMaker's layout, drawn with OpenCV, so the
trainer can be tested without the shared real photos."""
from __future__ import annotations

from itertools import product
from pathlib import Path

import numpy as np

# slot centres (x, y) in a 320x240 frame and BGR colours, CLASSES order
SLOTS = ((70, 45), (75, 95), (78, 145))
COLOURS = ((200, 140, 40), (40, 20, 190), (235, 235, 235))


def scene_name(labels: tuple[int, int, int]) -> str:
    names = [c for c, v in zip(("blue", "red", "white"), labels) if v]
    return ", ".join(names) if names else "no pieces"


def draw_frame(labels, gain: float = 1.0, shift: tuple[int, int] = (0, 0), seed: int = 0) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    base = np.random.default_rng(1234)  # the "rack": identical in every frame
    img = np.full((240, 320, 3), 150, np.uint8)
    img[:] = base.integers(120, 180, (1, 1, 3), dtype=np.uint8)
    for _ in range(40):  # dark beams and orange parts, i.e. structure to align on
        x, y = base.integers(0, 300), base.integers(0, 220)
        w, h = base.integers(6, 40), base.integers(6, 40)
        colour = (30, 30, 30) if base.random() < 0.6 else (40, 90, 220)
        cv2.rectangle(img, (int(x), int(y)), (int(x + w), int(y + h)), colour, -1)
    for present, (cx, cy), colour in zip(labels, SLOTS, COLOURS):
        if present:
            cv2.ellipse(img, (cx, cy), (13, 6), 0, 0, 360, colour, -1)
    m = np.float32([[1, 0, shift[0]], [0, 1, shift[1]]])
    img = cv2.warpAffine(img, m, (320, 240), borderMode=cv2.BORDER_REPLICATE)
    out = img.astype(np.float32) * gain + rng.normal(0, 3, img.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def write_synthetic_dataset(root: Path) -> Path:
    """train: 8 scenes x (dark, light); valid: 8 scenes, camera moved by a few pixels."""
    import cv2

    combos = list(product((0, 1), repeat=3))
    for split in ("train", "valid"):
        (root / f"{split}-imgs").mkdir(parents=True, exist_ok=True)
        (root / f"{split}-annots").mkdir(parents=True, exist_ok=True)
    lines, i = [], 0
    for labels in combos:
        for variant, gain in (("dark", 0.7), ("light", 1.25)):
            i += 1
            name = f"{scene_name(labels)} - {variant}.jpeg"
            cv2.imwrite(str(root / "train-imgs" / name), draw_frame(labels, gain, seed=i))
            lines.append(f"{i}\t" + "\t".join(map(str, labels)) + f"\t{name}\n")
    (root / "train-annots" / "train.lst").write_text("".join(lines))
    lines = []
    for labels in combos:
        i += 1
        name = f"{scene_name(labels)}.jpeg"
        cv2.imwrite(str(root / "valid-imgs" / name), draw_frame(labels, 1.0, shift=(5, -4), seed=i))
        lines.append(f"{i}\t" + "\t".join(map(str, labels)) + f"\t{name}\n")
    (root / "valid-annots" / "valid.lst").write_text("".join(lines))
    return root
