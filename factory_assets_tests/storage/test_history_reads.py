"""A factory's twin history is read a page at a time: the API's history route, a stream's
catch-up and the hub's start read ranges of ``factory_version`` next to what they return, never
the factory's whole history (SecantusDB applies ``limit`` after reading the whole range)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from factory_assets.api.hub import history_page
from factory_assets.storage.mongo import FactoryDB
from factory_assets_tests.storage.test_hot_paths import (assert_fleet_ready, explained,  # noqa: F401 (recorded_fdb: a fixture)
                                                         recorded_fdb)

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc)
EVERY = 7  # one history entry per 7 twin versions (a frame moves the version, a change writes an entry)


def fill(fdb, factory_id: str, top: int) -> list[dict]:
    """A twin at version ``top`` whose history holds every EVERY-th version, ``at`` a second per version."""
    entries = [{"factory_id": factory_id, "version": v, "at": T0 + timedelta(seconds=v), "kind": "observed",
                "changed": ["red"]} for v in range(EVERY, top + 1, EVERY)]
    fdb.twin_history.insert_many([dict(e) for e in entries])
    fdb.twin.update_one({"_id": factory_id}, {"$set": {"version": top, "factory_id": factory_id}}, upsert=True)
    return entries


def expected(entries, *, limit, cursor=None, order="desc", since=None, until=None):
    rows = [e for e in entries if (since is None or e["at"] >= since) and (until is None or e["at"] < until)
            and (cursor is None or (e["version"] < cursor if order == "desc" else e["version"] > cursor))]
    rows.sort(key=lambda e: e["version"], reverse=order == "desc")
    return [e["version"] for e in rows[:limit]], len(rows) > limit


def examined(fdb, recorder, read) -> tuple[object, int]:
    recorder.clear()
    recorder.recording.set()
    result = read()
    recorder.recording.clear()
    assert_fleet_ready(fdb, recorder.commands)  # factory_id first, on an index that starts with it
    return result, sum(explained(fdb, c, "executionStats")[2]["executionStats"]["totalDocsExamined"]
                       for c in recorder.commands)


PAGES = [dict(limit=20), dict(limit=5, cursor=1400), dict(limit=20, order="asc", since=T0 + timedelta(seconds=700)),
         dict(limit=20, until=T0 + timedelta(seconds=900)),
         dict(limit=50, since=T0 + timedelta(seconds=1300)),
         dict(limit=10, order="asc", cursor=1000, until=T0 + timedelta(seconds=1100))]


def test_a_history_page_is_the_right_page_and_costs_the_same_with_ten_times_the_history(recorded_fdb):
    """Newest first, after a cursor, since or until a time, oldest first: the same recent 1500
    versions of factory-2 behind 0 or 14,000 older ones (and another factory's history)."""
    from factory_assets.storage.indexes import ensure_indexes

    fdb, recorder = recorded_fdb
    costs: dict = {}
    for shift, name in ((0, "a"), (14_000, "b")):  # a multiple of EVERY: the same pattern of entries
        db = FactoryDB(fdb.db.client[f"{fdb.db.name}_{name}"], fdb.names)
        ensure_indexes(db)
        try:
            entries = fill(db, "factory-2", 1500 + shift)
            fill(db, "factory-1", 3000)
            for k, page in enumerate(PAGES):
                moved = {key: (v + timedelta(seconds=shift) if isinstance(v, datetime) else
                               v + shift if key == "cursor" else v) for key, v in page.items()}
                (rows, more), cost = examined(db, recorder, lambda: history_page(
                    db, "factory-2", 1500 + shift, now=T0 + timedelta(days=1), **moved))
                assert ([r["version"] for r in rows], more) == expected(entries, **moved), page
                costs.setdefault(k, []).append(cost)
        finally:
            fdb.db.client.drop_database(db.db.name)
    for k, (few, many) in costs.items():
        assert few == many, PAGES[k]  # ten times the history, the same documents read
        assert few <= 4 * (PAGES[k]["limit"] + 1) + 64, PAGES[k]  # about the page (ranges widen 8x at most)


def test_the_history_route_and_a_streams_catch_up_read_ranges_next_to_the_page(recorded_fdb):
    import httpx

    from factory_assets.api.app import TwinApiServer
    from factory_assets.api.hub import _catch_up

    fdb, recorder = recorded_fdb
    entries = fill(fdb, "factory-2", 5000)
    with TwinApiServer(fdb) as api:
        recorder.recording.set()
        page = httpx.get(f"{api.url}/api/factories/factory-2/twin/history", params={"limit": 3}).json()
        recorder.recording.clear()
    assert [i["version"] for i in page["items"]] == [4998, 4991, 4984] and page["next_cursor"] == "4984"
    route = [c for c in recorder.commands if c.get("find") == "twin_history"]
    assert route and all(explained(fdb, c, "executionStats")[2]["executionStats"]["totalDocsExamined"] <= 64
                         for c in route)
    (out, cost) = examined(fdb, recorder, lambda: _catch_up(fdb, "factory-2", 4900))
    assert [m["version"] for m in out] == [e["version"] for e in entries if e["version"] > 4900] + [5000]
    assert cost <= 64
    # a client further behind than a replay holds gets a snapshot, after reading about a replay's worth
    (out, cost) = examined(fdb, recorder, lambda: _catch_up(fdb, "factory-2", 10))
    assert [m["type"] for m in out] == ["snapshot"] and cost <= 4 * 500


def test_the_hub_starts_from_the_newest_entries_without_reading_the_history(recorded_fdb):
    from factory_assets.api.hub import TwinHub

    fdb, recorder = recorded_fdb
    fill(fdb, "factory-2", 5000)
    hub = TwinHub(fdb)
    (_, cost) = examined(fdb, recorder, lambda: (hub._prime(), hub._check_frames()))
    # the twin, the last LATE_WINDOW versions, the frame counter
    assert hub._history["factory-2"] == 4998 and cost <= 1 + 8 + 1


def test_the_newest_frame_of_a_quiet_factory_is_read_from_its_latest_seqs_not_all_its_frames(recorded_fdb):
    """factory-2 last sent frames before 100 of factory-1's: found by ranges of seqs back from the
    horizon (factory_seq), reading about two windows of seqs with 20 or 400 older frames of its own."""
    from factory_assets.storage.frames import build_frame, insert_frames, latest_frame
    from factory_assets_tests.helpers import jpeg_bytes

    def frames(fid: str, n: int, start: int) -> list[dict]:
        return [build_frame(jpeg_bytes(seed=i % 7, size=(16, 12)), ts=T0 + timedelta(seconds=start + i),
                            camera_id="cam-1", factory_id=fid, content_type="image/jpeg", width=16, height=12,
                            source={"kind": "test"}) for i in range(n)]

    base, recorder = recorded_fdb
    costs = []
    for older in (20, 400):
        from factory_assets.storage.indexes import ensure_indexes

        db = FactoryDB(base.db.client[f"{base.db.name}_{older}"], base.names)
        ensure_indexes(db)
        try:
            insert_frames(db, frames("factory-2", older, 0))
            insert_frames(db, frames("factory-2", 5, 1000))
            insert_frames(db, frames("factory-1", 100, 2000))
            newest, cost = examined(db, recorder, lambda: latest_frame(db, {"ts": 1}, factory_id="factory-2"))
            assert newest["ts"] == T0 + timedelta(seconds=1004)
            costs.append(cost)
        finally:
            base.db.client.drop_database(db.db.name)
    # the recent window (64 seqs), the newest range of factory-2's seqs (64 wide), the counter and the frame
    assert max(costs) <= 64 + 64 + 2
