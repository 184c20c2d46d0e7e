"""The twin's ``desired`` stock under the controller's rules (pure MongoDB, no web, no MQTT).

An order ships a piece *out* of the warehouse; nothing but a person at the input station
puts one in. So ``desired.stock`` (``{"red": 1}``: "leave one red piece in the rack") can
only ask for less:

* a desired count **below** what remains after the open orders (reported minus on order)
  places one order per piece of the difference (see ``twin.orders``);
* equal: records the desired count, places nothing;
* **above the reported count**: refused (``DesiredInvalid``: stock is added at the input station);
* above what remains but not above the reported count: refused too (an order already on
  its way cannot be called back).

The change is a compare-and-swap on the version the client last saw (``If-Match``): the
desired count and its orders are written by one atomic update of the twin, planned from the
snapshot the swap checks, so two writers never ship a piece twice.
"""
from __future__ import annotations

from factory_assets.twin import orders as _orders
from factory_assets.twin.orders import (ORDERS_COLLECTION, IdempotencyConflict, NoStock, UnknownFactory,
                                        VersionConflict, available_counts, list_orders, on_order_counts,
                                        reported_counts)
from factory_assets.vocabulary import COLOUR_TO_TYPE, COLOURS

__all__ = ["ORDERS_COLLECTION", "DesiredInvalid", "IdempotencyConflict", "NoStock", "UnknownFactory",
           "VersionConflict", "ensure_indexes", "list_orders", "orders", "plan_shipments", "reported_counts",
           "set_desired"]

orders = _orders.orders


class DesiredInvalid(ValueError):
    pass


def ensure_indexes(fdb) -> None:
    _orders.ensure_indexes(fdb)


def plan_shipments(twin: dict, stock: dict) -> list[str]:
    """The workpiece types to ship so the rack holds ``stock``; raises ``DesiredInvalid``."""
    reported, ordered, left = reported_counts(twin), on_order_counts(twin), available_counts(twin)
    ship: list[str] = []
    for colour in COLOURS:
        if colour not in stock:
            continue
        want = stock[colour]
        if want > reported[colour]:
            raise DesiredInvalid(f"desired {colour}={want} is above the {reported[colour]} the controller reports: "
                                 "stock is added at the input station, not by an order")
        if want > left[colour]:
            raise DesiredInvalid(f"desired {colour}={want}, but {ordered[colour]} of the {reported[colour]} "
                                 f"reported {'is' if ordered[colour] == 1 else 'are'} already on order, leaving "
                                 f"{left[colour]}; an order on its way cannot be called back")
        ship += [COLOUR_TO_TYPE[colour]] * (left[colour] - want)
    return ship


def set_desired(fdb, factory_id: str, stock: dict, expected_version: int) -> tuple[dict, list[dict]]:
    """CAS ``desired.stock`` on ``expected_version`` and place the orders that ship the
    difference. Returns the new twin and the orders placed. Raises ``UnknownFactory``,
    ``VersionConflict`` or ``DesiredInvalid`` (and then changes nothing)."""
    twin = fdb.twin.find_one({"_id": factory_id})
    if twin is None:
        raise UnknownFactory(factory_id)
    if twin.get("version", 0) != expected_version:
        raise VersionConflict(twin.get("version", 0))
    if not (twin.get("reported") or {}).get("slots"):
        raise DesiredInvalid(f"factory {factory_id!r} has reported no stock yet (f/i/stock)")
    ship = plan_shipments(twin, stock)
    try:
        new_twin, placed, _ = _orders.place_orders(fdb, factory_id, ship, expected_version=expected_version,
                                                   desired=dict(stock), source="desired")
    except NoStock as exc:  # not after the check above on the same version; kept for clarity
        raise DesiredInvalid(str(exc)) from None
    return new_twin, placed
