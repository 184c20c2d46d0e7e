"""Automatic labels from stock reports, manual labels, priorities and sticky splits."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from factory_assets.datasets.autolabel import auto_label
from factory_assets.datasets.labels import LabelError, effective_labels, label_from_csv, label_manually
from factory_assets.datasets.manifests import assign_splits, build_dataset
from factory_assets.ingest.service import Ingestor
from factory_assets.simulation.factory import FactorySimulator
from factory_assets.twin.state import reported_presence
from factory_assets.vocabulary import DEFAULT_SETTLE_S

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=timezone.utc)


def simulate_day(fdb, seconds: int = 120, start: datetime = T0, seed: int = 4, change_every: float = 15.0,
                 report_every: float | None = None):
    """Frames every second and every message the simulated controller publishes (its stock
    reported on events only, before the crane moves; station and order states), plus, with
    ``report_every``, the stock republished every so many seconds (a controller never does),
    ingested like MQTT messages. Returns the rack each frame shows (the ground truth) and the
    times of the reported changes."""
    sim = FactorySimulator(seed=seed, change_every_s=change_every, start=start)
    ing = Ingestor(fdb)
    truth = {}
    next_report = 0.0
    for t in range(seconds):
        ts = start + timedelta(seconds=t)
        msg, shown = sim.camera_message(ts)  # runs the factory to ts: its messages wait in the outbox
        while sim.outbox:
            m = sim.outbox.popleft()
            ing.handle_mqtt(m.topic, json.dumps(m.payload).encode())
        if report_every is not None and t >= next_report:
            ing.handle_mqtt("f/i/stock", json.dumps(sim.stock_message(ts)).encode())
            next_report = t + report_every
        ing.handle_mqtt("i/cam", json.dumps(msg).encode())
        truth[ts] = reported_presence(shown)
    ing.flush()
    return truth, [start + timedelta(seconds=c.t) for c in sim.changes]


def test_auto_labels_match_the_ground_truth_and_skip_frames_taken_while_stock_changed(fdb):
    truth, changes = simulate_day(fdb, seconds=240, change_every=6)  # stock reported on events only
    summary = auto_label(fdb, T0, T0 + timedelta(days=1), margin_s=2)
    labels = {lab["frame_ts"]: lab for lab in effective_labels(fdb)}
    assert summary.labelled == len(labels) > 60
    # every label shows the rack the camera saw, although the reports ran ahead of the crane
    assert all(lab["present"] == truth[ts] for ts, lab in labels.items())
    in_transit = {ts for ts in truth for c in changes if -2 <= (ts - c).total_seconds() <= DEFAULT_SETTLE_S}
    assert in_transit and not (in_transit & set(labels))
    assert summary.unstable >= len(in_transit)
    assert all(set(lab["slots"]) == {f"{r}{c}" for r in "ABC" for c in "123"} for lab in labels.values())
    assert all(lab["provenance"]["settle_s"] == DEFAULT_SETTLE_S for lab in labels.values())
    # running again changes nothing
    auto_label(fdb, T0, T0 + timedelta(days=1))
    assert fdb.labels.count_documents({}) == len(labels)


def stock_report(fdb, ts: datetime, slots: dict, n: int, factory_id: str = "factory-1") -> None:
    items = [{"location": s, "workpiece": {"type": t, "id": f"wp-{s}", "state": "RAW"} if t else None}
             for s, t in slots.items()]
    fdb.mqtt.insert_one({"topic": "f/i/stock", "ts": ts, "factory_id": factory_id, "message_id": f"stock-{n}",
                         "payload": {"ts": ts.isoformat(), "stockItems": items}})


def test_no_frame_within_the_settle_time_after_a_reported_change_is_auto_labelled_and_later_frames_are(fdb):
    from factory_assets.storage.frames import build_frame, insert_frames
    from factory_assets.vocabulary import SLOTS
    from factory_assets_tests.helpers import jpeg_bytes

    before = {s: None for s in SLOTS} | {"C1": "RED"}
    after = before | {"B1": "BLUE"}  # reported at 60 s, before the crane carries it in
    for k, t in enumerate(range(0, 121, 10)):  # the stock every 10 s; it changes at 60 s
        stock_report(fdb, T0 + timedelta(seconds=t), after if t >= 60 else before, k)
    insert_frames(fdb, [build_frame(jpeg_bytes(seed=i, size=(32, 24)), ts=T0 + timedelta(seconds=i),
                                    camera_id="cam-1", factory_id="factory-1", content_type="image/jpeg",
                                    width=32, height=24, source={"kind": "test"}) for i in range(30, 115)])
    summary = auto_label(fdb, T0, T0 + timedelta(days=1), margin_s=2, settle_s=20)
    labelled = {int((lab["frame_ts"] - T0).total_seconds()): lab for lab in effective_labels(fdb)}
    assert set(labelled) == set(range(30, 58)) | set(range(81, 115))
    assert summary.unstable == len(range(58, 81))
    assert all(lab["slots"] == (after if t > 60 else before) for t, lab in labelled.items())
    # the report repeating the stock (70 s, 80 s...) started no new window; with the default
    # settle time (25 s) the frames up to 85 s wait, and labels already given are withdrawn
    summary = auto_label(fdb, T0, T0 + timedelta(days=1), margin_s=2)
    assert summary.withdrawn == len(range(81, 86))
    assert {int((lab["frame_ts"] - T0).total_seconds()) for lab in effective_labels(fdb)} \
        == set(range(30, 58)) | set(range(86, 115))


def test_the_settle_time_comes_from_the_environment(fdb, monkeypatch):
    from factory_assets.storage.frames import build_frame, insert_frames
    from factory_assets.vocabulary import SLOTS
    from factory_assets_tests.helpers import jpeg_bytes

    stock_report(fdb, T0, {s: None for s in SLOTS}, 0)
    stock_report(fdb, T0 + timedelta(seconds=60), {s: None for s in SLOTS}, 1)
    insert_frames(fdb, [build_frame(jpeg_bytes(seed=i, size=(32, 24)), ts=T0 + timedelta(seconds=i),
                                    camera_id="cam-1", factory_id="factory-1", content_type="image/jpeg",
                                    width=32, height=24, source={"kind": "test"}) for i in range(1, 30)])
    monkeypatch.setenv("FACTORY_SETTLE_S", "10")
    auto_label(fdb, T0, T0 + timedelta(days=1))
    assert min(lab["frame_ts"] for lab in effective_labels(fdb)) == T0 + timedelta(seconds=11)
    monkeypatch.setenv("FACTORY_SETTLE_S", "soon")
    with pytest.raises(ValueError, match="FACTORY_SETTLE_S must be a number"):
        auto_label(fdb, T0, T0 + timedelta(days=1))


def controller_message(fdb, ts: datetime, topic: str, n: int, factory_id: str = "factory-1") -> None:
    """Something the factory's controller said at ``ts`` (a station's or the order's state)."""
    fdb.mqtt.insert_one({"topic": topic, "ts": ts, "factory_id": factory_id, "message_id": f"{topic}-{n}",
                         "payload": {"ts": ts.isoformat(), "station": "hbw", "code": 1, "description": "",
                                     "active": 0}})


def frames_at(fdb, seconds, factory_id: str = "factory-1", start: datetime = T0) -> None:
    from factory_assets.storage.frames import build_frame, insert_frames
    from factory_assets_tests.helpers import jpeg_bytes

    insert_frames(fdb, [build_frame(jpeg_bytes(seed=i, size=(32, 24)), ts=start + timedelta(seconds=i),
                                    camera_id="cam-1", factory_id=factory_id, content_type="image/jpeg",
                                    width=32, height=24, source={"kind": "test"}) for i in seconds])


def labelled_seconds(fdb, start: datetime = T0) -> set:
    return {int((lab["frame_ts"] - start).total_seconds()) for lab in effective_labels(fdb)}


RACK = {s: None for s in (f"{r}{c}" for r in "ABC" for c in "123")} | {"C1": "RED", "B2": "WHITE"}


def test_frames_long_after_the_last_reported_change_are_labelled_with_the_stock_in_force(fdb):
    # The controller reports only on events: one report, then ten quiet minutes, then the
    # warehouse's state changes (it starts a move) at 620 s. The report labels every frame
    # outside its settle time, however old (the previous rule stopped 30 s after a report).
    stock_report(fdb, T0, RACK, 0)
    frames_at(fdb, range(0, 600, 5))
    controller_message(fdb, T0 + timedelta(seconds=620), "f/i/state/hbw", 1)
    summary = auto_label(fdb, T0, T0 + timedelta(days=1))
    assert labelled_seconds(fdb) == set(range(30, 600, 5))  # after the settle time (25 s)
    assert summary.unstable == len(range(0, 30, 5)) and summary.no_report == summary.unconfirmed == 0
    labels = effective_labels(fdb)
    assert all(lab["slots"] == RACK and lab["provenance"]["report_ts"] == T0 for lab in labels)
    # idempotent: the same messages, the same labels
    again = auto_label(fdb, T0, T0 + timedelta(days=1))
    assert (again.labelled, again.withdrawn) == (summary.labelled, 0)
    assert [(lab["frame_id"], lab["present"]) for lab in effective_labels(fdb)] \
        == [(lab["frame_id"], lab["present"]) for lab in labels]


def test_a_report_from_an_earlier_day_still_labels_the_frames_of_a_quiet_day(fdb):
    stock_report(fdb, T0 - timedelta(days=2), RACK, 0)  # nothing has moved since
    day = T0.replace(hour=0)
    frames_at(fdb, range(0, 100, 10), start=day)
    controller_message(fdb, day + timedelta(seconds=200), "f/i/order", 1)
    summary = auto_label(fdb, day, day + timedelta(days=1))
    assert summary.labelled == 10 and summary.no_report == 0
    assert all(lab["provenance"]["report_ts"] == T0 - timedelta(days=2) for lab in effective_labels(fdb))
    # a maximum age can still be asked for (window_s); frames the old report is too old for lose their labels
    summary = auto_label(fdb, day, day + timedelta(days=1), window_s=3600)
    assert summary.no_report == 10 and summary.withdrawn == 10 and not effective_labels(fdb)


def test_frames_wait_until_the_factory_is_heard_after_them_and_frames_still_arriving_show_it(fdb):
    # Nothing but frames after the report: the newest frames are not labelled until frames taken
    # 10 s (FRAME_EVIDENCE_LAG_S) after them show that the ingester was receiving the factory.
    from factory_assets.datasets.autolabel import FRAME_EVIDENCE_LAG_S

    stock_report(fdb, T0, RACK, 0)
    frames_at(fdb, range(26, 201))
    summary = auto_label(fdb, T0, T0 + timedelta(days=1))
    newest_heard = 200 - FRAME_EVIDENCE_LAG_S - 2  # the newest frame, the lag, the margin (2 s)
    assert labelled_seconds(fdb) == set(range(26, int(newest_heard) + 1))
    assert summary.unconfirmed == len(range(int(newest_heard) + 1, 201))
    frames_at(fdb, range(201, 230))
    auto_label(fdb, T0, T0 + timedelta(days=1))
    assert labelled_seconds(fdb) == set(range(26, 229 - int(FRAME_EVIDENCE_LAG_S) - 2 + 1))  # newest frame 229 s


def test_only_the_factorys_own_controller_messages_show_it_was_heard(fdb):
    # frames of factory-1 after its report; then another factory's state and an order the
    # platform sent to factory-1 (a command, not the controller speaking): neither confirms
    stock_report(fdb, T0, RACK, 0)
    frames_at(fdb, range(30, 40))
    controller_message(fdb, T0 + timedelta(seconds=100), "f/i/state/hbw", 1, factory_id="factory-2")
    fdb.mqtt.insert_one({"topic": "f/o/order", "ts": T0 + timedelta(seconds=100), "factory_id": "factory-1",
                         "message_id": "order-1", "payload": {"ts": "x", "type": "RED"}})
    summary = auto_label(fdb, T0, T0 + timedelta(days=1))
    assert summary.labelled == 0 and summary.unconfirmed == 10
    controller_message(fdb, T0 + timedelta(seconds=100), "f/i/state/hbw", 2)  # factory-1's warehouse
    summary = auto_label(fdb, T0, T0 + timedelta(days=1))
    assert summary.labelled == 10


def test_a_change_reported_while_frames_waited_makes_them_unstable_not_labelled(fdb):
    # frames up to 60 s wait for news; the news is a change reported at 41 s (the crane then
    # moves): frames from 39 s on are unstable, the earlier ones are labelled with the old rack
    stock_report(fdb, T0, RACK, 0)
    frames_at(fdb, range(30, 61))
    assert auto_label(fdb, T0, T0 + timedelta(days=1)).labelled == len(range(30, 49))
    stock_report(fdb, T0 + timedelta(seconds=41), RACK | {"A3": "BLUE"}, 1)
    summary = auto_label(fdb, T0, T0 + timedelta(days=1))
    assert labelled_seconds(fdb) == set(range(30, 39))
    assert summary.withdrawn == len(range(39, 49))


def test_manual_beats_imported_beats_automatic(fdb):
    simulate_day(fdb, seconds=60)
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
    simulate_day(fdb, seconds=80, change_every=1000)  # one stock situation throughout
    auto_label(fdb, T0, T0 + timedelta(days=1))
    frame_ts = T0 + timedelta(seconds=50)
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

    simulate_day(fdb, seconds=200, seed=5, change_every=6)  # pieces stored in two rows and columns
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
    simulate_day(fdb, seconds=60)
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
