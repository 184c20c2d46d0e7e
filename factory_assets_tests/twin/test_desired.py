"""Orders that ship a piece out, and the desired stock, against the embedded MongoDB: placing is
one compare-and-swap on the twin, states follow the controller's messages as the real ingester
stores them, and a send is repeated (with a fresh ts) only until the factory acknowledges it."""
from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone

import pytest

from factory_assets.storage.clocks import record_offset
from factory_assets.twin import desired as des
from factory_assets.twin import orders as tw
from factory_assets.twin.state import SLOTS, Reported
from factory_assets.twin.store import apply_reported
from factory_assets.vocabulary import ORDER_STATE_TOPIC, parse_ts, utcnow

FID = "factory-1"
T0 = datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc)
RULES = tw.OrderRules(ack_timeout_s=15, max_attempts=3)


def rack(fdb, ts: datetime = T0, **pieces: int) -> int:
    """The controller reports ``pieces`` (``red=1``) in the first slots; the twin's new version."""
    kinds = [k.upper() for k, n in pieces.items() for _ in range(n)]
    slots = {s: (kinds[i] if i < len(kinds) else None) for i, s in enumerate(SLOTS)}
    assert apply_reported(fdb, Reported(FID, ts, slots, f"m-{ts.isoformat()}"))
    return fdb.twin.find_one({"_id": FID})["version"]


def controller_says(fdb, topic: str, payload: dict) -> None:
    """One controller message, stored by the real ingester (as ``ingest mqtt`` stores it)."""
    from factory_assets.ingest.service import Ingestor

    ingestor = Ingestor(fdb, factory_id=FID)
    ingestor.handle_mqtt(topic, json.dumps({"ts": tw.controller_ts(utcnow()), **payload}).encode())
    ingestor.flush()
    assert fdb.mqtt.count_documents({"topic": topic, "payload.ts": {"$exists": True}}) >= 1


def order_state(fdb, order_id: str) -> str:
    return tw.orders(fdb).find_one({"_id": order_id})["state"]


def step(fdb, now: datetime | None = None, connected: bool = True):
    """One dispatcher step without MQTT: follow the stored messages, then record what to send."""
    tw.follow(fdb, FID, RULES)
    return tw.next_send(fdb, FID, RULES, now=now, connected=connected)


def test_an_order_needs_a_piece_the_reported_stock_still_holds_after_what_is_on_order(fdb):
    rack(fdb, red=2, blue=1)
    _, first, _ = tw.place_orders(fdb, FID, ["RED"])
    _, second, _ = tw.place_orders(fdb, FID, ["RED"])
    with pytest.raises(tw.NoStock, match="no red piece to ship: the controller reports 2 red .* 2 are already on order"):
        tw.place_orders(fdb, FID, ["RED"])
    with pytest.raises(tw.NoStock, match="no white piece"):
        tw.place_orders(fdb, FID, ["WHITE"])
    assert [o["state"] for o in first + second] == ["queued", "queued"]
    assert tw.available_counts(fdb.twin.find_one({"_id": FID})) == {"blue": 1, "red": 0, "white": 0}
    assert tw.orders(fdb).count_documents({}) == 2


def test_racing_requests_for_the_last_piece_of_a_colour_place_one_order(fdb):
    rack(fdb, red=1)
    writers = 6
    barrier = threading.Barrier(writers)
    outcomes: list[str] = []

    def request():
        barrier.wait(30)
        try:
            tw.place_orders(fdb, FID, ["RED"])
            outcomes.append("placed")
        except tw.NoStock:
            outcomes.append("no stock")

    threads = [threading.Thread(target=request) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["no stock"] * (writers - 1) + ["placed"]
    assert tw.orders(fdb).count_documents({"colour": "red"}) == 1
    assert len(fdb.twin.find_one({"_id": FID})["orders"]) == 1


def test_an_idempotency_key_places_one_order_and_refuses_another_type_under_it(fdb):
    rack(fdb, red=2, blue=1)
    _, (order,), replayed = tw.place_orders(fdb, FID, ["RED"], key="0b5e-retry-me")
    assert not replayed
    version = fdb.twin.find_one({"_id": FID})["version"]
    _, (again,), replayed = tw.place_orders(fdb, FID, ["RED"], key="0b5e-retry-me")
    assert replayed and again["_id"] == order["_id"]
    assert fdb.twin.find_one({"_id": FID})["version"] == version  # a replay changes nothing
    with pytest.raises(tw.IdempotencyConflict, match="already placed order .* for RED, not BLUE"):
        tw.place_orders(fdb, FID, ["BLUE"], key="0b5e-retry-me")
    assert tw.orders(fdb).count_documents({}) == 1


def test_a_desired_count_below_the_reported_one_ships_the_difference_and_above_it_is_refused(fdb):
    v = rack(fdb, red=3, white=1)
    with pytest.raises(des.DesiredInvalid, match="above the 3 the controller reports: stock is added at the input"):
        des.set_desired(fdb, FID, {"red": 4}, v)
    twin, placed = des.set_desired(fdb, FID, {"red": 1}, v)
    assert [o["type"] for o in placed] == ["RED", "RED"]
    assert twin["version"] == v + 1 and twin["desired"]["stock"] == {"red": 1}
    history = fdb.twin_history.find_one({"factory_id": FID, "version": v + 1})
    assert history["kind"] == "desired" and history["changed"] == [o["_id"] for o in placed]
    # what remains after the two orders is 1: the same desired count places nothing more
    twin, placed = des.set_desired(fdb, FID, {"red": 1}, v + 1)
    assert placed == [] and tw.orders(fdb).count_documents({}) == 2
    with pytest.raises(des.DesiredInvalid, match="2 of the 3 reported are already on order, leaving 1"):
        des.set_desired(fdb, FID, {"red": 2}, v + 2)
    with pytest.raises(des.VersionConflict):
        des.set_desired(fdb, FID, {"white": 0}, v)


def test_orders_lost_in_a_crash_after_the_swap_are_recreated_under_the_same_ids(fdb, monkeypatch):
    rack(fdb, red=2, blue=1)
    real_store = tw._store

    def crash(*args, **kwargs):  # the process dies after the twin recorded the orders, before storing them
        raise SystemExit("crash")

    monkeypatch.setattr(tw, "_store", crash)
    with pytest.raises(SystemExit):
        des.set_desired(fdb, FID, {"red": 0, "blue": 0}, 1)
    monkeypatch.setattr(tw, "_store", real_store)
    twin = fdb.twin.find_one({"_id": FID})
    assert twin["version"] == 2 and tw.orders(fdb).count_documents({}) == 0
    ids = sorted(e["id"] for e in twin["orders"])
    assert tw.restore_orders(fdb) == 3
    assert tw.restore_orders(fdb) == 0  # idempotent
    restored = list(tw.orders(fdb).find().sort("_id", 1))
    assert [o["_id"] for o in restored] == ids and {o["state"] for o in restored} == {"queued"}
    # the twin already counts them: nothing is left to ship
    with pytest.raises(tw.NoStock):
        tw.place_orders(fdb, FID, ["BLUE"])


def test_a_send_carries_a_fresh_ts_in_the_factory_clock_and_is_repeated_only_until_the_factory_acknowledges(fdb):
    rack(fdb, red=1)
    record_offset(fdb, FID, 120.0, samples=20)  # the controller's clock runs 2 minutes ahead of ours
    _, (order,), _ = tw.place_orders(fdb, FID, ["RED"])
    t0 = utcnow()
    first = step(fdb, t0)
    assert first.payload == {"type": "RED", "ts": tw.controller_ts(t0 + timedelta(seconds=120))}
    tw.record_broker_ack(fdb, first, True)
    assert order_state(fdb, order["_id"]) == "sent"
    assert step(fdb, t0 + timedelta(seconds=5)) is None  # within the acknowledgement timeout
    later = t0 + timedelta(seconds=16)
    again = step(fdb, later)
    assert again.attempt == 2 and again.payload["ts"] == tw.controller_ts(later + timedelta(seconds=120))
    controller_says(fdb, ORDER_STATE_TOPIC, {"state": "ORDERED", "type": "RED"})
    assert step(fdb, t0 + timedelta(seconds=100)) is None  # acknowledged: never again
    assert step(fdb, t0 + timedelta(seconds=1000)) is None
    stored = tw.orders(fdb).find_one({"_id": order["_id"]})
    assert stored["state"] == "ordered" and len(stored["attempts"]) == 2
    assert [a["clock_offset_s"] for a in stored["attempts"]] == [120.0, 120.0]


def test_order_states_follow_the_controllers_messages_and_the_next_order_waits_for_waiting_for_order(fdb):
    rack(fdb, red=1, blue=1)
    _, (red,), _ = tw.place_orders(fdb, FID, ["RED"])
    _, (blue,), _ = tw.place_orders(fdb, FID, ["BLUE"])
    assert step(fdb).payload["type"] == "RED"
    for said, expected in (("ORDERED", "ordered"), ("IN_PROCESS", "in_process"), ("SHIPPED", "shipped")):
        controller_says(fdb, ORDER_STATE_TOPIC, {"state": said, "type": "RED"})
        assert step(fdb) is None, f"nothing is sent while the factory says {said}"
        assert order_state(fdb, red["_id"]) == expected
    assert order_state(fdb, blue["_id"]) == "queued"
    controller_says(fdb, ORDER_STATE_TOPIC, {"state": "WAITING_FOR_ORDER", "type": "RED"})
    assert step(fdb).payload["type"] == "BLUE"
    events = [e["state"] for e in tw.orders(fdb).find_one({"_id": red["_id"]})["events"]]
    assert events == ["queued", "sent", "ordered", "in_process", "shipped"]


def test_an_order_waits_while_the_factory_works_on_one_placed_elsewhere(fdb):
    rack(fdb, red=1)
    controller_says(fdb, ORDER_STATE_TOPIC, {"state": "IN_PROCESS", "type": "WHITE"})  # the joystick's order
    _, (order,), _ = tw.place_orders(fdb, FID, ["RED"])
    assert step(fdb) is None and order_state(fdb, order["_id"]) == "queued"
    assert "working on an order (f/i/order IN_PROCESS WHITE)" in tw.dispatch_state(fdb, FID)["waiting"]
    controller_says(fdb, ORDER_STATE_TOPIC, {"state": "WAITING_FOR_ORDER", "type": "WHITE"})
    assert step(fdb).payload["type"] == "RED"


def test_an_order_the_factory_never_acknowledges_fails_after_the_bounded_sends_with_the_reason(fdb):
    rack(fdb, red=1)
    _, (order,), _ = tw.place_orders(fdb, FID, ["RED"])
    t0 = utcnow()
    for k in range(RULES.max_attempts):
        send = step(fdb, t0 + timedelta(seconds=16 * k))
        assert send.attempt == k + 1
        tw.record_broker_ack(fdb, send, True)
    assert step(fdb, t0 + timedelta(seconds=16 * RULES.max_attempts)) is None
    stored = tw.orders(fdb).find_one({"_id": order["_id"]})
    assert stored["state"] == "failed" and stored["reason"].startswith("the factory never acknowledged the order: 3")
    assert tw.dispatch_state(fdb, FID)["current"] is None
    # its piece is available again
    assert tw.available_counts(fdb.twin.find_one({"_id": FID})) == {"blue": 0, "red": 0, "white": 0}
    assert tw.sync_twin(fdb, FID)
    assert tw.available_counts(fdb.twin.find_one({"_id": FID}))["red"] == 1


def test_a_warehouse_fault_while_an_order_is_in_work_fails_it_with_the_reason(fdb):
    rack(fdb, blue=1)
    _, (order,), _ = tw.place_orders(fdb, FID, ["BLUE"])
    assert step(fdb) is not None
    controller_says(fdb, ORDER_STATE_TOPIC, {"state": "ORDERED", "type": "BLUE"})
    controller_says(fdb, "f/i/state/hbw", {"station": "hbw", "code": 4, "description": "no workpiece",
                                           "active": 1})
    assert step(fdb) is None
    stored = tw.orders(fdb).find_one({"_id": order["_id"]})
    assert stored["state"] == "failed"
    assert stored["reason"] == ("the high-bay warehouse reported a fault (f/i/state/hbw code 4, error: "
                                "no workpiece)")
    assert "fault" in tw.dispatch_state(fdb, FID)["waiting"]


def test_the_twin_shows_the_orders_in_work_with_their_states_as_versioned_changes(fdb):
    rack(fdb, red=1, white=1)
    _, (red,), _ = tw.place_orders(fdb, FID, ["RED"])
    _, (white,), _ = tw.place_orders(fdb, FID, ["WHITE"])
    step(fdb)
    assert tw.sync_twin(fdb, FID) and not tw.sync_twin(fdb, FID)
    twin = fdb.twin.find_one({"_id": FID})
    assert [(e["id"], e["state"]) for e in twin["orders"]] == [(red["_id"], "sent"), (white["_id"], "queued")]
    change = fdb.twin_history.find_one({"factory_id": FID, "version": twin["version"]})
    assert change["kind"] == "order" and change["orders"] == [{"id": red["_id"], "type": "RED", "state": "sent"}]
    assert twin["history_version"] == twin["version"]
    for said in ("ORDERED", "IN_PROCESS", "SHIPPED"):
        controller_says(fdb, ORDER_STATE_TOPIC, {"state": said, "type": "RED"})
        step(fdb)
        tw.sync_twin(fdb, FID)
    twin = fdb.twin.find_one({"_id": FID})
    assert [e["id"] for e in twin["orders"]] == [white["_id"]]  # shipped: no longer in work
    states = [c["orders"][0]["state"] for c in fdb.twin_history.find({"factory_id": FID, "kind": "order"})
              .sort("version", 1) if c["orders"][0]["id"] == red["_id"]]
    assert states == ["queued", "sent", "ordered", "in_process", "shipped"]


def test_orders_placed_under_the_earlier_rules_are_retired_and_never_sent(fdb):
    rack(fdb, red=1)
    tw.orders(fdb).insert_one({"_id": f"{FID}:1:red:0", "factory_id": FID, "colour": "red", "type": "RED",
                               "status": "pending", "created_at": T0, "target_count": 2, "published_at": None})
    fdb.twin.update_one({"_id": FID}, {"$set": {"on_order": [{"id": f"{FID}:1:red:0", "colour": "red"}]}})
    tw.ensure_indexes(fdb)
    old = tw.orders(fdb).find_one({"_id": f"{FID}:1:red:0"})
    assert old["state"] == "failed" and "INTO the warehouse" in old["reason"]
    assert "on_order" not in fdb.twin.find_one({"_id": FID})
    assert step(fdb) is None
    assert parse_ts(tw.controller_ts(T0)) == T0


def test_a_queued_order_whose_colour_is_gone_when_its_turn_comes_fails_without_being_sent(fdb):
    rack(fdb, red=1)
    _, (order,), _ = tw.place_orders(fdb, FID, ["RED"])
    rack(fdb, T0 + timedelta(seconds=30))  # another customer's order took the red piece meanwhile
    assert step(fdb) is None
    stored = tw.orders(fdb).find_one({"_id": order["_id"]})
    assert stored["state"] == "failed" and stored["attempts"] == []
    assert stored["reason"].startswith("no red piece left in the reported stock when its turn came")
