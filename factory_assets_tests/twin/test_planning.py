from datetime import datetime, timedelta, timezone

from factory_assets.ingest.service import Ingestor
from factory_assets.storage.inferences import build_inference, record_inference
from factory_assets.twin.planning import plan_frames
from factory_assets_tests.helpers import jpeg_bytes

T0 = datetime(2026, 11, 23, 23, 59, 58, tzinfo=timezone.utc)


def later(fdb, seconds: float = 300) -> datetime:
    """``seconds`` after the newest frame was received: derived from the data, never from the clock."""
    newest = fdb.frames.find_one(sort=[("received_at", -1)])["received_at"]
    return newest.replace(tzinfo=newest.tzinfo or timezone.utc) + timedelta(seconds=seconds)


def store(fdb, n: int) -> list[dict]:
    ing = Ingestor(fdb)
    for i in range(n):
        ing.add_image(jpeg_bytes(seed=i, size=(32, 24)), ts=T0 + timedelta(seconds=i), source={"kind": "test"})
    ing.flush()
    return list(fdb.frames.find().sort("seq", 1))


def infer(fdb, frame, version="m1"):
    record_inference(fdb, build_inference(frame, probabilities={"blue": .9, "red": .1, "white": .1},
                                          thresholds={"blue": .5, "red": .5, "white": .5},
                                          model_version=version, latency_ms=1.0, source="live"))


def test_the_cursor_passes_frames_inferred_by_the_live_path_and_stops_at_the_first_uninferred(fdb):
    frames = store(fdb, 5)
    for f in frames[:2] + frames[3:]:
        infer(fdb, f)
    plan = plan_frames(fdb, 0, "m1", now=later(fdb))
    assert plan.cursor == frames[1]["seq"]  # frame 3 was never inferred: the cursor waits before it
    assert [f["seq"] for f in plan.pending] == [frames[2]["seq"]]
    assert len(plan.inferred) == 4


def test_frames_inferred_by_another_model_version_are_still_pending(fdb):
    frames = store(fdb, 2)
    infer(fdb, frames[0], version="old")
    plan = plan_frames(fdb, 0, "new", now=later(fdb))
    assert plan.cursor == 0 and len(plan.pending) == 2


def test_pending_frames_are_grouped_by_their_utc_day(fdb):
    store(fdb, 4)  # 23:59:58 .. 00:00:01 spans midnight
    days = plan_frames(fdb, 0, "m1", now=later(fdb)).pending_by_day()
    assert {d: len(v) for d, v in days.items()} == {"2026-11-23": 2, "2026-11-24": 2}


def test_just_arrived_frames_are_left_to_the_live_updater_for_a_grace_period(fdb):
    store(fdb, 2)
    plan = plan_frames(fdb, 0, "m1", now=later(fdb, seconds=1))  # received a second ago
    assert plan.pending == [] and plan.waiting == 2 and plan.cursor == 0


def test_a_fully_inferred_page_moves_the_cursor_to_the_horizon(fdb):
    frames = store(fdb, 3)
    for f in frames:
        infer(fdb, f)
    assert plan_frames(fdb, 0, "m1", now=later(fdb)).cursor == frames[-1]["seq"]
    assert plan_frames(fdb, frames[-1]["seq"], "m1", now=later(fdb)).inferred == []
