"""Quality metrics of predictions against labels, on arrays (scikit-learn does the counting).

* ``label_metrics``: multi-label presence (``CLASSES`` columns): per-label accuracy,
  exact match, per class precision / recall / f1 / accuracy and the confusion counts;
* ``class_scores``: one class's support, precision, recall and f1 from its confusion counts,
  ``None`` where a score is undefined (a class with no example present has no recall);
* ``slot_metrics``: per-slot states (``SLOTS`` columns, ``SLOT_STATES`` values): slot
  accuracy, frames with every slot right, per-slot accuracy and the state confusion.
"""
from __future__ import annotations

import logging

import numpy as np

from factory_assets.vocabulary import CLASSES, SLOT_STATES, SLOTS

logger = logging.getLogger(__name__)


def label_metrics(pred: np.ndarray, y: np.ndarray) -> dict:
    """``pred`` and ``y`` (n, len(CLASSES)) of 0/1 -> accuracy, exact match and, per class,
    accuracy, precision, recall, f1 and tp / fp / tn / fn (0.0 where undefined: the model
    artifact's metadata keeps these bytes; ``class_scores`` tells an undefined score apart)."""
    from sklearn.metrics import multilabel_confusion_matrix, precision_recall_fscore_support

    pred = np.asarray(pred).astype(int).reshape(-1, len(CLASSES))
    y = np.asarray(y).astype(int).reshape(-1, len(CLASSES))
    n = len(y)
    out = {
        "n_images": int(n),
        "per_label_accuracy": float((pred == y).mean()) if n else 0.0,
        "exact_match": float((pred == y).all(axis=1).mean()) if n else 0.0,
        "per_class": {},
    }
    if n:
        labels = list(range(len(CLASSES)))
        confusion = multilabel_confusion_matrix(y, pred, labels=labels)  # per class [[tn, fp], [fn, tp]]
        precision, recall, _, _ = precision_recall_fscore_support(y, pred, labels=labels, average=None,
                                                                  zero_division=0.0)
    for i, c in enumerate(CLASSES):
        if not n:
            out["per_class"][c] = {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                                   "tp": 0, "fp": 0, "tn": 0, "fn": 0}
            continue
        (tn, fp), (fn, tp) = confusion[i].tolist()
        p, r = float(precision[i]), float(recall[i])
        # f1 as the harmonic mean of these two, not scikit-learn's 2tp / (2tp + fp + fn): the two
        # differ in the last bit, and the out-of-fold metrics are in the model artifact's
        # metadata, whose bytes stay those of earlier trainings.
        out["per_class"][c] = {
            "accuracy": (tp + tn) / n,
            "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        }
    return out


def class_scores(tp: int, fp: int, tn: int, fn: int) -> dict:
    """One class's scores from its confusion counts, ``None`` where undefined instead of 0:

    * ``support`` (images where the class is present, tp + fn) and ``absent`` (tn + fp);
    * ``precision`` (None when the model never said "present"), ``recall`` and ``f1`` (None
      when no image has the class: nothing to find). With examples but no "present" decision,
      f1 is 0.0: every example was missed."""
    support, predicted = tp + fn, tp + fp
    precision = tp / predicted if predicted else None
    recall = tp / support if support else None
    if recall is None:
        f1 = None
    elif precision is None or precision + recall == 0:
        f1 = 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall)
    return {"support": support, "absent": tn + fp, "precision": precision, "recall": recall, "f1": f1}


def slot_metrics(slot_proba: np.ndarray, truth: np.ndarray) -> dict | None:
    """``slot_proba`` (n, 9, 4) and true states ``truth`` (n, 9) -> slot accuracy, frames with
    all nine slots right, per-slot accuracy and the per-state confusion (truth -> predicted
    -> count); None for no frames."""
    from sklearn.metrics import confusion_matrix

    truth = np.asarray(truth, dtype=int).reshape(-1, len(SLOTS))
    if not len(truth):
        return None
    pred = np.asarray(slot_proba).argmax(axis=-1)
    counts = confusion_matrix(truth.ravel(), pred.ravel(), labels=list(range(len(SLOT_STATES))))
    confusion = {t: {p: int(counts[a, b]) for b, p in enumerate(SLOT_STATES)} for a, t in enumerate(SLOT_STATES)}
    return {"n_images": len(truth), "slot_accuracy": float((pred == truth).mean()),
            "frames_all_slots_right": float((pred == truth).all(axis=1).mean()),
            "per_slot_accuracy": {s: float((pred[:, j] == truth[:, j]).mean()) for j, s in enumerate(SLOTS)},
            "confusion": confusion}
