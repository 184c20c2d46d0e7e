"""Fitting the presence model on in-memory frames: arrays in, a ``StockModel`` and its
metrics out (reading a dataset folder is ``factory_assets.datasets.reading``'s job).

Method (``fit_stock_model``):

1. an alignment reference (mean gradient image) from the training frames;
2. features (``features.extract``) of every training frame and of ``n_augment``
   augmented copies of it (shift / rotation / zoom / exposure / contrast / white
   balance / noise), so the model sees more than the few real sessions. With
   ``robust=True`` (not the default, see ``ROBUST_FEATURES``): ``ROBUST_FEATURES``,
   copies degraded as the robustness target (``features.augment(degrade=True)``)
   and the wider ``ROBUST_*_CANDIDATES``. With ``far=True`` (not the default, see
   ``FAR_FEATURES``): red evidence without its offset (``red_a=0``);
3. per class, a spatial matched filter ``w = mean(features | present) -
   mean(features | absent)``, smoothed over the cell grid and cut to its strongest
   part, then a 1-D logistic regression of the label on ``<w, features>``;
4. feature hyper-parameters per class (white-evidence thresholds, max filter
   over cells, matched-filter cut) chosen by the cross-validation below, scored
   half on held-out original frames and half on their augmented copies;
5. decision thresholds from *out-of-fold* probabilities: cross-validation that
   holds out whole groups (scenes: ``datasets.reading.scene_of``), thresholds
   maximise out-of-fold accuracy (ties: closest to 0.5). The validation split
   plays no part in any choice.
6. the final model is fitted on all training frames.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np

from factory_assets.vocabulary import CLASSES
from factory_assets.vision.features import FeatureConfig, augment, build_reference, finish, pooled_evidence
from factory_assets.vision.metrics import label_metrics
from factory_assets.vision.model import StockModel

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """The training data (a dataset folder, or the frames and labels read from it) is
    not in the expected layout or is unusable."""


# ---------------------------------------------------------------------------
# fitting


def _fit_class(x: np.ndarray, y: np.ndarray, grid: tuple[int, int], keep: float) -> tuple[np.ndarray, float, float]:
    """Matched filter + 1-D logistic calibration for one class."""
    import cv2
    from sklearn.linear_model import LogisticRegression

    n_feat = x.shape[1]
    pos, neg = y == 1, y == 0
    if not pos.any() or not neg.any():  # one-sided data: a constant prior
        p = float(np.clip(pos.mean(), 0.01, 0.99))
        return np.zeros(n_feat, np.float32), 0.0, float(np.log(p / (1 - p)))
    w = (x[pos].mean(axis=0) - x[neg].mean(axis=0)).astype(np.float32)
    w = cv2.GaussianBlur(w.reshape(grid), (0, 0), 1.0).ravel()
    if w.max() > 0:
        w = np.where(w > keep * w.max(), w, 0.0).astype(np.float32)
    w /= float(np.linalg.norm(w)) + 1e-9
    s = (x @ w)[:, None]
    lr = LogisticRegression(C=1.0, max_iter=1000).fit(s, y)
    return w, float(lr.coef_[0, 0]), float(lr.intercept_[0])


def fit_filters(feats: np.ndarray, labels: np.ndarray, cfg: FeatureConfig, keep: float = 0.5):
    """feats (n, 3, n_cells), labels (n, 3) -> (weights (3, n_cells), calibration (3, 2))."""
    weights, calib = [], []
    for c in range(labels.shape[1]):
        w, a, b = _fit_class(feats[:, c, :], labels[:, c], cfg.grid, keep)
        weights.append(w)
        calib.append((a, b))
    return np.stack(weights), np.array(calib)


def _proba(feats: np.ndarray, weights: np.ndarray, calib: np.ndarray) -> np.ndarray:
    z = np.einsum("ncf,cf->nc", feats.astype(np.float64), weights.astype(np.float64)) * calib[:, 0] + calib[:, 1]
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def choose_threshold(proba: np.ndarray, y: np.ndarray) -> float:
    """Threshold maximising accuracy of ``proba >= t``; ties go to the one closest to 0.5."""
    p = np.sort(np.unique(np.concatenate([proba, [0.0, 1.0]])))
    candidates = np.unique(np.concatenate([(p[:-1] + p[1:]) / 2.0, [0.5]]))
    acc = np.array([((proba >= t).astype(int) == y).mean() for t in candidates])
    best = candidates[acc >= acc.max() - 1e-12]
    return float(np.clip(best[np.argmin(np.abs(best - 0.5))], 0.02, 0.98))


def _folds(groups: list[str], seed: int) -> list[np.ndarray]:
    """Held-out index sets: leave-one-scene-out for up to 10 scenes, else 5 group folds."""
    uniq = sorted(set(groups))
    g = np.array(groups)
    if len(uniq) < 2:  # no scene structure: plain 5-fold on images
        idx = np.random.default_rng(seed).permutation(len(groups))
        return [f for f in np.array_split(idx, min(5, len(groups))) if len(f)]
    if len(uniq) <= 10:
        return [np.flatnonzero(g == u) for u in uniq]
    order = np.random.default_rng(seed).permutation(len(uniq))
    return [np.flatnonzero(np.isin(g, [uniq[i] for i in part])) for part in np.array_split(order, 5)]


# Hyper-parameters chosen per class by cross-validation on the train split:
# white evidence thresholds (L*, chroma), max filter over cells, matched-filter cut.
WHITE_CANDIDATES: tuple[tuple[float, float], ...] = ((65.0, 15.0), (50.0, 25.0))
KEEP_CANDIDATES: tuple[float, ...] = (0.5, 0.7)
POOL_CANDIDATES: tuple[int, ...] = (3, 1)
# ``robust=True``: a design chosen on a train-only harness (leave one train scene out,
# the held-out photos perturbed one perturbation type at a time, at the ranges,
# at 1.5x them and at their extremes: ``benchmarks/train_eval.py --hard-cv --robust``):
# gray-world scaling leaves a brightness offset / contrast change in the evidence and
# JPEG at quality 40 made red evidence appear and vanish on the dark session; affine
# normalisation, a 0.7 px blur and the degrading augmentation removed most of it there.
# NOT the default: evaluated once on the validation split it missed the red piece on 3
# of the 8 original photos (per-label 0.875, exact 0.625; docs/evaluations.md).
ROBUST_FEATURES = FeatureConfig(normalise="affine", blur=0.7)
ROBUST_KEEP_CANDIDATES: tuple[float, ...] = (0.5, 0.7, 0.85, 0.95)
ROBUST_POOL_CANDIDATES: tuple[int, ...] = (3, 1, 5)
# ``far=True``: a design chosen on train-only harnesses, above all ``benchmarks/train_eval.py
# --far-cv`` (leave one train scene out, the held-out photos paler - desaturated, white
# balance shifted, hazy - and seen from further away and to one side, then the issue's
# perturbations), which reproduces the validation copies' signature: the red piece missed.
# A pale disc's a* - 1.3 max(b*, 0) falls to a few units, and JPEG / noise at the
# issue's ranges push it under the default's 4-unit offset, where its evidence is cut to 0
# while the orange parts' remains. Without the offset (``red_a=0``) red evidence scales
# with the chroma and the per-image standardisation of the features absorbs paler colours.
# Everything else (augmentation, candidates, thresholds) is the default's, and the config
# is expressible in artifact format 1 (``FeatureConfig.red_a`` is an original field).
# Train-only it halved the red errors on paler copies with the perturbations and
# regressed no harness. NOT the default: evaluated once on the validation split it read
# per-label 0.833 / exact 0.500 on the original photos (red wrong on 4 of 8) and 0.867 /
# 0.613 and 0.863 / 0.588 on two sets of perturbed copies (default: 1.000 / 1.000,
# 0.938 / 0.825, 0.946 / 0.838).
FAR_FEATURES = FeatureConfig(red_a=0.0)


def fit_stock_model(images: list[np.ndarray], labels: np.ndarray, groups: list[str], seed: int = 0,
                    config: FeatureConfig | None = None, n_augment: int | None = None,
                    keep: float | None = None, robust: bool = False, far: bool = False) -> tuple[StockModel, dict]:
    """Fit on in-memory frames. Returns the model and the training/CV metrics.

    With ``config`` and ``keep`` left as None, the white-evidence thresholds, the
    per-class max filter and the per-class matched-filter cut are chosen by
    cross-validation (held-out scenes, original frames and augmented copies count
    half each); given explicitly, they are used as they are. ``robust`` and ``far``
    select the alternative designs ``ROBUST_FEATURES`` / ``FAR_FEATURES`` (at most one).

    BLAS runs single-threaded: multi-threaded reductions may sum in a different
    order from run to run, and the same seed must give the same model."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return _fit_stock_model(images, labels, groups, seed, config, n_augment, keep, robust, far)


def _oof(X: np.ndarray, Y: np.ndarray, owner: np.ndarray, folds, grid, keep) -> np.ndarray:
    """Out-of-fold probabilities of one class: X (n, n_cells), Y (n,)."""
    oof = np.full(len(Y), np.nan)
    for held in folds:
        test = np.isin(owner, held)
        if test.all():
            continue
        w, a, b = _fit_class(X[~test], Y[~test], grid, keep)
        z = (X[test].astype(np.float64) @ w.astype(np.float64)) * a + b
        oof[test] = 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))
    return oof


def _cv_score(oof: np.ndarray, y: np.ndarray, original: np.ndarray) -> float:
    have = ~np.isnan(oof)
    if not have.any():
        return 0.0
    t = choose_threshold(oof[have], y[have])
    ok = (oof >= t).astype(int) == y
    parts = [ok[have & original].mean() if (have & original).any() else None,
             ok[have & ~original].mean() if (have & ~original).any() else None]
    parts = [p for p in parts if p is not None]
    return float(np.mean(parts))


def _fit_stock_model(images, labels, groups, seed, config, n_augment, keep, robust=False,
                     far=False) -> tuple[StockModel, dict]:
    if robust and far:
        raise ValueError("robust and far are two different designs; choose at most one")
    select = config is None and keep is None
    base = config or (ROBUST_FEATURES if robust else FAR_FEATURES if far else FeatureConfig())
    pool_candidates = ROBUST_POOL_CANDIDATES if robust else POOL_CANDIDATES
    keep_candidates = ROBUST_KEEP_CANDIDATES if robust else KEEP_CANDIDATES
    labels = np.asarray(labels, dtype=int).reshape(len(images), len(CLASSES))
    n = len(images)
    if n < 2:
        raise DatasetError("need at least 2 training images")
    if n_augment is None:  # ~400 augmented frames for tiny sets, 1 copy each for big ones
        n_augment = int(np.clip(400 // n, 1, 20))
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    reference = build_reference(images)
    if select:
        cfgs = [replace(base, white_l=wl, white_chroma=wc, pools=None) for wl, wc in WHITE_CANDIDATES]
    else:
        cfgs = [base]
    pooled = [[] for _ in cfgs]
    owner = []
    for i, img in enumerate(images):
        for k, p in enumerate(pooled_evidence(img, reference, cfgs)):
            pooled[k].append(p)
        owner.append(i)
        for _ in range(n_augment):
            residual = tuple(rng.uniform(-2.0, 2.0, 2))  # what alignment leaves (perspective)
            copy = augment(img, rng, degrade=robust)
            for k, p in enumerate(pooled_evidence(copy, reference, cfgs, extra_shift=residual)):
                pooled[k].append(p)
            owner.append(i)
    pooled = [np.stack(p) for p in pooled]
    owner = np.array(owner)
    original = np.r_[True, owner[1:] != owner[:-1]]
    Y = labels[owner]
    t_feat = time.perf_counter() - t0
    folds = _folds(groups, seed)

    def class_features(k: int, c: int, pool: int) -> np.ndarray:
        cfg = replace(cfgs[k], pool=pool, pools=None)
        return np.stack([finish(p, cfg)[c] for p in pooled[k]])

    selection = {}
    if select:
        for c, name in enumerate(CLASSES):
            best = None
            for k in (range(len(cfgs)) if name == "white" else [0]):
                for pool in pool_candidates:
                    Xc = class_features(k, c, pool)
                    for kp in keep_candidates:
                        score = _cv_score(_oof(Xc, Y[:, c], owner, folds, base.grid, kp), Y[:, c], original)
                        if best is None or score > best[0] + 1e-9:
                            best = (score, k, pool, kp)
            selection[name] = {"cv_score": round(best[0], 4), "white": list(WHITE_CANDIDATES[best[1]]),
                               "pool": best[2], "keep": best[3]}
        wk = WHITE_CANDIDATES.index(tuple(selection["white"]["white"]))
        cfg = replace(cfgs[wk], pools=tuple(selection[c]["pool"] for c in CLASSES))
        keeps = [selection[c]["keep"] for c in CLASSES]
        src = [wk if c == "white" else 0 for c in CLASSES]
    else:
        cfg = base
        keeps = [0.5 if keep is None else keep] * len(CLASSES)
        src = [0] * len(CLASSES)
    X = np.stack([np.stack([finish(p, cfg)[c] for p in pooled[src[c]]]) for c in range(len(CLASSES))], axis=1)
    del pooled

    # out-of-fold probabilities (held-out scenes, their augmented copies included)
    oof = np.stack([_oof(X[:, c], Y[:, c], owner, folds, cfg.grid, keeps[c]) for c in range(len(CLASSES))], axis=1)
    have = ~np.isnan(oof).any(axis=1)
    thresholds = {}
    for i, c in enumerate(CLASSES):
        thresholds[c] = choose_threshold(oof[have, i], Y[have, i]) if have.any() else 0.5
    # Rounded so that last-bit differences of multi-threaded BLAS sums cannot
    # change the artifact: the same data and seed give the same model version.
    thresholds = {c: round(t, 4) for c, t in thresholds.items()}
    t_arr = np.array([thresholds[c] for c in CLASSES])

    weights, calib = [], []
    for c in range(len(CLASSES)):
        w, a, b = _fit_class(X[:, c], Y[:, c], cfg.grid, keeps[c])
        weights.append(w)
        calib.append((a, b))
    weights = np.round(np.stack(weights), 5).astype(np.float32)
    calib = np.round(np.array(calib), 5)
    reference = np.round(reference, 4).astype(np.float32)
    train_time = time.perf_counter() - t0
    sel = have & original
    metrics = {
        "seed": seed,
        "n_images": n,
        "n_augment_per_image": n_augment,
        "n_training_vectors": int(len(X)),
        "n_scenes": len(set(groups)),
        "cv": {
            "scheme": ("leave-one-scene-out" if 2 <= len(set(groups)) <= 10 else "5-fold") + " on the train split",
            "n_folds": len(folds),
            "out_of_fold": label_metrics(oof[sel] >= t_arr, Y[sel]) if sel.any() else None,
            "out_of_fold_augmented": label_metrics(oof[have & ~original] >= t_arr, Y[have & ~original])
            if (have & ~original).any() else None,
        },
        "train_fit": label_metrics(_proba(X[original], weights, calib) >= t_arr, Y[original]),
        "thresholds": thresholds,
        "thresholds_source": "out-of-fold cross-validation on the train split",
        "feature_config": cfg.to_dict(),
        "matched_filter_keep": dict(zip(CLASSES, keeps)),
        "hyperparameter_selection": selection or None,
        "timing_seconds": {"features": round(t_feat, 3), "total": round(train_time, 3)},
    }
    model = StockModel(reference=reference, weights=weights, calibration=calib, thresholds=thresholds,
                       config=cfg, metadata={"seed": seed, "n_images": n, "trainer": "LocalTrainer",
                                             "cv_out_of_fold": metrics["cv"]["out_of_fold"]})
    return model, metrics
