"""Evaluating a stock model on one split of a dataset (default: ``valid``)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from factory_assets.vocabulary import CLASSES, SLOT_STATES, SLOTS, TYPE_TO_STATE
from factory_assets.vision.model import StockModel
from factory_assets.vision.train import label_metrics, load_image, read_split, read_split_slots


def evaluate(model: StockModel, dataset_dir: Path, split: str = "valid") -> dict:
    """Per-label accuracy, exact match, per-class precision/recall/f1/accuracy and
    confusion counts (tp, fp, tn, fn) of ``model`` on ``split``, with the model's
    own thresholds."""
    image_dir, rows = read_split(Path(dataset_dir), split)
    images = [load_image(image_dir / r.path) for r in rows]
    y = np.array([r.labels for r in rows], dtype=int)
    t0 = time.perf_counter()
    slot_proba = None
    if getattr(model, "kind", "presence") == "slots":
        slot_proba = model.predict_slot_proba(images)
        proba = model.presence_from_slots(slot_proba)
    else:
        proba = model.predict_proba(images)
    elapsed = time.perf_counter() - t0
    t = np.array([model.thresholds[c] for c in CLASSES])
    pred = (proba >= t).astype(int)
    out = label_metrics(pred, y)
    out["model_kind"] = getattr(model, "kind", "presence")
    if slot_proba is not None:
        out["slots"] = slot_metrics(slot_proba, rows, read_split_slots(Path(dataset_dir), split, rows))
    out.update({
        "split": split,
        "dataset": str(dataset_dir),
        "model_version": model.version,
        "thresholds": dict(model.thresholds),
        "classes": list(CLASSES),
        "precision": {c: out["per_class"][c]["precision"] for c in CLASSES},
        "recall": {c: out["per_class"][c]["recall"] for c in CLASSES},
        "f1": {c: out["per_class"][c]["f1"] for c in CLASSES},
        "accuracy": {c: out["per_class"][c]["accuracy"] for c in CLASSES},
        "confusion": {c: {k: out["per_class"][c][k] for k in ("tp", "fp", "tn", "fn")} for c in CLASSES},
        "predict_ms_per_image": 1000.0 * elapsed / max(len(images), 1),
        "images": [
            {"path": r.path, "labels": list(r.labels), "proba": [round(float(p), 4) for p in proba[i]],
             "predicted": pred[i].tolist()}
            for i, r in enumerate(rows)
        ],
    })
    return out


def slot_metrics(slot_proba: np.ndarray, rows, slot_rows: dict) -> dict | None:
    """Per-slot accuracy, frames with all nine slots right, per-slot-state confusion, on the
    rows that carry per-slot labels (None when none do)."""
    keep = [i for i, r in enumerate(rows) if r.index in slot_rows]
    if not keep:
        return None
    truth = np.array([[TYPE_TO_STATE.get(slot_rows[rows[i].index][s] or "", 0) for s in SLOTS] for i in keep])
    pred = slot_proba[keep].argmax(axis=-1)
    confusion = {t: {p: int(((truth == a) & (pred == b)).sum()) for b, p in enumerate(SLOT_STATES)}
                 for a, t in enumerate(SLOT_STATES)}
    return {"n_images": len(keep), "slot_accuracy": float((pred == truth).mean()),
            "frames_all_slots_right": float((pred == truth).all(axis=1).mean()),
            "per_slot_accuracy": {s: float((pred[:, j] == truth[:, j]).mean()) for j, s in enumerate(SLOTS)},
            "confusion": confusion}
