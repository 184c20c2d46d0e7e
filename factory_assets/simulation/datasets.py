"""A labelled dataset rendered by the simulated factory, in SageMaker's layout.

For benchmarks and tests that need a model which knows the simulated warehouse
without waiting for a live stream: random stocks, the simulator's renderer,
ground-truth labels. (The live platform labels real streams from ``f/i/stock``.)
"""
from __future__ import annotations

from pathlib import Path

from factory_assets.simulation.render import encode_jpeg, render_warehouse
from factory_assets.vocabulary import CLASSES, SLOTS, TYPE_TO_COLOUR, TYPES

TYPE_TO_COLUMN = {t: CLASSES.index(c) for t, c in TYPE_TO_COLOUR.items()}


def random_stock(rng) -> dict:
    fill = rng.uniform(0.1, 0.8)
    return {s: (TYPES[int(rng.integers(len(TYPES)))] if rng.random() < fill else None) for s in SLOTS}


def labels_of(stock: dict) -> list[int]:
    out = [0, 0, 0]
    for t in stock.values():
        if t:
            out[TYPE_TO_COLUMN[t]] = 1
    return out


def write_simulated_dataset(out_dir: Path, n_train: int = 120, n_valid: int = 40, seed: int = 0) -> Path:
    import numpy as np

    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    index = 1
    for split, n in (("train", n_train), ("valid", n_valid)):
        img_dir = out_dir / f"{split}-imgs"
        img_dir.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            stock = random_stock(rng)
            img = render_warehouse(stock, rng=rng, lighting=float(rng.uniform(0.6, 1.1)))
            name = f"{split}-{i:05d}.jpeg"
            (img_dir / name).write_bytes(encode_jpeg(img))
            lines.append(f"{index}\t" + "\t".join(map(str, labels_of(stock))) + f"\t{name}\n")
            index += 1
        annots = out_dir / f"{split}-annots"
        annots.mkdir(parents=True, exist_ok=True)
        (annots / f"{split}.lst").write_text("".join(lines))
    return out_dir
