import random
import threading
from datetime import datetime, timedelta, timezone

import pytest

from factory_assets.twin.render import render_twin_png
from factory_assets.twin.state import Observation, reported_from_stock
from factory_assets.twin.store import _write_legacy, apply_observation, apply_reported, get_twin

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc)
THRESHOLDS = {"blue": 0.5, "red": 0.5, "white": 0.5}


def obs(i: int, blue=True, red=False, white=False, model="m1", frame_id=None) -> Observation:
    present = {"blue": blue, "red": red, "white": white}
    return Observation("factory-1", frame_id or f"frame-{i}", T0 + timedelta(seconds=i), model,
                       {c: 0.9 if v else 0.1 for c, v in present.items()}, present, THRESHOLDS, "test", i)


def test_an_observation_writes_both_twin_shapes(fdb):
    assert apply_observation(fdb, obs(1, blue=True, white=True))
    twin = get_twin(fdb)
    assert twin["version"] == 1
    assert twin["observed"]["blue"] == {"present": True, "probability": 0.9, "threshold": 0.5}
    assert twin["observed"]["frame_id"] == "frame-1" and twin["observed"]["model_version"] == "m1"
    assert twin["metadata"]["observed"]["white"]["ts"] == T0 + timedelta(seconds=1)
    legacy = fdb.twin_legacy.find_one({"_partition": "DTPartition"})
    assert legacy["is_present"] == {"blue": True, "red": False, "white": True}
    assert legacy["ts"] == T0 + timedelta(seconds=1)
    assert fdb.twin_history.count_documents({}) == 1


def test_an_older_frame_never_overwrites_a_newer_one(fdb):
    assert apply_observation(fdb, obs(5, blue=False))
    assert not apply_observation(fdb, obs(4, blue=True))  # a slow run finishing late
    twin = get_twin(fdb)
    assert twin["observed"]["frame_id"] == "frame-5" and twin["observed"]["blue"]["present"] is False
    assert fdb.twin_legacy.find_one()["is_present"]["blue"] is False
    assert twin["version"] == 1


def test_out_of_order_concurrent_writers_end_on_the_newest_frame(fdb):
    observations = [obs(i, blue=bool(i % 2)) for i in range(60)]
    random.Random(3).shuffle(observations)
    chunks = [observations[k::4] for k in range(4)]
    threads = [threading.Thread(target=lambda c=c: [apply_observation(fdb, o) for o in c]) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    twin = get_twin(fdb)
    assert twin["observed"]["frame_id"] == "frame-59"
    assert fdb.twin_legacy.count_documents({}) == 1
    assert fdb.twin_legacy.find_one()["ts"] == T0 + timedelta(seconds=59)
    versions = [d["version"] for d in fdb.twin_history.find().sort("version", 1)]
    assert len(versions) == len(set(versions))  # the version is monotonic: no two writes share one


def test_first_writers_of_the_legacy_twin_racing_leave_one_document_on_the_newest_frame(fdb):
    # CI once saw the loser of this insert race drop the newest frame (two inserts, no unique key).
    for round_ in range(5):
        fdb.twin_legacy.delete_many({})
        frames = [obs(100 * round_ + i, blue=bool(i % 2)) for i in range(8)]
        barrier = threading.Barrier(len(frames))

        def write(o):
            barrier.wait()
            _write_legacy(fdb, o)

        threads = [threading.Thread(target=write, args=(o,)) for o in frames]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert fdb.twin_legacy.count_documents({}) == 1
        newest = frames[-1]
        assert fdb.twin_legacy.find_one()["ts"] == newest.frame_ts
        assert fdb.twin_legacy.find_one()["is_present"]["blue"] is bool(newest.present["blue"])


@pytest.mark.parametrize("ts", [None, "2026-11-23T11:00:00Z", 17], ids=["missing", "a-string", "a-number"])
def test_a_legacy_document_without_a_date_ts_from_another_tool_is_replaced_by_the_first_observation(fdb, ts):
    # another tool's document must not stop the updater (it used to loop, then raise)
    fdb.twin_legacy.insert_one({"_partition": "DTPartition", "is_present": {"blue": False},
                                **({"ts": ts} if ts is not None else {})})
    assert apply_observation(fdb, obs(1, blue=True))
    assert fdb.twin_legacy.count_documents({}) == 1
    doc = fdb.twin_legacy.find_one()
    assert doc["is_present"]["blue"] is True and doc["ts"] == T0 + timedelta(seconds=1)


def test_reinferring_the_same_frame_with_a_new_model_updates_the_twin(fdb):
    apply_observation(fdb, obs(1, red=False, model="m1"))
    assert apply_observation(fdb, obs(1, red=True, model="m2"))
    assert get_twin(fdb)["observed"]["red"]["present"] is True


def test_history_grows_only_when_the_state_changes(fdb):
    for i in range(5):
        apply_observation(fdb, obs(i, blue=True))
    apply_observation(fdb, obs(6, blue=False))
    assert [d["changed"] for d in fdb.twin_history.find().sort("version", 1)] == [["blue", "red", "white"], ["blue"]]


def test_reported_stock_and_delta_show_where_vision_and_controller_disagree(fdb):
    apply_observation(fdb, obs(1, blue=True, red=False, white=False))
    payload = {"stockItems": [{"workpiece": {"type": "RED"}, "location": "A1"},
                              {"workpiece": {"type": "BLUE"}, "location": "B2"}, {"workpiece": None, "location": "C3"}]}
    assert apply_reported(fdb, reported_from_stock(payload, T0 + timedelta(seconds=2)))
    assert not apply_reported(fdb, reported_from_stock({"stockItems": []}, T0))  # older report
    twin = get_twin(fdb)
    assert twin["reported"]["slots"]["A1"] == "RED" and twin["reported"]["slots"]["C3"] is None
    assert twin["reported"]["present"] == {"blue": True, "red": True, "white": False}
    # the frame predates the report: the crane may not have moved yet
    assert twin["delta"] == {} and twin["in_transit"]["active"] is True
    assert twin["in_transit"]["colours"] == {"red": {"observed": False, "reported": True}}
    for i in range(30, 33):  # after the settle time, the same disagreement on three frames over 2 s
        apply_observation(fdb, obs(i, blue=True))
    twin = get_twin(fdb)
    assert twin["in_transit"]["active"] is False
    assert {c: (d["observed"], d["reported"], d["frames"]) for c, d in twin["delta"].items()} == {"red": (False, True, 3)}
    png = render_twin_png(twin)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
