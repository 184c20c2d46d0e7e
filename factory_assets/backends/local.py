"""The local backend: train and evaluate on this machine (OpenCV + scikit-learn).

Joins the two layers below it: ``datasets.reading`` turns a dataset folder (SageMaker
layout) into frames, labels, scene groups and slot states; ``vision`` fits
(``vision.fit``, ``vision.slots``), scores (``vision.evaluate``, ``vision.metrics``) and
writes the model card (``vision.card``) on those arrays.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from factory_assets.datasets.reading import (DatasetError, load_image, read_split, read_split_slots, scene_of,
                                             slot_states)
from factory_assets.vision.card import card_for
from factory_assets.vision.features import FeatureConfig
from factory_assets.vision.fit import fit_stock_model
from factory_assets.vision.model import StockModel

logger = logging.getLogger(__name__)

__all__ = ["DatasetError", "LocalBackendTrainer", "LocalTrainer", "TrainResult", "evaluate"]


@dataclass
class TrainResult:
    model: StockModel
    model_dir: Path
    artifact_path: Path
    metrics: dict = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.model.version


class LocalTrainer:
    """Trains on this machine with OpenCV + scikit-learn (no GPU, no downloads).

    Picks the model from the dataset: when the train split carries per-slot labels
    (``train-annots/train.slots``, see ``datasets.lst``) for at least half of its
    frames, the per-slot model (``vision.slots``) on those frames; otherwise, or when
    the slots cannot be placed from them, the presence model (``vision.fit``). ``kind``
    forces one."""

    MIN_SLOT_FRACTION = 0.5

    def __init__(self, config: FeatureConfig | None = None, n_augment: int | None = None, kind: str | None = None):
        if kind not in (None, "slots", "presence"):
            raise ValueError(f"kind must be 'slots', 'presence' or None, not {kind!r}")
        self.config = config  # None: feature hyper-parameters chosen by cross-validation
        self.n_augment = n_augment
        self.kind = kind

    def train(self, dataset_dir: Path, out_dir: Path, seed: int = 0) -> TrainResult:
        t0 = time.perf_counter()
        dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
        image_dir, rows = read_split(dataset_dir, "train")
        slot_rows = read_split_slots(dataset_dir, "train", rows)
        use_slots = self.kind == "slots" or (
            self.kind is None and len(slot_rows) >= max(2, self.MIN_SLOT_FRACTION * len(rows)))
        model = metrics = None
        if use_slots:
            from factory_assets.vision.slots import fit_slot_model

            states = slot_states(rows, slot_rows)
            labelled = (states >= 0).all(axis=1)
            picked = [r for r, keep in zip(rows, labelled) if keep]
            images = [load_image(image_dir / r.path) for r in picked]
            try:
                model, metrics = fit_slot_model(images, states[labelled], seed=seed,
                                                n_augment=self.n_augment, config=self.config)
                metrics["n_presence_only_frames_skipped"] = len(rows) - len(picked)
            except DatasetError as exc:
                if self.kind == "slots":
                    raise
                logger.warning("per-slot model not possible (%s): training the presence model", exc)
                model = None
        if model is None:
            images = [load_image(image_dir / r.path) for r in rows]
            labels = np.array([r.labels for r in rows], dtype=int)
            groups = [scene_of(r.path) for r in rows]
            model, metrics = fit_stock_model(images, labels, groups, seed=seed, config=self.config,
                                             n_augment=self.n_augment)
            metrics["model_kind"] = "presence"
        metrics["timing_seconds"]["wall_incl_io"] = round(time.perf_counter() - t0, 3)
        metrics["model_version"] = model.version
        metrics["dataset"] = {"dir": str(dataset_dir), "split": "train", "manifest": "train-annots/train.lst"}
        metrics["platform"] = {"python": platform.python_version(), "cpus": os.cpu_count()}
        model.metadata["dataset"] = dataset_dir.name
        out_dir.mkdir(parents=True, exist_ok=True)
        artifact = model.save(out_dir)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (out_dir / "MODEL_CARD.md").write_text(card_for(model, metrics), encoding="utf-8")
        return TrainResult(model=model, model_dir=out_dir, artifact_path=artifact, metrics=metrics)


def evaluate(model, dataset_dir: Path, split: str = "valid") -> dict:
    """Per-label accuracy, exact match, per-class precision/recall/f1/accuracy and
    confusion counts (tp, fp, tn, fn) of ``model`` on ``split`` of the dataset folder,
    with the model's own thresholds (``vision.evaluate.evaluate_arrays``), the split and
    dataset named, and per image its path, labels, probabilities and decisions."""
    from factory_assets.vision.evaluate import evaluate_arrays

    image_dir, rows = read_split(Path(dataset_dir), split)
    images = [load_image(image_dir / r.path) for r in rows]
    labels = np.array([r.labels for r in rows], dtype=int)
    states = None
    if getattr(model, "kind", "presence") == "slots":
        states = slot_states(rows, read_split_slots(Path(dataset_dir), split, rows))
    report = evaluate_arrays(model, images, labels, slot_states=states)
    proba, predicted = report.pop("proba"), report.pop("predicted")
    items = list(report.items())
    at = [k for k, _ in items].index("model_version")
    out = dict(items[:at])
    out.update({"split": split, "dataset": str(dataset_dir)})
    out.update(items[at:])
    out["images"] = [{"path": r.path, "labels": list(r.labels), "proba": proba[i], "predicted": predicted[i]}
                     for i, r in enumerate(rows)]
    return out


def leave_one_scene_out(dataset_dir: Path, copies_of, seed: int = 0) -> dict[str, np.ndarray]:
    """Robustness on the train split only. The presence model is fitted once per train
    scene without it, and predicts copies of that scene's photos. ``copies_of(photos)``
    gives, per photo, named lists of copies (perturbed, moved...). Returns, per name, a
    boolean array ``(n_copies, n_classes)``: prediction equals label."""
    from factory_assets.vocabulary import CLASSES

    image_dir, rows = read_split(Path(dataset_dir), "train")
    images = [load_image(image_dir / r.path) for r in rows]
    labels = np.array([r.labels for r in rows], dtype=int)
    groups = [scene_of(r.path) for r in rows]
    copies = copies_of(images)
    ok: dict[str, list] = {name: [] for name in copies[0]}
    for held in sorted(set(groups)):
        fit = [i for i, g in enumerate(groups) if g != held]
        model, _ = fit_stock_model([images[i] for i in fit], labels[fit], [groups[i] for i in fit], seed=seed)
        for i in (i for i, g in enumerate(groups) if g == held):
            for name, imgs in copies[i].items():
                pred = np.array([[d[c] for c in CLASSES] for d in model.predict(imgs)]).astype(int)
                ok[name].append(pred == labels[i])
    return {name: np.concatenate(parts) for name, parts in ok.items()}


class LocalBackendTrainer:
    """``Trainer`` on this machine; a thin wrapper so callers depend on the backend
    protocol rather than on ``LocalTrainer``'s options."""

    name = "local"

    def __init__(self, **trainer_options):
        self.trainer_options = trainer_options

    def train(self, dataset_dir: Path, out_dir: Path, seed: int = 0):
        logger.info("training locally on %s (seed %s)", dataset_dir, seed)
        return LocalTrainer(**self.trainer_options).train(Path(dataset_dir), Path(out_dir), seed=seed)
