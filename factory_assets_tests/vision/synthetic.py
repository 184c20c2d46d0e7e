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


def write_simulated_slot_dataset(out_dir: Path, n_train: int = 80, n_valid: int = 40, seed: int = 0,
                                 train_types: tuple[str, ...] = ("BLUE", "RED", "WHITE"),
                                 render_kwargs: dict | None = None) -> Path:
    """The simulated factory's warehouse in SageMaker's layout with the per-slot sidecar
    (``<split>.slots``). ``train_types`` limits which workpiece types the train split shows
    (the valid split shows all three), to test colours never seen in training."""
    from factory_assets.datasets.lst import LstRow, format_slots, write_lst
    from factory_assets.simulation.render import SLOTS as RACK, encode_jpeg, render_warehouse

    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    index = 1
    for split, n, types in (("train", n_train, train_types), ("valid", n_valid, ("BLUE", "RED", "WHITE"))):
        img_dir = out_dir / f"{split}-imgs"
        img_dir.mkdir(parents=True, exist_ok=True)
        rows, slot_rows = [], []
        for i in range(n):
            fill = rng.uniform(0.1, 0.8)
            stock = {s: (types[int(rng.integers(len(types)))] if rng.random() < fill else None) for s in RACK}
            img = render_warehouse(stock, rng=rng, lighting=float(rng.uniform(0.6, 1.1)), **(render_kwargs or {}))
            name = f"{split}-{i:05d}.jpeg"
            (img_dir / name).write_bytes(encode_jpeg(img))
            present = {t: any(v == t for v in stock.values()) for t in ("BLUE", "RED", "WHITE")}
            rows.append(LstRow(index, (int(present["BLUE"]), int(present["RED"]), int(present["WHITE"])), name))
            slot_rows.append((index, stock, name))
            index += 1
        write_lst(out_dir / f"{split}-annots" / f"{split}.lst", rows)
        (out_dir / f"{split}-annots" / f"{split}.slots").write_text(format_slots(slot_rows), encoding="utf-8")
    return out_dir
