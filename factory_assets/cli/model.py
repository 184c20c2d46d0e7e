"""``train`` and ``evaluate`` subcommands for the stock model.

The main ``factory_assets`` CLI calls ``register(subparsers)``; ``main`` runs the
two commands standalone: ``python -m factory_assets.cli.model train ...``.
Heavy imports (cv2, sklearn) happen inside the command functions.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_train(args: argparse.Namespace) -> int:
    from factory_assets.backends.local import DatasetError, LocalTrainer

    try:
        result = LocalTrainer().train(Path(args.dataset), Path(args.out), seed=args.seed)
    except (DatasetError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    m = result.metrics
    oof = m["cv"]["out_of_fold"] or {}
    print(f"trained stock model {result.version} ({m.get('model_kind', 'presence')}) on {m['n_images']} images "
          f"in {m['timing_seconds']['total']:.1f} s (seed {m['seed']})")
    if oof:
        print(f"cross-validation ({m['cv']['scheme']}): per-label accuracy {oof['per_label_accuracy']:.3f}, "
              f"exact match {oof['exact_match']:.3f}")
    if m.get("geometry"):
        print("slot geometry learned from the labelled frames: "
              + ", ".join(f"{s} ({x:.0f}, {y:.0f})" for s, (x, y) in result.model.geometry.in_image().items()))
    print("thresholds: " + ", ".join(f"{c}={t:.3f}" for c, t in m["thresholds"].items()))
    print(f"wrote {result.artifact_path}, {result.model_dir / 'metrics.json'}, {result.model_dir / 'MODEL_CARD.md'}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from factory_assets.backends.local import evaluate
    from factory_assets.vision.model import ModelFormatError, StockModel
    from factory_assets.datasets.reading import DatasetError

    try:
        model = StockModel.load(Path(args.model))
        report = evaluate(model, Path(args.dataset), split=args.split)
    except (DatasetError, ModelFormatError, FileNotFoundError) as exc:
        if args.json:
            print(json.dumps({"error": str(exc)}))
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, sort_keys=True))
        return 0
    print(f"model {report['model_version']} ({report.get('model_kind', 'presence')}) on {report['split']} "
          f"({report['n_images']} images): per-label accuracy {report['per_label_accuracy']:.3f}, "
          f"exact match {report['exact_match']:.3f}")
    if report.get("slots"):
        sl = report["slots"]
        print(f"  slots: accuracy {sl['slot_accuracy']:.3f}, frames with all nine right "
              f"{sl['frames_all_slots_right']:.3f} ({sl['n_images']} frames with slot labels)")
    for c, pc in report["per_class"].items():
        print(f"  {c:6s} acc {pc['accuracy']:.3f}  P {pc['precision']:.3f}  R {pc['recall']:.3f}  F1 {pc['f1']:.3f}  "
              f"tp {pc['tp']} fp {pc['fp']} tn {pc['tn']} fn {pc['fn']}  threshold {report['thresholds'][c]:.3f}")
    return 0


def register(subparsers) -> None:
    """Add ``train`` and ``evaluate`` to an ``argparse`` subparsers object."""
    p = subparsers.add_parser("train", help="train the local stock model on a dataset's train split")
    p.add_argument("--dataset", required=True, help="dataset folder (train-imgs/, train-annots/train.lst, ...)")
    p.add_argument("--out", required=True, help="model folder to write (artifact, metrics.json, MODEL_CARD.md)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_train)

    e = subparsers.add_parser("evaluate", help="evaluate a stock model on a dataset split")
    e.add_argument("--model", required=True, help="model folder written by 'train'")
    e.add_argument("--dataset", required=True, help="dataset folder")
    e.add_argument("--split", default="valid", help="split to evaluate (default: valid)")
    e.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    e.set_defaults(func=_cmd_evaluate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="factory-assets-vision", description="stock model: train / evaluate")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
