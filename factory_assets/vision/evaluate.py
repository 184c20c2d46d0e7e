"""Scoring a stock model on frames and their labels (arrays; reading a dataset split is
``factory_assets.backends.local.evaluate``)."""
from __future__ import annotations

import time

import numpy as np

from factory_assets.vocabulary import CLASSES
from factory_assets.vision.metrics import label_metrics, slot_metrics


def evaluate_arrays(model, images: list[np.ndarray], labels: np.ndarray,
                    slot_states: np.ndarray | None = None) -> dict:
    """Per-label accuracy, exact match, per-class precision/recall/f1/accuracy and
    confusion counts (tp, fp, tn, fn) of ``model`` on ``images`` with presence ``labels``
    (n, 3), with the model's own thresholds. For a per-slot model, ``slots``: the slot
    metrics on the frames whose ``slot_states`` (n, 9; a row of -1: no per-slot label)
    are known (None when none are). ``proba`` and ``predicted`` per frame, in order."""
    y = np.asarray(labels, dtype=int).reshape(len(images), len(CLASSES))
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
        known = np.zeros(len(images), bool) if slot_states is None else (np.asarray(slot_states) >= 0).all(axis=1)
        out["slots"] = slot_metrics(slot_proba[known], np.asarray(slot_states)[known]) if known.any() else None
    out.update({
        "model_version": model.version,
        "thresholds": dict(model.thresholds),
        "classes": list(CLASSES),
        "precision": {c: out["per_class"][c]["precision"] for c in CLASSES},
        "recall": {c: out["per_class"][c]["recall"] for c in CLASSES},
        "f1": {c: out["per_class"][c]["f1"] for c in CLASSES},
        "accuracy": {c: out["per_class"][c]["accuracy"] for c in CLASSES},
        "confusion": {c: {k: out["per_class"][c][k] for k in ("tp", "fp", "tn", "fn")} for c in CLASSES},
        "predict_ms_per_image": 1000.0 * elapsed / max(len(images), 1),
        "proba": [[round(float(p), 4) for p in row] for row in proba],
        "predicted": pred.tolist(),
    })
    return out
