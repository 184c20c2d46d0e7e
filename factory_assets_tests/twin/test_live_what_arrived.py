"""A live step's controller work costs what arrived: after its start-up catch-up the updater reads
the stock, station and order messages stored since its last look (one ``_id`` range of the ``mqtt``
collection) and applies them to exactly their factories, so a step at 50 factories where one
factory's report arrived sends the same commands as at one factory. Real MongoDB (the fixtures)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from bson import ObjectId

from factory_assets.storage.factories import note_seen
from factory_assets.storage.mongo import FactoryDB
from factory_assets.twin import live
from factory_assets.twin.live import LiveTwinUpdater
from factory_assets.twin.store import get_twin
from factory_assets.vocabulary import SLOTS, STOCK_TOPIC
from factory_assets_tests.fixtures.mongo import CommandRecorder, recorded_client
from factory_assets_tests.storage.test_hot_paths import index_of

T0 = datetime(2026, 12, 6, 9, 0, tzinfo=timezone.utc)


@pytest.fixture
def watched(mongo_uri, database_name, fdb):
    commands = CommandRecorder()
    with recorded_client(mongo_uri, database_name, fdb, commands) as db:
        yield db, commands


def ts(t: float) -> str:
    return (T0 + timedelta(seconds=t)).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(t * 1000) % 1000:03d}Z"


def stock(t: float, red_at: str = "A1") -> dict:
    return {"ts": ts(t), "stockItems": [{"location": s, "workpiece": {"type": "RED", "state": "RAW", "id": "r1"}
                                         if s == red_at else None} for s in SLOTS]}


def store(fdb, topic: str, payload: dict, factory_id: str, **extra) -> None:
    """A controller message stored as the ingester stores it."""
    from factory_assets.vocabulary import parse_ts

    at = parse_ts(payload["ts"])
    fdb.mqtt.insert_one({"topic": topic, "ts": at, "received_at": at, "factory_id": factory_id, "payload": payload,
                         "message_id": f"{factory_id}:{topic}:{payload['ts']}", **extra})


def fleet(fdb, n: int) -> list[str]:
    """``n`` factories, each with a stock report and a warehouse state stored and listed."""
    ids = [f"factory-{k}" for k in range(1, n + 1)]
    for fid in ids:
        note_seen(fdb, fid)
        store(fdb, STOCK_TOPIC, stock(0), fid)
        store(fdb, "f/i/state/hbw", {"ts": ts(0), "station": "hbw", "code": 1, "description": "", "active": 0}, fid)
    return ids


def reported_slot(fdb, fid: str, slot: str):
    return ((get_twin(fdb, fid) or {}).get("reported") or {}).get("slots", {}).get(slot)


def one_report_step(fdb, commands, n: int) -> list[tuple[str, str, dict]]:
    """The commands of the step after the start-up, at ``n`` factories, where factory-1's report arrived."""
    fleet(fdb, n)
    updater = LiveTwinUpdater(fdb, predictor=None, change_stream=False)
    updater.step()  # the start-up: every factory caught up once
    assert all(reported_slot(fdb, f"factory-{k}", "A1") == "RED" for k in range(1, n + 1))
    store(fdb, STOCK_TOPIC, stock(5, red_at="B2"), "factory-1")
    commands.recording.set()
    updater.step({fdb.names.mqtt})
    commands.recording.clear()
    assert reported_slot(fdb, "factory-1", "B2") == "RED"
    return commands.sent


def shape(sent) -> list[tuple[str, str]]:
    return sorted((name, coll) for name, coll, _ in sent)


def test_a_step_where_one_factorys_report_arrived_costs_the_same_at_one_and_at_fifty_factories(
        watched, mongo_uri, monkeypatch):
    from factory_assets.storage.mongo import connect

    monkeypatch.setattr(live, "CONTROLLER_REFRESH_S", 3600.0)  # no periodic look in the measured step
    fdb, commands = watched
    at_one = one_report_step(fdb, commands, 1)
    commands.clear()
    other = FactoryDB(fdb.db.client[fdb.db.name + "_50"], fdb.names)
    connect(mongo_uri, other.db.name)  # its indexes
    try:
        at_fifty = one_report_step(other, commands, 50)
    finally:
        fdb.db.client.drop_database(other.db.name)
    assert shape(at_fifty) == shape(at_one)
    # the twin read and written is factory-1's; no other factory is named
    named = " ".join(str(c) for _, _, c in at_fifty)
    assert "'factory-1'" in named and not any(f"'factory-{k}'" in named for k in range(2, 51))


def test_a_report_stored_while_the_updater_was_stopped_is_applied_after_its_restart(fdb):
    fleet(fdb, 3)
    first = LiveTwinUpdater(fdb, predictor=None, change_stream=False)
    first.step()
    first.step()
    del first  # stopped
    store(fdb, STOCK_TOPIC, stock(10, red_at="C3"), "factory-2")
    store(fdb, "f/i/state/hbw", {"ts": ts(10), "station": "hbw", "code": 4, "description": "no RED piece",
                                 "active": 0}, "factory-3")
    # another tool's report, with an _id of its own choosing (no ObjectId: no cursor ever sees it)
    store(fdb, STOCK_TOPIC, stock(11, red_at="A3"), "factory-1", _id="other-tool-1")
    again = LiveTwinUpdater(fdb, predictor=None, change_stream=False)
    again.step()
    assert reported_slot(fdb, "factory-2", "C3") == "RED" and reported_slot(fdb, "factory-2", "A1") is None
    assert get_twin(fdb, "factory-3")["reported"]["stations"]["hbw"]["fault"] is True
    assert reported_slot(fdb, "factory-1", "A3") == "RED"  # the restart's catch-up reads it
    # and the twin never regresses: an older report arriving now is not shown
    store(fdb, STOCK_TOPIC, stock(7, red_at="A2"), "factory-2")
    again.step({fdb.names.mqtt})
    assert reported_slot(fdb, "factory-2", "C3") == "RED" and reported_slot(fdb, "factory-2", "A2") is None


def test_a_message_made_visible_late_is_applied_by_the_periodic_look(fdb, monkeypatch):
    monkeypatch.setattr(live, "CONTROLLER_REFRESH_S", 3600.0)
    fleet(fdb, 2)
    updater = LiveTwinUpdater(fdb, predictor=None, change_stream=False)
    updater.step()
    store(fdb, "f/i/state/hbw", {"ts": ts(3), "station": "hbw", "code": 2, "description": "", "active": 1},
          "factory-1")
    updater.step({fdb.names.mqtt})
    # another writer's message, its ObjectId made two seconds earlier, visible only now
    late = ObjectId.from_datetime(updater.arrivals.after.generation_time - timedelta(seconds=2))
    store(fdb, STOCK_TOPIC, stock(4, red_at="B3"), "factory-2", _id=late)
    updater.step({fdb.names.mqtt})
    assert reported_slot(fdb, "factory-2", "B3") is None  # a strict look passes it
    monkeypatch.setattr(live, "CONTROLLER_REFRESH_S", 0.0)
    updater.step({fdb.names.mqtt})
    assert reported_slot(fdb, "factory-2", "B3") == "RED"
    assert get_twin(fdb, "factory-1")["reported"]["stations"]["hbw"]["code"] == 2


def test_what_arrived_and_whose_clock_moved_are_index_ranges_reading_only_the_new(watched, monkeypatch):
    from factory_assets.storage.clocks import record_offset

    monkeypatch.setattr(live, "CONTROLLER_REFRESH_S", 0.0)  # every step also looks at late messages and clocks
    fdb, commands = watched
    fleet(fdb, 3)
    an_hour_ago = int((datetime.now(timezone.utc) - timedelta(hours=1)).timestamp())
    for k in range(1, 60):  # a history, stored an hour ago
        store(fdb, "f/i/state/hbw", {"ts": ts(k), "station": "hbw", "code": 1 + k % 2, "description": "",
                                     "active": 0}, f"factory-{1 + k % 3}",
              _id=ObjectId((an_hour_ago + k).to_bytes(4, "big") + k.to_bytes(8, "big")))
    updater = LiveTwinUpdater(fdb, predictor=None, change_stream=False)
    updater.step()
    updater.step({fdb.names.mqtt})
    store(fdb, STOCK_TOPIC, stock(100, red_at="C1"), "factory-2")
    record_offset(fdb, "factory-3", 2.5, samples=10)
    commands.recording.set()
    updater.step({fdb.names.mqtt})
    commands.recording.clear()
    assert reported_slot(fdb, "factory-2", "C1") == "RED"
    assert get_twin(fdb, "factory-3")["clock"]["offset_s"] == 2.5
    looks = {coll: c for name, coll, c in commands.sent if name == "find" and coll in (fdb.names.mqtt, "factory_clocks")
             and "factory_id" not in c.get("filter", {})}
    assert set(looks) == {fdb.names.mqtt, "factory_clocks"}
    for coll, cmd in looks.items():
        body = {k: cmd[k] for k in ("find", "filter", "projection", "hint") if k in cmd}
        ex = fdb.db.command({"explain": body, "verbosity": "executionStats"})
        assert index_of(ex["queryPlanner"]["winningPlan"]) == ({"_id": 1} if coll == fdb.names.mqtt
                                                               else {"updated_at": 1})
        # the new report and the sweep's few seconds back, not the hour's 59
        assert ex["executionStats"]["totalDocsExamined"] < 30, (coll, ex["executionStats"]["totalDocsExamined"])
