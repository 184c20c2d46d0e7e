"""Automatic labels from stock reports, manual labels, priorities and sticky splits."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from factory_assets.datasets.autolabel import auto_label
from factory_assets.datasets.labels import LabelError, effective_labels, label_from_csv, label_manually
from factory_assets.datasets.manifests import assign_splits, build_dataset
from factory_assets.ingest.service import Ingestor
from factory_assets.simulation.factory import FactorySimulator
from factory_assets.twin.state import reported_presence

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=timezone.utc)


def simulate_day(fdb, seconds: int = 120, start: datetime = T0, seed: int = 4, change_every: float = 15.0):
    """Frames every second and the controller's stock reports (on change and every 5 s),
    ingested like MQTT messages. Returns ground truth per frame ts and the change times."""
    sim = FactorySimulator(seed=seed, change_every_s=change_every, start=start)
    ing = Ingestor(fdb)
    truth, changes = {}, []
    next_report = 0.0
    for t in range(seconds):
        ts = start + timedelta(seconds=t)
        before = dict(sim.stock)
        msg, stock = sim.camera_message(ts)
        if stock != before or t == 0:
            changes.append(ts)
            ing.handle_mqtt("f/i/stock", __import__("json").dumps(sim.stock_message(ts)).encode())
            next_report = t + 5
        elif t >= next_report:
            ing.handle_mqtt("f/i/stock", __import__("json").dumps(sim.stock_message(ts)).encode())
            next_report = t + 5
        ing.handle_mqtt("i/cam", __import__("json").dumps(msg).encode())
        truth[ts] = reported_presence(stock)
    ing.flush()
    return truth, changes


def test_auto_labels_match_the_ground_truth_and_skip_frames_taken_while_stock_changed(fdb):
    truth, changes = simulate_day(fdb)
    summary = auto_label(fdb, T0, T0 + timedelta(days=1), window_s=30, margin_s=2)
    labels = {lab["frame_ts"]: lab for lab in effective_labels(fdb)}
    assert summary.labelled == len(labels) > 60
    assert all(lab["present"] == truth[ts] for ts, lab in labels.items())
    near_change = {ts for ts in truth for c in changes[1:] if abs((ts - c).total_seconds()) <= 2}
    assert near_change and not (near_change & set(labels))
    assert summary.unstable >= len(near_change)
    assert all(set(lab["slots"]) == {f"{r}{c}" for r in "ABC" for c in "123"} for lab in labels.values())
    # running again changes nothing
    auto_label(fdb, T0, T0 + timedelta(days=1))
    assert fdb.labels.count_documents({}) == len(labels)


def test_frames_without_a_recent_report_or_not_yet_confirmed_are_not_labelled(fdb):
    simulate_day(fdb, seconds=20)
    fdb.mqtt.delete_many({"topic": "f/i/stock", "ts": {"$gt": T0 + timedelta(seconds=12)}})
    summary = auto_label(fdb, T0, T0 + timedelta(days=1), window_s=30, margin_s=2)
    # the last report is at ~10 s: frames after 8 s have no report confirming them afterwards
    assert summary.unconfirmed > 0
    assert all(lab["frame_ts"] <= T0 + timedelta(seconds=10) for lab in effective_labels(fdb))


def test_manual_beats_imported_beats_automatic(fdb):
    simulate_day(fdb, seconds=30)
    auto_label(fdb, T0, T0 + timedelta(days=1))
    lab = effective_labels(fdb)[0]
    frame_id = str(lab["frame_id"])
    flipped = {c: not v for c, v in lab["present"].items()}
    label_manually(fdb, frame_id, flipped, user="alice")
    best = [d for d in effective_labels(fdb) if str(d["frame_id"]) == frame_id][0]
    assert best["source"] == "manual" and best["present"] == flipped
    assert fdb.labels.count_documents({"frame_id": lab["frame_id"]}) == 2  # the auto label is kept


def test_manual_labels_refuse_unknown_frames_and_colours(fdb):
    with pytest.raises(LabelError, match="no frame"):
        label_manually(fdb, "0123456789abcdef01234567", {"blue": True})
    from factory_assets.datasets.labels import parse_present

    with pytest.raises(LabelError, match="unknown colour"):
        parse_present("blue,green")


def test_a_csv_with_one_bad_line_writes_nothing_and_names_the_line(fdb, tmp_path):
    simulate_day(fdb, seconds=5)
    ids = [str(f["_id"]) for f in fdb.frames.find({}, {"_id": 1})]
    path = tmp_path / "labels.csv"
    path.write_text(f"frame_id,blue,red,white\n{ids[0]},1,0,0\n{ids[1]},1,2,0\n")
    with pytest.raises(LabelError, match=r"labels.csv:3: red must be 0 or 1"):
        label_from_csv(fdb, path)
    assert fdb.labels.count_documents({"source": "manual"}) == 0
    path.write_text(f"frame_id,present\n{ids[0]},blue;white\n{ids[1]},\n")
    assert label_from_csv(fdb, path) == 2
    assert {tuple(sorted(c for c, v in d["present"].items() if v)) for d in fdb.labels.find({"source": "manual"})} \
        == {("blue", "white"), ()}


def test_splits_hold_out_whole_stock_situations_and_never_move_when_days_are_added(fdb, tmp_path):
    from factory_assets.datasets.manifests import situation_of

    simulate_day(fdb, seconds=300, change_every=10)
    auto_label(fdb, T0, T0 + timedelta(days=1))
    first = build_dataset(fdb, tmp_path / "ds")
    before = {d["_id"]: d["split"] for d in fdb.db["dataset_splits"].find()}
    sides: dict = {}
    for lab in effective_labels(fdb):
        sides.setdefault(situation_of(lab), set()).add(before[lab["frame_id"]])
    # every situation lies wholly on one side, and some are held out for validation
    assert all(len(s) == 1 for s in sides.values())
    assert sum(s == {"valid"} for s in sides.values()) >= 1 and sum(s == {"train"} for s in sides.values()) >= 2
    again = build_dataset(fdb, tmp_path / "ds")
    assert again.version == first.version
    # a new day arrives
    simulate_day(fdb, seconds=120, start=T0 + timedelta(days=1), seed=9)
    auto_label(fdb, T0 + timedelta(days=1), T0 + timedelta(days=2))
    build_dataset(fdb, tmp_path / "ds")
    after = {d["_id"]: d["split"] for d in fdb.db["dataset_splits"].find()}
    assert len(after) > len(before)
    assert all(after[k] == v for k, v in before.items())
    valid_share = sum(v == "valid" for v in after.values()) / len(after)
    assert 0.1 < valid_share < 0.4


def test_a_dataset_can_be_built_from_exactly_the_selected_days(fdb, tmp_path):
    simulate_day(fdb, seconds=200, change_every=10)
    simulate_day(fdb, seconds=200, start=T0 + timedelta(days=1), seed=8, change_every=10)
    auto_label(fdb, T0, T0 + timedelta(days=2))
    built = build_dataset(fdb, tmp_path / "ds", start=T0 + timedelta(days=1), end=T0 + timedelta(days=2))
    n_day2 = len(effective_labels(fdb, T0 + timedelta(days=1), T0 + timedelta(days=2)))
    assert built.counts["train"]["images"] + built.counts["valid"]["images"] == n_day2
    assert n_day2 < len(effective_labels(fdb))


def test_assign_splits_keeps_an_imported_split(fdb):
    simulate_day(fdb, seconds=3)
    frame = fdb.frames.find_one()
    from factory_assets.datasets.labels import label_doc, upsert_labels

    upsert_labels(fdb, [label_doc(frame, {"blue": True}, "import", split="valid", provenance={})])
    labs = effective_labels(fdb)
    assert assign_splits(fdb, labs)[frame["_id"]] == "valid"


def test_an_auto_label_is_withdrawn_when_a_late_report_shows_the_stock_changed_around_the_frame(fdb):
    simulate_day(fdb, seconds=30, change_every=1000)  # one stock situation throughout
    auto_label(fdb, T0, T0 + timedelta(days=1))
    frame_ts = T0 + timedelta(seconds=12)
    assert any(lab["frame_ts"] == frame_ts for lab in effective_labels(fdb))
    late = fdb.mqtt.find_one({"topic": "f/i/stock"}, sort=[("ts", 1)])
    changed = {**late["payload"], "stockItems": [{**i, "workpiece": None} for i in late["payload"]["stockItems"]]}
    fdb.mqtt.insert_one({"topic": "f/i/stock", "ts": frame_ts + timedelta(seconds=1), "payload": changed,
                         "message_id": "late-change"})
    summary = auto_label(fdb, T0, T0 + timedelta(days=1))
    assert summary.withdrawn >= 1
    assert not any(lab["frame_ts"] == frame_ts for lab in effective_labels(fdb))


def test_a_manual_correction_of_an_imported_frame_keeps_its_imported_split(fdb):
    simulate_day(fdb, seconds=3)
    frame = fdb.frames.find_one()
    from factory_assets.datasets.labels import label_doc, upsert_labels

    upsert_labels(fdb, [label_doc(frame, {"blue": True}, "import", split="valid", provenance={})])
    label_manually(fdb, str(frame["_id"]), {"red": True}, user="bob")
    best = [d for d in effective_labels(fdb) if d["frame_id"] == frame["_id"]][0]
    assert best["source"] == "manual" and best["present"]["red"] and best["split"] == "valid"
    assert assign_splits(fdb, [best])[frame["_id"]] == "valid"


def test_a_built_dataset_carries_the_auto_labels_slots_in_a_sidecar_and_trains_the_slot_model(fdb, tmp_path):
    from factory_assets.datasets.lst import read_lst, read_slots
    from factory_assets.datasets.manifests import dataset_digest
    from factory_assets.backends.local import LocalTrainer

    simulate_day(fdb, seconds=120, change_every=8)
    auto_label(fdb, T0, T0 + timedelta(days=1))
    built = build_dataset(fdb, tmp_path / "ds")
    for split in ("train", "valid"):
        rows = read_lst(built.path / f"{split}-annots" / f"{split}.lst")
        slots = read_slots(built.path / f"{split}-annots" / f"{split}.slots")
        assert set(slots) == {r.index for r in rows}
        for r in rows:  # presence in the .lst and the sidecar's slots tell the same story
            assert r.present == {c: any(t == c.upper() for t in slots[r.index].values()) for c in r.present}
    assert built.counts["train"]["with_slots"] == built.counts["train"]["images"]
    assert dataset_digest(built.path) == built.version
    result = LocalTrainer(n_augment=1).train(built.path, tmp_path / "m", seed=0)
    assert result.metrics["model_kind"] == "slots"


def test_a_manual_per_slot_label_decides_presence_and_a_presence_only_correction_drops_the_slots(fdb, tmp_path):
    simulate_day(fdb, seconds=30)
    auto_label(fdb, T0, T0 + timedelta(days=1))
    first, second = effective_labels(fdb)[:2]
    doc = label_manually(fdb, str(first["frame_id"]), None, slots="A1=BLUE, C3=white")
    assert doc["present"] == {"blue": True, "red": False, "white": True}
    assert doc["slots"]["A1"] == "BLUE" and doc["slots"]["C3"] == "WHITE" and doc["slots"]["B2"] is None
    with pytest.raises(LabelError, match="unknown slot"):
        label_manually(fdb, str(first["frame_id"]), None, slots="D4=BLUE")
    with pytest.raises(LabelError, match="says otherwise"):
        label_manually(fdb, str(first["frame_id"]), {"red": True}, slots="A1=BLUE")
    label_manually(fdb, str(second["frame_id"]), {c: not v for c, v in second["present"].items()})
    best = {d["frame_id"]: d for d in effective_labels(fdb)}
    # the correction has no slots: the auto label's slots no longer apply to that frame
    assert "slots" not in best[second["frame_id"]]
