"""Cost that does not grow with history: the hot paths' queries are index ranges (proved with
``explain`` on the real server), and an idle reader waits on a change stream instead of polling."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from factory_assets.storage.frames import (
    CHANGE_STREAM_PREFIX,
    ChangeWaiter,
    FrameSequence,
    assign_missing_seqs,
    build_frame,
    insert_frames,
    iter_day_frames,
    latest_frame,
    read_frames_after,
)
from factory_assets.storage.mongo import FactoryDB
from factory_assets_tests.fixtures.mongo import CommandRecorder, recorded_client
from factory_assets_tests.helpers import jpeg_bytes

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc)


def frame(i: int) -> dict:
    return build_frame(jpeg_bytes(seed=i, size=(32, 24)), ts=T0 + timedelta(seconds=i), camera_id="cam-1",
                       factory_id="factory-1", content_type="image/jpeg", width=32, height=24,
                       source={"kind": "test"}, received_at=T0 + timedelta(seconds=i))


@pytest.fixture
def recorded_fdb(mongo_uri, database_name, fdb):
    """The test's database through a client that records the reads it issues (fdb made the indexes)."""
    recorder = CommandRecorder(names=("find", "aggregate"))
    with recorded_client(mongo_uri, database_name, fdb, recorder) as db:
        yield db, recorder


def stages(plan: dict) -> list[str]:
    out = []
    while plan:
        out.append(plan.get("stage", "?"))
        plan = plan.get("inputStage") or (plan.get("inputStages") or [None])[0]
    return out


def plans_of(fdb, commands: list[dict]) -> list[tuple[str, dict, list[str]]]:
    result = []
    for cmd in commands:
        if "find" not in cmd:
            continue
        explain_cmd = {k: cmd[k] for k in ("find", "filter", "sort", "projection", "limit", "hint") if k in cmd}
        explained = fdb.db.command({"explain": explain_cmd, "verbosity": "queryPlanner"})
        result.append((cmd["find"], cmd.get("filter", {}), stages(explained["queryPlanner"]["winningPlan"])))
    return result


def assert_index_served(fdb, commands):
    plans = plans_of(fdb, commands)
    assert plans, "nothing was recorded"
    scans = [(coll, flt, st) for coll, flt, st in plans if "COLLSCAN" in st]
    assert not scans, f"collection scans on a hot path: {scans}"


def fill_history(fdb, n: int = 60) -> None:
    insert_frames(fdb, [frame(i) for i in range(n)])
    # frames written by another tool, without seq
    fdb.frames.insert_many([{**frame(1000 + i), "source": {"kind": "other-tool"}} for i in range(3)])
    fdb.mqtt.insert_many([{"topic": "f/i/stock", "ts": T0 + timedelta(seconds=i), "factory_id": "factory-1",
                           "message_id": f"m{i}", "payload": {"stockItems": []}} for i in range(20)])


def test_frames_without_a_seq_are_found_through_an_index_not_a_collection_scan(recorded_fdb):
    fdb, recorder = recorded_fdb
    fill_history(fdb)
    recorder.recording.set()
    assert assign_missing_seqs(fdb) == 3
    assert assign_missing_seqs(fdb) == 0
    recorder.recording.clear()
    assert_index_served(fdb, recorder.commands)
    assert fdb.frames.count_documents({"seq": None}) == 0


def test_the_live_paths_idle_poll_and_a_reading_poll_are_served_by_indexes(recorded_fdb):
    from factory_assets.twin.live import LiveTwinUpdater

    fdb, recorder = recorded_fdb
    fill_history(fdb)
    assign_missing_seqs(fdb)
    horizon = FrameSequence(fdb).horizon()
    fdb.counters.update_one({"_id": "cursor:twin-live"}, {"$set": {"seq": horizon}}, upsert=True)
    # Idle: nothing new since the cursor, so no predictor is ever called.
    updater = LiveTwinUpdater(fdb, predictor=None, change_stream=False, log=lambda *_: None)
    recorder.recording.set()
    assert updater.step(changed=None) == 0
    page = read_frames_after(fdb, horizon - 10, limit=4)
    recorder.recording.clear()
    assert [f["seq"] for f in page.frames] == list(range(horizon - 9, horizon - 5))
    assert_index_served(fdb, recorder.commands)


def test_the_new_frames_sensors_plan_is_served_by_indexes(recorded_fdb):
    from factory_assets.storage.inferences import build_inference, record_inference
    from factory_assets.twin.planning import plan_frames

    fdb, recorder = recorded_fdb
    fill_history(fdb)
    for f in fdb.frames.find({"seq": {"$lte": 10}}, {"image": 0}):
        record_inference(fdb, build_inference(f, probabilities={"blue": 1.0, "red": 0.0, "white": 0.0},
                                              thresholds={}, model_version="v1", latency_ms=1, source="live"))
    recorder.recording.set()
    plan = plan_frames(fdb, 0, "v1", limit=25, now=T0 + timedelta(days=1))
    recorder.recording.clear()
    assert plan.cursor == 10 and len(plan.inferred) == 10 and len(plan.pending) == 15
    assert_index_served(fdb, recorder.commands)


def test_a_days_frames_are_read_through_the_ts_index_whether_ts_is_a_date_or_an_iso_string(recorded_fdb):
    fdb, recorder = recorded_fdb
    fill_history(fdb, n=5)
    fdb.frames.insert_one({"ts": "2026-11-23T11:00:00Z", "data": "data:image/jpeg;base64,AA==", "camera_id": "old"})
    recorder.recording.set()
    got = list(iter_day_frames(fdb, T0.replace(hour=0), T0.replace(hour=0) + timedelta(days=1), {"image": 0}))
    recorder.recording.clear()
    assert len(got) == 9  # 5 + 3 other-tool frames + the original's string-dated one
    assert_index_served(fdb, recorder.commands)


def test_a_long_backlog_is_read_a_bounded_window_at_a_time_and_holes_are_passed(fdb):
    insert_frames(fdb, [frame(i) for i in range(30)])
    insert_frames(fdb, [frame(i) for i in range(30)])  # duplicates: a run of 30 holes
    insert_frames(fdb, [frame(100), frame(101)])
    cursor, seen, reads = 0, [], 0
    while True:
        page = read_frames_after(fdb, cursor, limit=8)
        seen += [f["seq"] for f in page.frames]
        assert len(page.frames) <= 8 and page.cursor <= cursor + 8
        cursor, reads = page.cursor, reads + 1
        if not page.has_more:
            break
    assert seen == list(range(1, 31)) + [61, 62] and cursor == 62


def test_a_waiting_reader_is_woken_by_a_new_frame(fdb):
    waiter = ChangeWaiter(fdb, "test-reader", max_interval=30.0).open()
    try:
        assert waiter.mode == "change_stream"  # SecantusDB reports a replica set
        insert_frames(fdb, [frame(1)])
        # insert, then the counter's release: either wakes the reader, without waiting 30 s
        assert waiter.wait() & {fdb.names.frames, fdb.names.counters}
    finally:
        waiter.close()


def test_the_change_streams_resume_token_is_kept_in_counters_and_a_restart_resumes_from_it(fdb):
    waiter = ChangeWaiter(fdb, "test-reader", max_interval=30.0).open()
    insert_frames(fdb, [frame(1)])
    assert waiter.wait()
    waiter.close()
    assert fdb.counters.find_one({"_id": CHANGE_STREAM_PREFIX + "test-reader"})["token"]
    # A frame stored while the reader was down still wakes it when it comes back.
    fdb.frames.insert_one({**frame(2), "source": {"kind": "other-tool"}})
    again = ChangeWaiter(fdb, "test-reader", max_interval=30.0).open()
    try:
        assert fdb.names.frames in again.wait() | again.wait()
    finally:
        again.close()


def test_a_stock_report_wakes_the_live_reader_and_other_topics_do_not_match(fdb):
    waiter = ChangeWaiter(fdb, "test-reader", extra={"mqtt": {"fullDocument.topic": "f/i/stock"}},
                          max_interval=30.0).open()
    try:
        fdb.mqtt.insert_one({"topic": "f/i/state", "ts": T0})
        fdb.mqtt.insert_one({"topic": "f/i/stock", "ts": T0})
        assert waiter.wait() == {fdb.names.mqtt}
        assert waiter.pipeline()[-1]["$project"].get("fullDocument") is None  # never the documents
    finally:
        waiter.close()


def test_without_change_streams_the_waiter_backs_off_when_idle_and_snaps_back_on_work(fdb):
    waiter = ChangeWaiter(fdb, "poller", min_interval=0.001, max_interval=0.004, change_stream=False)
    seen = []
    for _ in range(4):
        assert waiter.wait() == {"*"}
        seen.append(waiter.interval)
    assert seen == [0.002, 0.004, 0.004, 0.004]
    waiter.activity()
    assert waiter.interval == 0.001


def test_the_twin_schedules_newest_frame_and_inference_come_from_bounded_index_ranges(recorded_fdb):
    from factory_assets.storage.inferences import build_inference, latest_inference, record_inference

    fdb, recorder = recorded_fdb
    fill_history(fdb, n=100)
    for f in fdb.frames.find({"seq": {"$gte": 90}}, {"image": 0}):
        record_inference(fdb, build_inference(f, probabilities={"blue": 1.0, "red": 0.0, "white": 0.0},
                                              thresholds={}, model_version="v1", latency_ms=1, source="live"))
    recorder.recording.set()
    newest = latest_frame(fdb, window=8)
    inference = latest_inference(fdb, "v1", window=8)
    recorder.recording.clear()
    assert newest["seq"] == 100 and newest["image"]
    assert inference["frame_seq"] == 100
    assert_index_served(fdb, recorder.commands)
    # only the chosen frame's image was asked for
    assert [c.get("projection") for c in recorder.commands if c.get("find") == fdb.names.frames] == \
        [{"_id": 1, "seq": 1, "ts": 1, "factory_id": 1}, None]


def test_the_newest_frame_of_a_quiet_factory_is_found_beyond_the_recent_window(fdb):
    insert_frames(fdb, [{**frame(1), "factory_id": "factory-2"}])
    insert_frames(fdb, [frame(i) for i in range(2, 40)])
    assert latest_frame(fdb, {"image": 0}, window=8, factory_id="factory-2", by="seq")["seq"] == 1
    assert latest_frame(fdb, {"image": 0}, window=8, factory_id="factory-1", by="seq")["seq"] == 39
    assert latest_frame(fdb, window=8, factory_id="factory-3") is None


def test_labeling_a_day_reads_only_index_ranges_whatever_the_history(recorded_fdb):
    from factory_assets.datasets.autolabel import auto_label

    fdb, recorder = recorded_fdb
    fill_history(fdb, n=40)
    recorder.recording.set()
    summary = auto_label(fdb, T0.replace(hour=0), T0.replace(hour=0) + timedelta(days=1))
    auto_label(fdb, T0.replace(hour=0), T0.replace(hour=0) + timedelta(days=1))  # again: withdraws, relabels
    recorder.recording.clear()
    assert summary.frames == 43
    assert_index_served(fdb, recorder.commands)


# -- a fleet: every per-factory read leads with factory_id -------------------------------------

def index_of(plan: dict) -> dict | None:
    """The key pattern of the index a winning plan scans (IDHACK: the _id index), None for a collection scan."""
    while plan:
        if plan.get("stage") == "IXSCAN":
            return plan.get("keyPattern")
        if plan.get("stage") in ("IDHACK", "EXPRESS_IXSCAN", "CLUSTERED_IXSCAN"):
            return {"_id": 1}
        plan = plan.get("inputStage") or (plan.get("inputStages") or [None])[0]
    return None


def explained(fdb, cmd: dict, verbosity: str = "queryPlanner") -> tuple[str, dict, dict]:
    """(collection, filter, explain) of a recorded find, or of an aggregate's leading $match."""
    if "find" in cmd:
        coll, flt = cmd["find"], cmd.get("filter", {})
        body = {k: cmd[k] for k in ("find", "filter", "sort", "projection", "limit", "hint") if k in cmd}
    else:
        coll, stage = cmd["aggregate"], (cmd.get("pipeline") or [{}])[0]
        flt = stage.get("$match", {})
        body = {"find": coll, "filter": flt}
    return coll, flt, fdb.db.command({"explain": body, "verbosity": verbosity})


def fleet_wide_reads(fdb) -> dict[str, set[frozenset]]:
    """The reads that span the fleet on purpose (collection -> filter field sets), each still an
    index range: the one live reader's frame cursor, frames and inferences by their ids, the
    twin documents (one per factory: the list of factories), models by version, the original
    project's one-document twin (``_partition``: the Unity twin's, one factory's by nature),
    the ``factories`` documents (one per factory: the list of factories), the clock estimates that
    moved (the live updater's periodic look) and, at the API's start, its tokens. (What arrived in
    ``mqtt`` is an ``_id`` range: checked as a primary-key read.)"""
    n = fdb.names
    return {n.frames: {frozenset({"seq"})}, n.inferences: {frozenset({"frame_seq"}), frozenset({"frame_id"})},
            n.twin: {frozenset(), frozenset({"orders.0"})}, n.models: {frozenset({"version"})},
            n.endpoints: {frozenset({"name"})}, "twin_orders": {frozenset({"state"})},
            n.twin_legacy: {frozenset({"_partition"})}, "api_tokens": {frozenset({"revoked_at", "active_name"})},
            "factories": {frozenset()}, "factory_clocks": {frozenset({"updated_at"})}}


SMALL_COLLECTIONS = ("digital_twin", "api_tokens", "factories")  # read whole: one document per factory, per token


def assert_fleet_ready(fdb, commands: list[dict]) -> int:
    """Every recorded read is a primary-key lookup, leads with ``factory_id`` and is served by an
    index starting with it, or is one of the fleet-wide reads above, served by an index (the
    twin collection, one small document per factory, is read whole). Returns the reads checked."""
    wide = fleet_wide_reads(fdb)
    problems = []
    for cmd in commands:
        coll, flt, ex = explained(fdb, cmd)
        index = index_of(ex["queryPlanner"]["winningPlan"])
        fields = frozenset(flt)
        if "_id" in fields:
            ok = index is not None and next(iter(index)) == "_id"
        elif "factory_id" in fields:
            ok = index is not None and next(iter(index)) == "factory_id"
        elif fields in wide.get(coll, ()):
            ok = index is not None or coll in SMALL_COLLECTIONS
        else:
            ok = False
        if not ok:
            problems.append((coll, flt, index, ex["queryPlanner"]["winningPlan"].get("stage")))
    assert not problems, f"reads that do not lead with factory_id (or are not served by such an index): {problems}"
    return len(commands)


def simulated_fleet(fdb, n: int = 3, seconds: float = 8.0, fps: float = 2.0, start: datetime = T0) -> list:
    """``n`` simulated factories' messages (frames, stock reports, station and order states)
    stored by the ingester's own path, each stamped with its factory."""
    from factory_assets.ingest.service import Ingestor
    from factory_assets.simulation.factory import FactorySimulator, Timings
    from factory_assets.simulation.fleet import fleet_plan

    plan = fleet_plan(n, seed=0)
    ingestor = Ingestor(fdb)
    for m in plan:
        sim = FactorySimulator(m.seed, 1.0, start=start, pose=m.pose, clock_offset_s=m.clock_offset_s,
                               timings=Timings(scale=0.05))
        for k in range(int(seconds * fps)):
            t = k / fps
            cam, _ = sim.camera_message(t)
            while sim.outbox:
                msg = sim.outbox.popleft()
                ingestor.handle_mqtt(msg.topic, json.dumps(msg.payload).encode(), {"kind": "test"},
                                     received_at=start + timedelta(seconds=msg.t), factory_id=m.factory_id)
            ingestor.handle_mqtt("i/cam", json.dumps(cam).encode(), {"kind": "test"},
                                 received_at=start + timedelta(seconds=t), factory_id=m.factory_id)
    ingestor.flush()
    return plan


def live_without_a_model(fdb):
    """The live updater before any model: its frame cursor at the newest frame (nothing to infer);
    it brings each factory's stock, stations and order state onto its twin."""
    from factory_assets.twin.live import LiveTwinUpdater

    fdb.counters.update_one({"_id": "cursor:twin-live"}, {"$set": {"seq": FrameSequence(fdb).horizon()}}, upsert=True)
    return LiveTwinUpdater(fdb, predictor=None, change_stream=False, log=lambda *_: None)


def test_every_per_factory_read_of_a_fleet_leads_with_factory_id_on_an_index_that_starts_with_it(recorded_fdb):
    """The hot paths with three factories: ingest, the live twin (stock, stations, order states,
    observations), the twin API (twin, history, orders, newest frame, the fleet page's summary,
    its live reader) and the order dispatcher's passes."""
    import urllib.request

    from factory_assets.api.app import TwinApiServer
    from factory_assets.api.fleet import FleetView
    from factory_assets.twin import orders as tw
    from factory_assets.twin.state import COLOURS, Observation
    from factory_assets.twin.store import apply_observation

    fdb, recorder = recorded_fdb
    tw.ensure_indexes(fdb)
    recorder.recording.set()
    plan = simulated_fleet(fdb)
    live_without_a_model(fdb).step()
    for m in plan:
        for f in fdb.frames.find({"factory_id": m.factory_id, "seq": {"$gt": 0}}, {"image": 0}):
            apply_observation(fdb, Observation(m.factory_id, f["_id"], f["ts"], "v1", {c: 0.9 for c in COLOURS},
                                               {c: True for c in COLOURS}, {c: 0.5 for c in COLOURS}, "live",
                                               f["seq"]))
        kind = next(t for t in fdb.twin.find_one({"_id": m.factory_id})["reported"]["slots"].values() if t)
        tw.place_orders(fdb, m.factory_id, [kind])
    for fid in tw.factories_with_work(fdb):
        tw.follow(fdb, fid)
        tw.next_send(fdb, fid, now=T0 + timedelta(seconds=60))
    with TwinApiServer(fdb) as api:
        for m in plan:
            for path in ("/twin", "/twin/history?limit=5", "/orders"):
                with urllib.request.urlopen(f"{api.url}/api/factories/{m.factory_id}{path}", timeout=10) as r:
                    assert r.status == 200
            with urllib.request.urlopen(f"{api.url}/api/frames/latest?factory={m.factory_id}", timeout=10) as r:
                assert json.loads(r.read())["factory_id"] == m.factory_id
        with urllib.request.urlopen(f"{api.url}/api/fleet", timeout=10) as r:
            assert [f["id"] for f in json.loads(r.read())["factories"]] == ["factory-1", "factory-2", "factory-3"]
    FleetView(fdb).summary()
    recorder.recording.clear()
    assert assert_fleet_ready(fdb, recorder.commands) > 50


def test_the_fleet_summary_reads_what_arrived_whatever_the_history(recorded_fdb):
    """executionStats on the real server: the summary's reads examine the same documents with 300
    or 3000 older frames and history entries per fleet, and a refresh with nothing new reads no
    frame again (only the last seconds of history, which a late writer may still append to)."""
    from factory_assets.api.fleet import LATE_S, FleetView
    from factory_assets.storage.indexes import ensure_indexes
    from factory_assets.twin.state import COLOURS, Observation
    from factory_assets.twin.store import apply_observation
    from factory_assets.vocabulary import utcnow

    base, recorder = recorded_fdb
    client = base.db.client

    def examined(fdb, view: FleetView) -> dict[str, int]:
        recorder.clear()
        recorder.recording.set()
        view.summary(now=utcnow())
        recorder.recording.clear()
        assert_fleet_ready(fdb, recorder.commands)
        out: dict[str, int] = {}
        for c in recorder.commands:
            coll, _, ex = explained(fdb, c, "executionStats")
            out[coll] = out.get(coll, 0) + ex["executionStats"]["totalDocsExamined"]
        return out

    def fleet_with_history(older: int) -> tuple[FactoryDB, dict, dict]:
        fdb = FactoryDB(client[f"{base.db.name}_{older}"], base.names)
        ensure_indexes(fdb)
        if older:  # before the window: frames (lower seqs) and twin changes of hours ago
            insert_frames(fdb, [{**frame(10_000 + i), "factory_id": f"factory-{1 + i % 3}"} for i in range(older)])
            fdb.twin_history.insert_many([{"factory_id": f"factory-{1 + i % 3}", "version": -i, "kind": "reported",
                                           "at": utcnow() - timedelta(hours=5, seconds=i), "changed": ["A1"],
                                           "delta": {"red": "old"}} for i in range(older)])
        simulated_fleet(fdb, seconds=6)
        live_without_a_model(fdb).step()
        for fid in ("factory-1", "factory-2", "factory-3"):
            newest = max(fdb.frames.find({"factory_id": fid}, {"image": 0}), key=lambda d: d["seq"])
            apply_observation(fdb, Observation(fid, newest["_id"], newest["ts"], "v1", {c: 0.9 for c in COLOURS},
                                               {c: True for c in COLOURS}, {c: 0.5 for c in COLOURS}, "live",
                                               newest["seq"]))
        view = FleetView(fdb)
        first = examined(fdb, view)
        again = examined(fdb, view)
        return fdb, first, again

    try:
        fdb, some, refresh = fleet_with_history(300)
        recent = fdb.twin_history.count_documents({"at": {"$gte": utcnow() - timedelta(seconds=LATE_S + 60)}})
        _, more, _ = fleet_with_history(3000)
        assert more == some  # ten times the history, the same reads
        assert some[fdb.names.frames] <= 64  # the newest slab of seqs (FRAME_SLABS[0]) at most
        assert refresh.get(fdb.names.frames, 0) == 0
        assert refresh[fdb.names.twin_history] <= recent < some[fdb.names.twin_history] + 1
    finally:
        for older in (300, 3000):
            client.drop_database(f"{base.db.name}_{older}")
