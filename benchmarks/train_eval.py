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
(about 2.5 minutes). ``--hard-cv`` is the harder train-only harness the design was
chosen on: the same leave-one-scene-out, the held-out photos perturbed one type at a
time at the extremes of the issue's ranges (shift, rotation, scale, contrast,
brightness, noise, JPEG 40), all of them at once at random signs, only the geometric
or only the photometric ones at their extremes, and random copies at the issue's
ranges and at 1.5x them; per set per-label accuracy, exact match and errors per
class. ``--moved-cv`` is a third train-only harness, for a camera that was moved: the same
leave-one-scene-out, each held-out photo seen from a moved camera (zoom 0.85-1.1, shift
up to 15 px, rotation up to 2 deg; 4 copies) and those moves with the issue's
perturbations on top (18 copies). ``--far-cv`` is a fourth, for what differs on the
validation photos (a camera further away and to one side, paler colours): the same
leave-one-scene-out, each held-out photo seen by a camera zoomed out by 0.8-0.95 about a
random point, shifted to one side, with a horizontal perspective (keystone) change and a
small rotation, then its colours desaturated by 25-55 %, white balance shifted (channel
gains 0.88-1.12) and a veiling haze of 0-12 % (a pale, less saturated red); 4 copies
alone and 12 with the issue's perturbations (``vision.perturb``) on top, and as diagnostics
the geometry alone, the paler colours alone and the paler colours with the perturbations
(the set that shows the validation copies' signature, missed red pieces; a design chosen
on it, ``--option far=true``, still failed on the validation split, so the harness does not
capture everything that differs there). If the shared dataset is absent, prints a JSON
message saying so and exits 0.

    .venv/bin/python benchmarks/train_eval.py [--dataset DIR] [--seed 0] [--simulated 5000]
        [--perturbed 10] [--perturbed-cv] [--hard-cv] [--moved-cv] [--far-cv] [--robust]
        [--perturbed-seed S] [--option KEY=VALUE ...]

``--perturbed-seed`` sets the seed of the perturbed validation copies (default ``1000 + seed``).
``--option`` passes keyword arguments to every ``fit_stock_model`` of the run (e.g.
``--option far=true`` for the opt-in design; values are parsed as JSON).

``--robust`` trains every model of the run with ``fit_stock_model(robust=True)`` (the
design chosen on ``--hard-cv``; not the default, see docs/evaluations.md).
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
    ap.add_argument("--hard-cv", action="store_true",
                    help="also the per-perturbation-type leave-one-scene-out harness (train split only)")
    ap.add_argument("--moved-cv", action="store_true",
                    help="also leave-one-scene-out on held-out photos seen from a moved camera (train split only)")
    ap.add_argument("--far-cv", action="store_true",
                    help="also leave-one-scene-out on held-out photos seen from further away, paler (train split only)")
    ap.add_argument("--robust", action="store_true", help="fit_stock_model(robust=True) for every model")
    ap.add_argument("--perturbed-seed", type=int, default=None, help="seed of the perturbed valid copies (1000 + seed)")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="keyword argument for every fit_stock_model (value parsed as JSON)")
    args = ap.parse_args(argv)
    options = {}
    for opt in args.option:
        key, _, value = opt.partition("=")
        options[key] = json.loads(value)
    if args.robust:
        options["robust"] = True
    if options:
        import functools

        from factory_assets.vision import fit as fit_module

        fit_module.fit_stock_model = functools.partial(fit_module.fit_stock_model, **options)
        import factory_assets.backends.local as local_module

        local_module.fit_stock_model = fit_module.fit_stock_model
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
        "fit_options": options,
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
        pseed = 1000 + args.seed if args.perturbed_seed is None else args.perturbed_seed
        copies = perturbed_copies([load_image(vdir / r.path) for r in vrows], args.perturbed, seed=pseed)
        pred, truth = [], []
        for r, imgs in zip(vrows, copies):
            pred += [[d[c] for c in CLASSES] for d in model.predict(imgs)]
            truth += [list(r.labels)] * len(imgs)
        pred, truth = np.array(pred).astype(int), np.array(truth)
        out["perturbed_valid"] = {"seed": pseed, "n_images": int(len(pred)),
                                  "per_label_accuracy": round(float((pred == truth).mean()), 4),
                                  "exact_match": round(float((pred == truth).all(axis=1).mean()), 4),
                                  "errors": {c: int((pred[:, j] != truth[:, j]).sum()) for j, c in enumerate(CLASSES)}}
    if args.perturbed_cv:
        from factory_assets.backends.local import leave_one_scene_out
        from factory_assets.vision.perturb import perturbed_copies

        ok = leave_one_scene_out(dataset, lambda photos: [
            {"perturbed": c} for c in perturbed_copies(photos, 10, seed=7)], seed=args.seed)["perturbed"]
        out["perturbed_train_cv"] = {"scheme": "leave-one-scene-out on the train split, 10 perturbed copies each",
                                     "n_images": int(len(ok)),
                                     "per_label_accuracy": round(float(ok.mean()), 4),
                                     "exact_match": round(float(ok.all(axis=1).mean()), 4)}
    if args.hard_cv:
        out["hard_train_cv"] = hard_cv(dataset, args.seed)
    if args.moved_cv:
        out["moved_camera_train_cv"] = moved_cv(dataset, args.seed)
    if args.far_cv:
        out["far_camera_train_cv"] = far_cv(dataset, args.seed)
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


def _warp(img, dx=0.0, dy=0.0, angle=0.0, scale=1.0):
    import cv2

    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    m[:, 2] += (dx, dy)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _photometric(img, rng, contrast=1.0, bright=0.0, noise=0.0, quality=None):
    import cv2
    import numpy as np

    x = img.astype(np.float32)
    mean = float(x.mean())
    x = (x - mean) * contrast + mean + bright
    if noise:
        x += rng.normal(0.0, noise, x.shape).astype(np.float32)
    x = np.clip(x, 0, 255).astype(np.uint8)
    if quality:
        x = cv2.imdecode(cv2.imencode(".jpg", x, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])[1], cv2.IMREAD_COLOR)
    return x


def _hard_sets(img, rng) -> dict:
    """Perturbed copies of one photo per perturbation type (see the module docstring)."""
    from factory_assets.vision.perturb import perturb

    sign = lambda: float(rng.choice([-1.0, 1.0]))  # noqa: E731

    def scaled(k):  # the ranges times k
        x = _warp(img, *rng.uniform(-8 * k, 8 * k, 2), angle=rng.uniform(-2.5 * k, 2.5 * k),
                  scale=rng.uniform(1 - 0.04 * k, 1 + 0.04 * k))
        return _photometric(x, rng, rng.uniform(1 - 0.3 * k, 1 + 0.3 * k), rng.uniform(-30 * k, 30 * k),
                            rng.uniform(0, 6 * k), int(rng.integers(30, 91)))

    def geo():
        return _warp(img, 8 * sign(), 8 * sign(), 2.5 * sign(), 1 + 0.04 * sign())

    def photo(x):
        return _photometric(x, rng, float(rng.choice([0.7, 1.3])), 30 * sign(), 6.0, 40)

    return {
        "original": [img],
        "shift 8px": [_warp(img, dx, dy) for dx in (-8, 8) for dy in (-8, 8)],
        "rotation 2.5deg": [_warp(img, angle=a) for a in (-2.5, 2.5)],
        "scale 4%": [_warp(img, scale=s) for s in (0.96, 1.04)],
        "contrast x0.7/x1.3": [_photometric(img, rng, contrast=c) for c in (0.7, 1.3)],
        "brightness -30/+30": [_photometric(img, rng, bright=b) for b in (-30, 30)],
        "noise sigma 6": [_photometric(img, rng, noise=6.0) for _ in range(2)],
        "jpeg quality 40": [_photometric(img, rng, quality=40)],
        "issue ranges (vision.perturb)": [perturb(img, rng) for _ in range(10)],
        "1.5x the issue ranges": [scaled(1.5) for _ in range(10)],
        "all at extremes": [photo(geo()) for _ in range(10)],
        "geometric at extremes": [geo() for _ in range(6)],
        "photometric at extremes": [photo(img) for _ in range(6)],
    }


def hard_cv(dataset: Path, seed: int = 0) -> dict:
    """Leave one train scene out; per perturbation set, the held-out photos' copies scored."""
    import numpy as np

    return _scene_out_sets(dataset, seed, lambda imgs: [_hard_sets(im, np.random.default_rng(100 + i))
                                                          for i, im in enumerate(imgs)])


def _scene_out_sets(dataset: Path, seed: int, make_sets) -> dict:
    """``backends.local.leave_one_scene_out`` over the named sets ``make_sets(photos)``
    gives each photo; per set: per-label accuracy, exact match and errors per class."""
    from factory_assets.backends.local import leave_one_scene_out
    from factory_assets.vocabulary import CLASSES

    out = {}
    for k, a in leave_one_scene_out(dataset, make_sets, seed=seed).items():
        out[k] = {"n_images": int(len(a)), "per_label_accuracy": round(float(a.mean()), 4),
                  "exact_match": round(float(a.all(axis=1).mean()), 4),
                  "errors": {c: int((~a[:, j]).sum()) for j, c in enumerate(CLASSES)}}
    return out


MOVED_ZOOMS = (0.85, 0.9, 0.95, 1.1)  # the camera moved further away (< 1) or closer (> 1)
MOVED_PERTURBED_ZOOMS = (0.85, 0.88, 0.92, 0.95, 1.05, 1.1)


def _moved(img, rng, zoom):
    """The photo as a camera moved by ``zoom``, up to 15 px and up to 2 degrees would see it."""
    dx, dy = rng.uniform(-15.0, 15.0, 2)
    return _warp(img, dx, dy, angle=rng.uniform(-2.0, 2.0), scale=zoom)


def moved_cv(dataset: Path, seed: int = 0) -> dict:
    """Leave one train scene out; its photos seen from a moved camera, alone and perturbed."""
    import numpy as np

    from factory_assets.vision.perturb import perturb

    def make_sets(imgs):
        rng = np.random.default_rng(11)
        moved = [[_moved(im, rng, z) for z in MOVED_ZOOMS] for im in imgs]
        perturbed = [[perturb(_moved(im, rng, z), rng) for z in MOVED_PERTURBED_ZOOMS for _ in range(3)] for im in imgs]
        return [{"moved camera": m, "moved camera + the issue's perturbations": p} for m, p in zip(moved, perturbed)]

    return _scene_out_sets(dataset, seed, make_sets)


def _far_geometry(img, rng):
    """The photo as a camera further away and to one side would see it: zoom 0.8-0.95 about
    a random point of the central half, a shift of up to 12 px, a horizontal keystone (one
    side's height shrinks by 2-7 %), rotation up to 1.5 degrees."""
    import cv2
    import numpy as np

    h, w = img.shape[:2]
    zoom = rng.uniform(0.8, 0.95)
    cx, cy = rng.uniform(0.25 * w, 0.75 * w), rng.uniform(0.25 * h, 0.75 * h)
    m = cv2.getRotationMatrix2D((cx, cy), rng.uniform(-1.5, 1.5), zoom)
    m[:, 2] += rng.uniform(-12.0, 12.0, 2)
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = src @ m[:, :2].T.astype(np.float32) + m[:, 2].astype(np.float32)
    k = rng.uniform(0.02, 0.07) * h / 2 * zoom  # the far side's edge shrinks towards its middle
    if rng.random() < 0.5:
        dst[1, 1] += k
        dst[2, 1] -= k
    else:
        dst[0, 1] += k
        dst[3, 1] -= k
    p = cv2.getPerspectiveTransform(src, dst.astype(np.float32))
    return cv2.warpPerspective(img, p, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _pale(img, rng):
    """Paler, less saturated colours: 25-55 % desaturation, channel gains 0.88-1.12 (white
    balance) and a veiling haze of 0-12 %."""
    import numpy as np

    x = img.astype(np.float32)
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * (1.0 - rng.uniform(0.25, 0.55))
    x = x * rng.uniform(0.88, 1.12, 3).astype(np.float32)
    haze = rng.uniform(0.0, 0.12)
    x = x * (1.0 - haze) + 255.0 * haze
    return np.clip(x, 0, 255).astype(np.uint8)


def _far(img, rng):
    """Further away and to one side (``_far_geometry``), with paler colours (``_pale``)."""
    return _pale(_far_geometry(img, rng), rng)


def far_sets(imgs) -> list[dict]:
    """Per photo: 4 far-camera, pale copies alone, 12 with the issue's perturbations on top;
    as diagnostics, 4 with only the geometry, 4 with only the paler colours and 12 with the
    paler colours and the issue's perturbations (no move)."""
    import numpy as np

    from factory_assets.vision.perturb import perturb

    rng = np.random.default_rng(21)
    out = []
    for im in imgs:
        d = {"far camera, pale": [_far(im, rng) for _ in range(4)]}
        d["far camera, pale + the issue's perturbations"] = [perturb(_far(im, rng), rng) for _ in range(12)]
        d["far camera only (geometry)"] = [_far_geometry(im, rng) for _ in range(4)]
        d["pale colours only"] = [_pale(im, rng) for _ in range(4)]
        d["pale colours + the issue's perturbations"] = [perturb(_pale(im, rng), rng) for _ in range(12)]
        out.append(d)
    return out


def far_cv(dataset: Path, seed: int = 0) -> dict:
    """Leave one train scene out; its photos seen from further away and to one side, paler."""
    return _scene_out_sets(dataset, seed, far_sets)


if __name__ == "__main__":
    sys.exit(main())
