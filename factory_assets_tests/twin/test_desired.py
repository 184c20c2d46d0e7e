"""Desired stock and its orders against the embedded MongoDB: what is on order is planned and
recorded in the same compare-and-swap, so no interleaving of writers orders a piece twice."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest

from factory_assets.twin import desired as des
from factory_assets.twin.state import SLOTS, Reported
from factory_assets.twin.store import apply_reported

FID = "factory-1"
T0 = datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc)


def rack(fdb, ts: datetime, **pieces: int) -> int:
    """The controller reports ``pieces`` (``red=1``) in the first slots; the twin's new version."""
    kinds = [k.upper() for k, n in pieces.items() for _ in range(n)]
    slots = {s: (kinds[i] if i < len(kinds) else None) for i, s in enumerate(SLOTS)}
    assert apply_reported(fdb, Reported(FID, ts, slots, f"m-{ts.isoformat()}"))
    return fdb.twin.find_one({"_id": FID})["version"]


def pending(fdb, colour: str = "red") -> list[dict]:
    return list(des.orders(fdb).find({"factory_id": FID, "colour": colour, "status": "pending"}).sort("_id", 1))


def after_the_swap(monkeypatch, fdb, version: int, action) -> dict:
    """Run ``action()`` once, the first time set_desired reaches the orders collection after the
    twin moved to ``version``: between its compare-and-swap and its order inserts."""
    real = des.orders
    state = {"fired": False}

    def orders(db):
        if not state["fired"] and fdb.twin.find_one({"_id": FID}, {"version": 1})["version"] == version:
            state["fired"] = True
            action()
        return real(db)

    monkeypatch.setattr(des, "orders", orders)
    return state


def test_a_patch_based_on_the_version_of_one_whose_orders_are_not_stored_yet_orders_nothing_twice(
        fdb, monkeypatch):
    v = rack(fdb, T0)  # an empty rack
    # B's If-Match is the version A's swap produced; B runs before A has inserted its orders
    fired = after_the_swap(monkeypatch, fdb, v + 1, lambda: des.set_desired(fdb, FID, {"red": 2}, v + 1))
    twin, created = des.set_desired(fdb, FID, {"red": 2}, v)
    assert fired["fired"]
    assert [o["target_count"] for o in pending(fdb)] == [1, 2]
    assert [o["_id"] for o in created] == [o["_id"] for o in pending(fdb)]
    assert fdb.twin.find_one({"_id": FID})["version"] == v + 2


def test_racing_writers_retrying_on_conflict_order_exactly_the_missing_pieces(fdb):
    v = rack(fdb, T0, red=1)
    writers = 6
    barrier = threading.Barrier(writers)
    errors: list[BaseException] = []

    def writer():
        try:
            barrier.wait(30)
            while True:
                version = fdb.twin.find_one({"_id": FID})["version"]
                try:
                    des.set_desired(fdb, FID, {"red": 3}, version)
                    return
                except des.VersionConflict:
                    continue
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert fdb.twin.find_one({"_id": FID})["version"] == v + writers
    assert [o["target_count"] for o in pending(fdb)] == [2, 3]
    assert len(fdb.twin.find_one({"_id": FID})["on_order"]) == 2


def test_orders_lost_in_a_crash_after_the_swap_are_recreated_under_the_same_ids(fdb, monkeypatch):
    v = rack(fdb, T0)

    def crash():  # the process dies after the twin recorded the orders, before it stored them
        raise SystemExit("crash")

    after_the_swap(monkeypatch, fdb, v + 1, crash)
    with pytest.raises(SystemExit):
        des.set_desired(fdb, FID, {"red": 2, "blue": 1}, v)
    monkeypatch.undo()
    twin = fdb.twin.find_one({"_id": FID})
    assert twin["version"] == v + 1 and des.orders(fdb).count_documents({}) == 0
    ids = sorted(e["id"] for e in twin["on_order"])
    assert des.restore_orders(fdb) == 3
    assert des.restore_orders(fdb) == 0  # idempotent
    restored = list(des.orders(fdb).find().sort("_id", 1))
    assert [o["_id"] for o in restored] == ids
    assert {(o["colour"], o["target_count"], o["status"], o["published_at"]) for o in restored} == {
        ("red", 1, "pending", None), ("red", 2, "pending", None), ("blue", 1, "pending", None)}
    # the twin already counts them: the same desired stock orders nothing more
    _, created = des.set_desired(fdb, FID, {"red": 2, "blue": 1}, v + 1)
    assert created == [] and des.orders(fdb).count_documents({}) == 3


def test_a_done_order_leaves_the_twin_once_and_the_next_patch_orders_from_what_is_left(fdb):
    v = rack(fdb, T0)
    _, created = des.set_desired(fdb, FID, {"red": 2}, v)
    assert [o["target_count"] for o in created] == [1, 2]
    # the controller reports one red piece after the orders were placed
    v = rack(fdb, des.orders(fdb).find_one()["created_at"].replace(tzinfo=timezone.utc) + timedelta(seconds=1),
             red=1)
    twin = fdb.twin.find_one({"_id": FID})
    assert des.reconcile_orders(fdb, twin) == [created[0]["_id"]]
    assert des.reconcile_orders(fdb, twin) == []  # the same report again: nothing to do
    assert [e["id"] for e in fdb.twin.find_one({"_id": FID})["on_order"]] == [created[1]["_id"]]
    assert des.orders(fdb).find_one({"_id": created[0]["_id"]})["status"] == "done"
    _, more = des.set_desired(fdb, FID, {"red": 3}, v)
    assert [o["target_count"] for o in more] == [3]
    assert [o["target_count"] for o in pending(fdb)] == [2, 3]


def test_an_order_marked_done_before_a_crash_leaves_the_twin_even_once_the_report_no_longer_shows_it(fdb):
    # the crash fell between the status update and the $pull, and the piece was taken out since
    v = rack(fdb, T0)
    _, (order,) = des.set_desired(fdb, FID, {"red": 1}, v)
    des.orders(fdb).update_one({"_id": order["_id"]}, {"$set": {"status": "done"}})
    rack(fdb, order["created_at"].replace(tzinfo=timezone.utc) + timedelta(seconds=1))  # no red piece now
    twin = fdb.twin.find_one({"_id": FID})
    assert [e["id"] for e in twin["on_order"]] == [order["_id"]]
    assert des.reconcile_orders(fdb, twin) == []
    assert fdb.twin.find_one({"_id": FID})["on_order"] == []


def test_orders_placed_before_the_twin_recorded_them_still_count(fdb):
    v = rack(fdb, T0)
    # a pending order stored by an older version of the API, which kept no list on the twin
    des.orders(fdb).insert_one({"_id": f"{FID}:{v}:red:0", "factory_id": FID, "colour": "red", "type": "RED",
                                "status": "pending", "created_at": T0, "twin_version": v, "target_count": 1,
                                "published_at": None, "done_at": None})
    _, created = des.set_desired(fdb, FID, {"red": 2}, v)
    assert [o["target_count"] for o in created] == [2]
    assert sorted(e["id"] for e in fdb.twin.find_one({"_id": FID})["on_order"]) == sorted(
        o["_id"] for o in pending(fdb))
