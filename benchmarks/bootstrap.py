"""Bootstrap quality: how soon the first model is deployed on a fresh `make run`, and how
often each deployed model agrees with the controller over the first 15 minutes.

Replays the simulated factory of `make run` (seed 0, 2 frames/s, the factory looking for
work about every 6 s: pieces arriving at its input, another customer's orders; each stock
change reported before the crane moves, the rack changing 6-18 s later) in process, with the
platform's own rules: the bootstrap sensor's readiness (``twin.drift``), auto-labels from the
reported stock only on *stable* frames (no reported change from 2 s after the frame back to
the settle time before it, ``--settle``, default ``FACTORY_SETTLE_S`` = 25 s), the validation split that holds out whole
stock situations (``datasets.manifests``: the 2nd, 7th... situation), the real trainer
(``LocalTrainer`` picks the per-slot model from the ``.slots`` sidecar), the blocking
check (per-label accuracy >= 0.90 on that split) and drift retraining (> 20% of the
latest 100 frames disagree). The Dagster run itself (launch, labelling, manifests,
endpoint swap) is not replayed: ``--run-overhead`` seconds (default 60, what a retrain
run takes besides training on this machine) are added to the measured training time.

Agreement is measured as the twin flags disagreements: each inference compared with the
controller's latest ``f/i/stock`` report, on stable frames only (the transit window after a
reported change is excluded the same way); exact = all three colours agree. Drift counts
stable frames only too. ``agreement_exact_including_transit`` counts every frame, to show
what the crane's travel would cost. Per-slot accuracy is on frames the model did not train on.

    .venv/bin/python benchmarks/bootstrap.py [--minutes 15] [--seed 0] [--run-overhead 60] [--settle 25]

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SENSOR_INTERVAL = 30.0
DRIFT_WINDOW, DRIFT_MAX = 100, 0.20
MIN_PER_LABEL = 0.90


def main(argv=None) -> int:
    import cv2

    from factory_assets.datasets.lst import LstRow, format_slots, write_lst
    from factory_assets.simulation.factory import FactorySimulator
    from factory_assets.twin.drift import BOOTSTRAP_MIN_FRAMES, BOOTSTRAP_MIN_SITUATIONS, BOOTSTRAP_MIN_SLOTS_VARIED
    from factory_assets.twin.state import reported_presence
    from factory_assets.vocabulary import CLASSES, SLOTS, TYPE_TO_STATE
    from factory_assets.backends.local import LocalTrainer, evaluate

    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--change-every", type=float, default=6.0)
    ap.add_argument("--run-overhead", type=float, default=60.0)
    ap.add_argument("--settle", type=float, default=None,
                    help="settle time after a reported change, s (default: FACTORY_SETTLE_S or 25)")
    args = ap.parse_args(argv)
    from factory_assets.config import settle_seconds

    settle = settle_seconds() if args.settle is None else args.settle

    sim = FactorySimulator(seed=args.seed, change_every_s=args.change_every)
    horizon = args.minutes * 60.0
    frames = []  # (t, jpeg, the stock the controller reports at t); the jpeg shows the rack as it is
    shown_differs = 0
    t = 0.0
    while t < horizon:
        jpeg, shown = sim.frame(t)
        frames.append((t, jpeg, dict(sim.stock)))
        shown_differs += shown != sim.stock
        t += 1.0 / args.fps
    change_times = np.array([c.t for c in sim.changes])  # when each change was *reported*

    def stable(t: float) -> bool:  # no change reported from 2 s after t back to the settle time before it
        return not len(change_times) or not np.any((change_times >= t - max(settle, 2.0)) & (change_times <= t + 2.0))

    def presence(stock: dict) -> dict:
        return reported_presence(stock)

    def situations_until(t: float):
        seen = [f for f in frames if f[0] <= t]
        return seen

    def ready(t: float) -> bool:
        seen = situations_until(t)
        if len(seen) < BOOTSTRAP_MIN_FRAMES:
            return False
        sits = {tuple(sorted(s.items(), key=lambda kv: kv[0])) for _, _, s in seen}
        filled = {slot: {s[slot] is not None for _, _, s in seen} for slot in SLOTS}
        colours = {c: {presence(s)[c] for _, _, s in seen} for c in CLASSES}
        return len(sits) >= BOOTSTRAP_MIN_SITUATIONS and (
            sum(len(v) == 2 for v in colours.values()) == 3
            or sum(len(v) == 2 for v in filled.values()) >= BOOTSTRAP_MIN_SLOTS_VARIED)

    def situation(stock: dict) -> str:
        return ",".join(f"{s}={stock.get(s) or '-'}" for s in SLOTS)

    def train_at(t: float, root: Path, k: int):
        """Dataset of the stable frames labelled by t (2 s margin), situation-held-out split; train."""
        labelled = [f for f in frames if f[0] <= t - 2.0 and stable(f[0])]
        order = list(dict.fromkeys(situation(s) for _, _, s in labelled))
        split_of = {key: ("valid" if (i + 1) % 5 == 2 else "train") for i, key in enumerate(order)}
        ds = root / f"ds{k}"
        for split in ("train", "valid"):
            rows, slot_rows = [], []
            (ds / f"{split}-imgs").mkdir(parents=True, exist_ok=True)
            for i, (ft, jpeg, stock) in enumerate(labelled):
                if split_of[situation(stock)] != split:
                    continue
                name = f"{i:05d}.jpg"
                (ds / f"{split}-imgs" / name).write_bytes(jpeg)
                p = presence(stock)
                rows.append(LstRow(len(rows) + 1, tuple(int(p[c]) for c in CLASSES), name))
                slot_rows.append((len(rows), stock, name))
            if not rows:
                return None, None, len(labelled)
            write_lst(ds / f"{split}-annots" / f"{split}.lst", rows)
            (ds / f"{split}-annots" / f"{split}.slots").write_text(format_slots(slot_rows))
        t0 = time.perf_counter()
        result = LocalTrainer().train(ds, root / f"m{k}", seed=0)
        train_s = time.perf_counter() - t0
        report = evaluate(result.model, ds, "valid")
        return result, (train_s, report), max(f[0] for f in labelled)

    decode = lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)  # noqa: E731
    versions, deployed, pending = [], None, None
    first_deploy = None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        k = 0
        i = 0
        next_tick = SENSOR_INTERVAL
        recent: list[bool] = []
        transit = {"compared": 0, "agree": 0}
        while i < len(frames):
            ft, jpeg, stock = frames[i]
            if pending and ft >= pending["live_at"]:
                deployed, pending, recent = pending, None, []
                versions.append(deployed["entry"])
                first_deploy = first_deploy if first_deploy is not None else ft
            if ft >= next_tick:
                next_tick += SENSOR_INTERVAL
                drifted = deployed and len(recent) >= DRIFT_WINDOW and \
                    (1 - np.mean(recent[-DRIFT_WINDOW:])) > DRIFT_MAX
                if not pending and ((not deployed and ready(ft)) or drifted):
                    k += 1
                    result, info, last_labelled = train_at(ft, root, k)
                    if result is not None:
                        train_s, report = info
                        passed = report["per_label_accuracy"] >= MIN_PER_LABEL
                        entry = {"version": result.version, "kind": result.metrics["model_kind"],
                                 "triggered_at_s": round(ft, 1), "train_seconds": round(train_s, 2),
                                 "deployed_at_s": round(ft + args.run_overhead + train_s, 1) if passed else None,
                                 "train_frames": result.metrics["n_images"],
                                 "valid_frames": report["n_images"],
                                 "valid_per_label": round(report["per_label_accuracy"], 4),
                                 "valid_slot_accuracy": round((report.get("slots") or {}).get("slot_accuracy", float("nan")), 4),
                                 "passed_checks": passed, "compared": 0, "agree": 0, "slots_compared": 0, "slots_right": 0,
                                 "compared_including_transit": 0, "agree_including_transit": 0}
                        if passed:
                            pending = {"model": result.model, "live_at": ft + args.run_overhead + train_s,
                                       "entry": entry, "trained_until": last_labelled}
                        else:
                            versions.append(entry)
            if deployed:
                e = deployed["entry"]
                model = deployed["model"]
                img = decode(jpeg)
                if getattr(model, "kind", "presence") == "slots":
                    sp = model.predict_slot_proba([img])
                    proba = model.presence_from_slots(sp)[0]
                    pred_states = sp[0].argmax(axis=-1)
                else:
                    proba, pred_states = model.predict_proba([img])[0], None
                pred = {c: bool(p >= model.thresholds[c]) for c, p in zip(CLASSES, proba)}
                ok = pred == presence(stock)
                transit["compared"] += 1
                transit["agree"] += ok
                e["compared_including_transit"] += 1
                e["agree_including_transit"] += ok
                if stable(ft):
                    recent.append(ok)  # drift compares stable frames only (twin.drift)
                    e["compared"] += 1
                    e["agree"] += ok
                    if pred_states is not None and ft > deployed["trained_until"]:
                        truth = np.array([TYPE_TO_STATE.get(stock[s] or "", 0) for s in SLOTS])
                        e["slots_compared"] += len(SLOTS)
                        e["slots_right"] += int((pred_states == truth).sum())
            i += 1
    out_versions = []
    for e in versions:
        e = dict(e)
        e["agreement_exact"] = round(e["agree"] / e["compared"], 4) if e["compared"] else None
        e["agreement_exact_including_transit"] = round(e["agree_including_transit"] / e["compared_including_transit"], 4) \
            if e["compared_including_transit"] else None
        e["per_slot_accuracy_unseen_frames"] = round(e["slots_right"] / e["slots_compared"], 4) if e["slots_compared"] else None
        out_versions.append(e)
    total_c = sum(e["compared"] for e in versions)
    total_a = sum(e["agree"] for e in versions)
    slots_c = sum(e["slots_compared"] for e in versions)
    print(json.dumps({
        "benchmark": "bootstrap", "seed": args.seed, "minutes": args.minutes, "fps": args.fps,
        "change_every_s": args.change_every, "run_overhead_s_assumed": args.run_overhead,
        "settle_s": settle, "stock_changes": len(sim.changes), "frames": len(frames),
        "frames_showing_another_rack_than_reported": shown_differs,
        "stable_frames": sum(stable(f[0]) for f in frames),
        "time_to_first_model_s": round(first_deploy, 1) if first_deploy is not None else None,
        "time_to_first_model_min": round(first_deploy / 60, 2) if first_deploy is not None else None,
        "agreement_exact_all_versions": round(total_a / total_c, 4) if total_c else None,
        "agreement_exact_including_transit": round(transit["agree"] / transit["compared"], 4)
        if transit["compared"] else None,
        "per_slot_accuracy_unseen_frames": round(sum(e["slots_right"] for e in versions) / slots_c, 4) if slots_c else None,
        "versions": out_versions,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
