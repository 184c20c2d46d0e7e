"""Benchmark of the local stock model on the real Fischertechnik photos.

Prints one JSON object: training seconds, per-label accuracy and exact match on
the validation split, per-image predict time (JPEG bytes -> probabilities).
With ``--simulated N`` it also times training on N simulated frames (augmented
copies of the training photos). ``--perturbed K`` (default 10) also evaluates K
perturbed copies of each validation photo (``vision.perturb``: shift <= 8 px,
rotation <= 2.5 deg, scale +-4 %, contrast x0.7-1.3, brightness +-30, noise, JPEG
quality 40-90; a fixed seed); ``--perturbed-cv`` also reports the model-selection
figure that uses the train split only: leave-one-scene-out over the train scenes,
each held-out scene's perturbed copies predicted by a model fitted without it
(about 2.5 minutes). If the shared dataset is absent, prints a JSON message saying
so and exits 0.

    .venv/bin/python benchmarks/train_eval.py [--dataset DIR] [--seed 0] [--simulated 5000]
        [--perturbed 10] [--perturbed-cv]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATASET = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "fischertechnik-warehouse"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default=str(DEFAULT_DATASET))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--simulated", type=int, default=0, help="also time training on N simulated frames")
    ap.add_argument("--perturbed", type=int, default=10, help="perturbed copies per validation photo (0: skip)")
    ap.add_argument("--perturbed-cv", action="store_true",
                    help="also leave-one-scene-out on perturbed copies of the train scenes (train split only)")
    args = ap.parse_args(argv)
    dataset = Path(args.dataset)
    if not (dataset / "train-annots" / "train.lst").is_file():
        print(json.dumps({"skipped": True, "reason": f"dataset absent: {dataset.resolve()}"}))
        return 0

    import numpy as np

    from factory_assets.backends.local import LocalTrainer, evaluate
    from factory_assets.datasets.reading import load_image, read_split, scene_of
    from factory_assets.vision.features import augment
    from factory_assets.vision.fit import fit_stock_model

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = LocalTrainer().train(dataset, Path(tmp) / "model", seed=args.seed)
        train_s = time.perf_counter() - t0
    model = result.model
    report = evaluate(model, dataset, split="valid")

    image_dir, rows = read_split(dataset, "valid")
    blobs = [(image_dir / r.path).read_bytes() for r in rows]
    for b in blobs:  # warm-up
        model.predict_proba_bytes(b)
    times = []
    for _ in range(20):
        for b in blobs:
            t = time.perf_counter()
            model.predict_proba_bytes(b)
            times.append(1000 * (time.perf_counter() - t))
    out = {
        "model_version": model.version,
        "seed": args.seed,
        "train_seconds": round(train_s, 3),
        "n_train_images": result.metrics["n_images"],
        "cv_out_of_fold": {k: result.metrics["cv"]["out_of_fold"][k] for k in ("per_label_accuracy", "exact_match")},
        "cv_out_of_fold_augmented": {k: result.metrics["cv"]["out_of_fold_augmented"][k]
                                     for k in ("per_label_accuracy", "exact_match")},
        "hyperparameter_selection": result.metrics.get("hyperparameter_selection"),
        "valid_per_label_accuracy": report["per_label_accuracy"],
        "valid_exact_match": report["exact_match"],
        "valid_per_class_accuracy": report["accuracy"],
        "thresholds": model.thresholds,
        "predict_ms_per_image_p50": round(statistics.median(times), 3),
        "predict_ms_per_image_p95": round(float(np.percentile(times, 95)), 3),
    }
    if args.perturbed:
        from factory_assets.vocabulary import CLASSES
        from factory_assets.vision.perturb import perturbed_copies

        vdir, vrows = read_split(dataset, "valid")
        copies = perturbed_copies([load_image(vdir / r.path) for r in vrows], args.perturbed, seed=1000 + args.seed)
        pred, truth = [], []
        for r, imgs in zip(vrows, copies):
            pred += [[d[c] for c in CLASSES] for d in model.predict(imgs)]
            truth += [list(r.labels)] * len(imgs)
        pred, truth = np.array(pred).astype(int), np.array(truth)
        out["perturbed_valid"] = {"n_images": int(len(pred)), "per_label_accuracy": round(float((pred == truth).mean()), 4),
                                  "exact_match": round(float((pred == truth).all(axis=1).mean()), 4)}
    if args.perturbed_cv:
        from factory_assets.vocabulary import CLASSES
        from factory_assets.vision.perturb import perturbed_copies

        tdir, trows = read_split(dataset, "train")
        imgs = [load_image(tdir / r.path) for r in trows]
        y = np.array([r.labels for r in trows])
        groups = [scene_of(r.path) for r in trows]
        copies = perturbed_copies(imgs, 10, seed=7)
        pred, truth = [], []
        for g in sorted(set(groups)):
            fit = [i for i in range(len(trows)) if groups[i] != g]
            m, _ = fit_stock_model([imgs[i] for i in fit], y[fit], [groups[i] for i in fit], seed=args.seed)
            for i in (i for i in range(len(trows)) if groups[i] == g):
                pred += [[d[c] for c in CLASSES] for d in m.predict(copies[i])]
                truth += [list(y[i])] * len(copies[i])
        pred, truth = np.array(pred).astype(int), np.array(truth)
        out["perturbed_train_cv"] = {"scheme": "leave-one-scene-out on the train split, 10 perturbed copies each",
                                     "n_images": int(len(pred)),
                                     "per_label_accuracy": round(float((pred == truth).mean()), 4),
                                     "exact_match": round(float((pred == truth).all(axis=1).mean()), 4)}
    if args.simulated:
        tdir, trows = read_split(dataset, "train")
        base = [load_image(tdir / r.path) for r in trows]
        rng = np.random.default_rng(args.seed)
        idx = rng.integers(0, len(base), args.simulated)
        frames = [augment(base[i], rng) for i in idx]
        labels = np.array([trows[i].labels for i in idx])
        groups = [scene_of(trows[i].path) for i in idx]
        t0 = time.perf_counter()
        _, sim_metrics = fit_stock_model(frames, labels, groups, seed=args.seed)
        out["simulated"] = {"n_frames": args.simulated, "train_seconds": round(time.perf_counter() - t0, 2),
                            "n_augment_per_image": sim_metrics["n_augment_per_image"]}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
