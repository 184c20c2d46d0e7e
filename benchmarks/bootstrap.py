"""Bootstrap quality: how soon the first model is deployed on a fresh `make run`, and how
often each deployed model agrees with the controller over the first 15 minutes.

Replays the simulated factory of `make run` in process (seed 0, 2 frames/s, the rates `up`
gives the simulator: ``--change-every``, ``--time-scale``; pieces arriving at its input,
another customer's orders; each stock change reported before the crane moves, the rack
changing after the crane's travel; the stock reported on events only) with the platform's
own rules:

- readiness (``twin.drift.readiness_of``, as ``bootstrap_model_sensor`` every
  ``--sensor-interval`` s): the stretches auto-labels label (``datasets.autolabel.stable_spans``:
  outside every reported change's settle time, ``--settle``, default ``FACTORY_SETTLE_S`` = 25 s,
  and up to where the factory was heard: its last ``f/i`` message, or its frames 10 s later),
  split as ``training_manifests`` splits them (whole stock situations, the 2nd, 7th... to
  validation, remembered across retrainings);
- the dataset of those frames labelled with the *reported* stock, the real trainer
  (``LocalTrainer`` picks the per-slot model from the ``.slots`` sidecar when the rack can be
  placed), the blocking check (per-label accuracy >= 0.90 on validation);
- drift retraining (``twin.drift``: the latest 100 stable frames; a per-slot model slot by
  slot, a presence model on colour presence; more than 20% differing).

The Dagster run itself (launch, labelling, manifests, endpoint swap) is not replayed:
``--run-overhead`` seconds (default 60) are added to the measured training time.

Agreement is measured as the twin flags disagreements: each inference against the
controller's latest ``f/i/stock`` on stable frames (outside every change's settle time);
exact = all three colours agree. ``agreement_exact_including_transit`` counts every frame.
Per-slot accuracy is on stable frames the model did not train on.

    .venv/bin/python benchmarks/bootstrap.py [--minutes 15] [--seed 0] [--change-every S] [--time-scale X]

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIN_PER_LABEL = 0.90
T0 = datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc)


def main(argv=None) -> int:
    import cv2

    from factory_assets.backends.local import LocalTrainer, evaluate
    from factory_assets.cli.up import SIMULATOR_CHANGE_EVERY_S, SIMULATOR_TIME_SCALE
    from factory_assets.config import settle_seconds
    from factory_assets.datasets.autolabel import FRAME_EVIDENCE_LAG_S, stable_spans
    from factory_assets.datasets.lst import LstRow, format_slots, write_lst
    from factory_assets.simulation.factory import FactorySimulator, Timings
    from factory_assets.twin.drift import (DRIFT_MAX_DISAGREEMENT, DRIFT_WINDOW, STABLE_MARGIN_S, Situation,
                                           planned_splits, readiness_of, situation_key)
    from factory_assets.vocabulary import CLASSES, CRANE_TRAVEL_S, SLOTS, STOCK_TOPIC, TYPE_TO_STATE, reported_presence

    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--change-every", type=float, default=SIMULATOR_CHANGE_EVERY_S)
    ap.add_argument("--time-scale", type=float, default=SIMULATOR_TIME_SCALE)
    ap.add_argument("--run-overhead", type=float, default=60.0)
    ap.add_argument("--sensor-interval", type=float, default=15.0, help="bootstrap_model_sensor's interval")
    ap.add_argument("--settle", type=float, default=None,
                    help="settle time after a reported change, s (default: FACTORY_SETTLE_S or 25)")
    args = ap.parse_args(argv)
    settle = settle_seconds() if args.settle is None else args.settle
    margin = STABLE_MARGIN_S
    at = lambda t: T0 + timedelta(seconds=t)  # noqa: E731

    crane = tuple(s / args.time_scale for s in CRANE_TRAVEL_S)  # the crane as modelled, as `up` gives it
    sim = FactorySimulator(seed=args.seed, change_every_s=args.change_every, start=T0,
                           timings=Timings(scale=args.time_scale, crane_travel_s=crane))
    horizon = args.minutes * 60.0
    frames = []  # (t, jpeg, the stock the controller reports at t, the rack the jpeg shows)
    reports = []  # (t, slots) of every f/i/stock
    heard_msgs = []  # t of every f/i message (the controller's QoS 1 messages)
    t = 0.0
    while t < horizon:
        jpeg, shown = sim.frame(t)
        while sim.outbox:
            m = sim.outbox.popleft()
            if m.topic.startswith("f/i/"):
                heard_msgs.append(m.t)
            if m.topic == STOCK_TOPIC:
                reports.append((m.t, dict(m.stock)))
        frames.append((t, jpeg, dict(sim.stock), shown))
        t += 1.0 / args.fps
    frame_t = np.array([f[0] for f in frames])

    def spans_at(now: float | None):
        """The stretches auto-labels label at ``now`` (None: with everything known, for the figures)."""
        known = [(at(rt), s) for rt, s in reports if now is None or rt <= now]
        if now is None:
            return stable_spans(known, None, settle_s=settle, margin_s=margin)
        last_msg = max((m for m in heard_msgs if m <= now), default=None)
        newest = frame_t[frame_t <= now].max() if (frame_t <= now).any() else None
        heard = max(x for x in (last_msg, None if newest is None else newest - FRAME_EVIDENCE_LAG_S)
                    if x is not None)
        return stable_spans(known, at(heard), settle_s=settle, margin_s=margin)

    def labelled_at(now: float | None):
        """frame index -> the reported slots it is labelled with, in order of frame time."""
        out = {}
        for lo, hi, slots in spans_at(now):
            lo_s, hi_s = (lo - T0).total_seconds(), (hi - T0).total_seconds()
            for i in np.nonzero((frame_t > lo_s) & (frame_t < hi_s) & (frame_t <= (now if now is not None
                                                                                   else horizon)))[0]:
                out[int(i)] = slots
        return dict(sorted(out.items()))

    final_labelled = labelled_at(None)  # stable frames with everything known
    stable_frames = set(final_labelled)
    split_state = {"known": {}, "counter": 0}

    def situations_at(now: float):
        labelled = labelled_at(now)
        keys = list(dict.fromkeys(situation_key(s) for s in labelled.values()))
        splits = planned_splits(keys, split_state["known"], split_state["counter"])
        counts = {}
        for slots in labelled.values():
            counts.setdefault(situation_key(slots), [slots, 0])[1] += 1
        return labelled, keys, splits, [Situation(s, n, splits[k]) for k, (s, n) in counts.items()]

    def train_at(now: float, root: Path, k: int):
        labelled, keys, splits, _ = situations_at(now)
        # the dataset stores the situations' splits (dataset_situations) for later runs
        new = [key for key in keys if key not in split_state["known"]]
        split_state["known"].update(splits)
        split_state["counter"] += len(new)
        ds = root / f"ds{k}"
        for split in ("train", "valid"):
            rows, slot_rows = [], []
            (ds / f"{split}-imgs").mkdir(parents=True, exist_ok=True)
            for i, slots in labelled.items():
                if splits[situation_key(slots)] != split:
                    continue
                name = f"{i:05d}.jpg"
                (ds / f"{split}-imgs" / name).write_bytes(frames[i][1])
                p = reported_presence(slots)
                rows.append(LstRow(len(rows) + 1, tuple(int(p[c]) for c in CLASSES), name))
                slot_rows.append((len(rows), slots, name))
            if not rows:
                return None, None, labelled
            write_lst(ds / f"{split}-annots" / f"{split}.lst", rows)
            (ds / f"{split}-annots" / f"{split}.slots").write_text(format_slots(slot_rows))
        t0 = time.perf_counter()
        result = LocalTrainer().train(ds, root / f"m{k}", seed=0)
        train_s = time.perf_counter() - t0
        return result, (train_s, evaluate(result.model, ds, "valid")), labelled

    decode = lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)  # noqa: E731
    versions, deployed, pending, first_deploy, ticks = [], None, None, None, []
    transit = {"compared": 0, "agree": 0}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        k = 0
        next_tick = args.sensor_interval
        recent: list = []  # (frame index, disagreement share) of the deployed model's inferences
        for i, (ft, jpeg, stock, _shown) in enumerate(frames):
            if pending and ft >= pending["live_at"]:
                deployed, pending, recent = pending, None, []
                versions.append(deployed["entry"])
                first_deploy = first_deploy if first_deploy is not None else ft
            if ft >= next_tick:
                next_tick += args.sensor_interval
                drifted = False
                if deployed:  # twin.drift: stable by the changes reported so far, the latest 100 of them
                    known = [(rt, s) for rt, s in reports if rt <= ft]
                    changes = np.array([rt for k2, (rt, s) in enumerate(known) if k2 and s != known[k2 - 1][1]])
                    window = [share for j, share in recent
                              if not ((changes >= frames[j][0] - max(settle, margin))
                                      & (changes <= frames[j][0] + margin)).any()][-DRIFT_WINDOW:]
                    drifted = len(window) >= DRIFT_WINDOW and float(np.mean(window)) > DRIFT_MAX_DISAGREEMENT
                readiness = None
                if not deployed and not pending:
                    readiness = readiness_of(situations_at(ft)[3])
                    ticks.append({"t": round(ft, 1), "ready": readiness.ready, "model": readiness.model,
                                  "train_frames": readiness.train_frames, "valid_frames": readiness.valid_frames,
                                  "slots_varied": list(readiness.slots_varied),
                                  "slots_held": list(readiness.slots_held)})
                if not pending and ((readiness is not None and readiness.ready) or drifted):
                    k += 1
                    result, info, labelled = train_at(ft, root, k)
                    if result is not None:
                        train_s, report = info
                        passed = report["per_label_accuracy"] >= MIN_PER_LABEL
                        entry = {"version": result.version, "kind": result.metrics["model_kind"],
                                 "reason": "drift" if drifted else "bootstrap",
                                 "triggered_at_s": round(ft, 1), "train_seconds": round(train_s, 2),
                                 "deployed_at_s": round(ft + args.run_overhead + train_s, 1) if passed else None,
                                 "train_frames": result.metrics["n_images"], "valid_frames": report["n_images"],
                                 "valid_per_label": round(report["per_label_accuracy"], 4),
                                 "valid_slot_accuracy": round((report.get("slots") or {}).get("slot_accuracy",
                                                                                              float("nan")), 4),
                                 "passed_checks": passed, "compared": 0, "agree": 0, "slots_compared": 0,
                                 "slots_right": 0, "compared_including_transit": 0, "agree_including_transit": 0}
                        if passed:
                            pending = {"model": result.model, "live_at": ft + args.run_overhead + train_s,
                                       "entry": entry, "trained_on": set(labelled)}
                        else:
                            versions.append(entry)
            if deployed:
                e, model = deployed["entry"], deployed["model"]
                img = decode(jpeg)
                if getattr(model, "kind", "presence") == "slots":
                    sp = model.predict_slot_proba([img])
                    proba = model.presence_from_slots(sp)[0]
                    pred_states = sp[0].argmax(axis=-1)
                else:
                    proba, pred_states = model.predict_proba([img])[0], None
                pred = {c: bool(p >= model.thresholds[c]) for c, p in zip(CLASSES, proba)}
                ok = pred == reported_presence(stock)
                truth = np.array([TYPE_TO_STATE.get(stock[s] or "", 0) for s in SLOTS])
                share = float((pred_states != truth).mean()) if pred_states is not None else float(not ok)
                recent.append((i, share))
                transit["compared"] += 1
                transit["agree"] += ok
                e["compared_including_transit"] += 1
                e["agree_including_transit"] += ok
                if i in stable_frames:
                    e["compared"] += 1
                    e["agree"] += ok
                    if pred_states is not None and i not in deployed["trained_on"]:
                        e["slots_compared"] += len(SLOTS)
                        e["slots_right"] += int((pred_states == truth).sum())
    out_versions = []
    for e in versions:
        e = dict(e)
        e["agreement_exact"] = round(e["agree"] / e["compared"], 4) if e["compared"] else None
        e["agreement_exact_including_transit"] = round(e["agree_including_transit"]
                                                       / e["compared_including_transit"], 4) \
            if e["compared_including_transit"] else None
        e["per_slot_accuracy_unseen_frames"] = round(e["slots_right"] / e["slots_compared"], 4) \
            if e["slots_compared"] else None
        out_versions.append(e)
    total_c = sum(e["compared"] for e in versions)
    total_a = sum(e["agree"] for e in versions)
    slots_c = sum(e["slots_compared"] for e in versions)
    first_ready = next((tk for tk in ticks if tk["ready"]), None)
    print(json.dumps({
        "benchmark": "bootstrap", "seed": args.seed, "minutes": args.minutes, "fps": args.fps,
        "change_every_s": args.change_every, "time_scale": args.time_scale,
        "run_overhead_s_assumed": args.run_overhead, "sensor_interval_s": args.sensor_interval,
        "settle_s": settle, "load_average": [round(x, 2) for x in os.getloadavg()],
        "stock_changes": len(sim.changes), "stock_reports": len(reports), "frames": len(frames),
        "pieces_arrived": sim.arrived, "orders_taken": sim.accepted_orders,
        "frames_showing_another_rack_than_reported": sum(f[3] != f[2] for f in frames),
        "stable_frames": len(stable_frames),
        "first_ready": first_ready,
        "sensor_ticks_until_ready": ticks[:ticks.index(first_ready) + 1] if first_ready else ticks,
        "time_to_first_model_s": round(first_deploy, 1) if first_deploy is not None else None,
        "time_to_first_model_min": round(first_deploy / 60, 2) if first_deploy is not None else None,
        "agreement_exact_all_versions": round(total_a / total_c, 4) if total_c else None,
        "agreement_exact_including_transit": round(transit["agree"] / transit["compared"], 4)
        if transit["compared"] else None,
        "per_slot_accuracy_unseen_frames": round(sum(e["slots_right"] for e in versions) / slots_c, 4)
        if slots_c else None,
        "versions": out_versions,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
