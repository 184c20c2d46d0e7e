"""The first model waits until the frames auto-labels would label can train a model worth
deploying: slots seen both empty and occupied, in two rows and two columns, among the
*train* situations of frames outside the crane's settle time. Reports and frames stored as
the platform stores them, in a real database (the ``fdb`` fixture)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from factory_assets.twin.drift import bootstrap_readiness, bootstrap_situations
from factory_assets.vocabulary import SLOTS
from factory_assets_tests.datasets.test_labels import frames_at, stock_report
from factory_assets_tests.storage.test_hot_paths import assert_fleet_ready, recorded_fdb  # noqa: F401

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=timezone.utc)
EMPTY = {s: None for s in SLOTS}


def rack(**slots) -> dict:
    return EMPTY | slots


def test_a_slot_changed_only_in_the_settle_time_places_nothing_until_a_second_column_changes(fdb):
    # A blue piece leaves C2 5 s after the first report: C2 is never seen occupied outside the
    # settle time. Then only column 1 changes (B1, A1 stored, C1 fetched): four slots changed
    # by the reports, which the previous rule took as ready, but the frames show three slots of
    # one column, and no colour both in stock and absent: nothing can be trained yet.
    for n, (t, slots) in enumerate([(0, rack(C1="BLUE", C2="RED")), (5, rack(C1="BLUE")),
                                    (60, rack(C1="BLUE", B1="BLUE")), (120, rack(C1="BLUE", B1="BLUE", A1="BLUE")),
                                    (180, rack(B1="BLUE", A1="BLUE"))]):
        stock_report(fdb, T0 + timedelta(seconds=t), slots, n)
    frames_at(fdb, range(0, 300), start=T0)
    readiness = bootstrap_readiness(fdb)
    assert set(readiness.slots_varied) == {"C1", "B1", "A1"} and not readiness.placed
    assert readiness.colours_varied == 0 and readiness.model is None and not readiness.ready
    assert readiness.train_frames >= 60 and readiness.valid_frames > 0  # enough frames, the wrong ones
    # a blue piece stored in C2 (column 2): once frames outside its settle time are labelled, the
    # per-slot model can place the rack
    stock_report(fdb, T0 + timedelta(seconds=310), rack(B1="BLUE", A1="BLUE", C2="BLUE"), 9)
    frames_at(fdb, range(300, 340), start=T0)
    assert not bootstrap_readiness(fdb).placed  # still in its settle time (25 s) or not yet heard after
    frames_at(fdb, range(340, 360), start=T0)
    readiness = bootstrap_readiness(fdb)
    assert readiness.placed and readiness.model == "slots" and readiness.ready
    assert "C2" in readiness.slots_varied


def test_a_slot_changed_only_in_a_validation_situation_does_not_place_the_rack(fdb):
    # The dataset holds out whole stock situations, the 2nd one first: C2 occupied only there
    # teaches the training split nothing about C2.
    for n, (t, slots) in enumerate([(0, rack(C1="BLUE")), (60, rack(C1="BLUE", C2="WHITE")),
                                    (120, rack(C1="BLUE")), (180, rack(C1="BLUE", B1="RED"))]):
        stock_report(fdb, T0 + timedelta(seconds=t), slots, n)
    frames_at(fdb, range(0, 260), start=T0)
    situations = bootstrap_situations(fdb)
    assert [(s.split, s.slots["C2"]) for s in situations] == [("train", None), ("valid", "WHITE"), ("train", None)]
    readiness = bootstrap_readiness(fdb)
    assert readiness.slots_varied == ("B1",) and not readiness.ready


def test_only_frames_that_were_taken_count_a_camera_switched_off_labels_nothing(fdb):
    # the same varied reports, but the camera was off after the first minute
    for n, (t, slots) in enumerate([(0, rack(C1="BLUE")), (60, rack(C1="BLUE", C2="WHITE")),
                                    (120, rack(C1="BLUE", C2="WHITE", B1="RED")),
                                    (180, rack(C2="WHITE", B1="RED")), (240, rack(B1="RED"))]):
        stock_report(fdb, T0 + timedelta(seconds=t), slots, n)
    frames_at(fdb, range(0, 60), start=T0)
    frames_at(fdb, range(400, 420), start=T0)  # switched on again much later: the newest report's frames
    readiness = bootstrap_readiness(fdb)
    assert readiness.situations == 2 and not readiness.ready


def test_the_pieces_of_one_train_situation_in_two_rows_and_two_columns_place_the_rack_before_any_change(fdb):
    # A factory's first stock already holds pieces in rows B and C, columns 2 and 3: the per-slot
    # model places the rack from where each reported colour shows (vision.slots), so the first
    # change only has to give the validation situation.
    for n, (t, slots) in enumerate([(0, rack(B2="BLUE", B3="WHITE", C2="RED")), (100, rack(B2="BLUE", B3="WHITE"))]):
        stock_report(fdb, T0 + timedelta(seconds=t), slots, n)
    frames_at(fdb, range(0, 200), start=T0)
    readiness = bootstrap_readiness(fdb)
    assert readiness.slots_varied == () and readiness.slots_held == ("B2", "B3", "C2")
    assert readiness.placed and readiness.model == "slots" and readiness.ready
    assert "pieces of one situation: B2, B3, C2" in readiness.describe()


def test_a_full_rack_places_nothing_from_its_colours_the_model_needs_an_empty_slot_too(fdb):
    full = {s: "BLUE" for s in SLOTS}
    for n, (t, slots) in enumerate([(0, full), (100, full | {"A1": None})]):
        stock_report(fdb, T0 + timedelta(seconds=t), slots, n)
    frames_at(fdb, range(0, 200), start=T0)
    readiness = bootstrap_readiness(fdb)
    assert len(readiness.slots_held) == 9 and not readiness.placed


def camera_frames_at(fdb, seconds, camera_id: str) -> None:
    from factory_assets.storage.frames import build_frame, insert_frames
    from factory_assets_tests.helpers import jpeg_bytes

    insert_frames(fdb, [build_frame(jpeg_bytes(seed=i, size=(32, 24)), ts=T0 + timedelta(seconds=i),
                                    camera_id=camera_id, factory_id="factory-1", content_type="image/jpeg",
                                    width=32, height=24, source={"kind": "test"}) for i in seconds])


def test_a_cameras_readiness_counts_its_own_frames_only_each_read_factory_first(recorded_fdb):  # noqa: F811
    # the same factory's reports for both cameras; cam-2 was added late, after the train situation
    fdb, recorder = recorded_fdb
    for n, (t, slots) in enumerate([(0, rack(B2="BLUE", B3="WHITE", C2="RED")), (100, rack(B2="BLUE", B3="WHITE"))]):
        stock_report(fdb, T0 + timedelta(seconds=t), slots, n)
    camera_frames_at(fdb, range(0, 200), "cam-1")
    camera_frames_at(fdb, range(150, 200), "cam-2")
    recorder.recording.set()
    first = bootstrap_readiness(fdb, factory_id="factory-1", camera_id="cam-1")
    added = bootstrap_readiness(fdb, factory_id="factory-1", camera_id="cam-2")
    recorder.recording.clear()
    assert first.ready and not added.ready
    # cam-2's frames hold one situation (which its own dataset would train on) and nothing to validate on
    assert (added.situations, added.valid_frames) == (1, 0) and 0 < added.frames < first.frames
    assert bootstrap_readiness(fdb, factory_id="factory-1").frames == first.frames + added.frames
    assert_fleet_ready(fdb, recorder.commands)  # every read leads with factory_id on a factory_* index
    # frames stored without a camera id are the default camera's (the ingester's txt-cam)
    camera_frames_at(fdb, range(0, 200), "txt-cam")
    fdb.frames.update_many({"camera_id": "txt-cam"}, {"$unset": {"camera_id": 1}})
    assert bootstrap_readiness(fdb, factory_id="factory-1", camera_id="txt-cam") == first
