"""Reading a dataset folder in SageMaker's image-classifier layout into arrays.

Dataset folder::

    train-imgs/              images of the train split
    train-annots/train.lst   index<TAB>blue<TAB>red<TAB>white<TAB>path (relative to train-imgs)
    train-annots/train.slots optional per-slot sidecar (``datasets.lst``)
    valid-imgs/, valid-annots/valid.lst, valid.slots   the evaluation split

What ``vision`` fits and scores on: decoded frames, presence labels, scene groups
(for cross-validation) and per-slot states.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from factory_assets.datasets.lst import LstRow, ManifestError, read_lst, read_slots, slots_path
from factory_assets.vocabulary import CLASSES, SLOTS, TYPE_TO_STATE
from factory_assets.vision.fit import DatasetError

logger = logging.getLogger(__name__)

__all__ = ["DatasetError", "split_paths", "read_split", "read_split_slots", "load_image", "scene_of",
           "slot_states"]

_VARIANT = re.compile(r"\s+-\s+[^-]+$")


def split_paths(dataset_dir: Path, split: str) -> tuple[Path, Path]:
    """(image folder, manifest) of a split, SageMaker layout."""
    dataset_dir = Path(dataset_dir)
    return dataset_dir / f"{split}-imgs", dataset_dir / f"{split}-annots" / f"{split}.lst"


def read_split(dataset_dir: Path, split: str) -> tuple[Path, list[LstRow]]:
    """Manifest rows of a split (validated: every image exists in the folder)."""
    image_dir, lst = split_paths(dataset_dir, split)
    if not lst.is_file():
        raise DatasetError(f"no manifest for split {split!r}: {lst} is missing")
    if not image_dir.is_dir():
        raise DatasetError(f"no image folder for split {split!r}: {image_dir} is missing")
    rows = read_lst(lst, image_dir=image_dir, n_classes=len(CLASSES))
    if not rows:
        raise DatasetError(f"manifest {lst} lists no images")
    return image_dir, rows


def read_split_slots(dataset_dir: Path, split: str, rows) -> dict[int, dict]:
    """index -> slot -> type of the split's rows that have a per-slot label (sidecar
    ``<split>.slots``); a sidecar line must name the same image as the ``.lst`` line."""
    _, lst = split_paths(dataset_dir, split)
    sidecar = read_slots(slots_path(lst))
    by_index = {r.index: r for r in rows}
    unknown = sorted(set(sidecar) - set(by_index))
    if unknown:
        raise ManifestError(f"{slots_path(lst)}: index {unknown[0]} is not in {lst}")
    return sidecar


def load_image(path: Path) -> np.ndarray:
    """A decoded BGR frame; an unreadable image is a ``DatasetError`` naming the file."""
    from factory_assets.vision.model import _decode

    try:
        return _decode(Path(path).read_bytes())
    except ValueError as exc:
        raise DatasetError(f"{path}: {exc}") from exc


def scene_of(rel_path: str) -> str:
    """``'blue, red - dark.jpeg'`` -> ``'blue, red'``: the variants of one scene share a group."""
    stem = Path(rel_path).stem
    return _VARIANT.sub("", stem).strip().lower() or stem


def slot_states(rows, slot_rows: dict[int, dict]) -> np.ndarray:
    """(n, 9) slot states (0 empty, 1 blue, 2 red, 3 white) of ``rows``; -1 for every slot
    of a row without a per-slot label."""
    out = np.full((len(rows), len(SLOTS)), -1, dtype=int)
    for i, r in enumerate(rows):
        if r.index in slot_rows:
            out[i] = [TYPE_TO_STATE.get(slot_rows[r.index][s] or "", 0) for s in SLOTS]
    return out
