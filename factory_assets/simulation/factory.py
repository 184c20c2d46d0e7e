"""The simulated Fischertechnik factory itself, behaving like the TXT controller's programs
(``fischertechnik/txt_training_factory``: facts taken from them, nothing copied): its
warehouse, the orders it ships, the pieces arriving at its input station, the crane, the
camera pictures and the environment sensors, as pure functions of a seed, the simulated
time and the orders it receives. No network: :mod:`factory_assets.simulation.publisher`
publishes it over MQTT; ``docs/simulator.md`` tells the whole behaviour.

Payloads as the controller writes them (every ``ts`` in the controller's clock,
``YYYY-MM-DDTHH:MM:SS.fffZ``):

* ``i/cam``     ``{"ts", "data": "data:image/jpeg;base64,..."}``: a 320x240 JPEG (a factory's
  further cameras, :class:`Camera`, add their ``"camera_id"``: the controller has one camera);
* ``f/i/stock`` ``{"ts", "stockItems": [{"workpiece": {"id", "type", "state"} | null, "location"}, ...]}``,
  the nine slots A1..C3;
* ``f/i/order`` ``{"ts", "state", "type"}``; ``f/i/state/<station>`` ``{"ts", "station", "code",
  "description", "active"}`` (+ ``"target"`` for ``vgr``);
* ``i/bme680``  ``{"ts", "t", "rt", "h", "rh", "p", "iaq", "aq", "gr"}`` and ``i/ldr`` ``{"ts", "ldr", "br"}``
  (``br`` a string, as the controller prints it);
* ``i/broadcast`` ``{"ts", "hardwareId", "hardwareModel", "softwareName", "softwareVersion", "message"}``.

Time is in seconds since ``start`` (the true time of t=0); the controller's clock reads
``start + t + clock_offset_s``. Two racks are kept: the one the warehouse *reports*
(``items``/``stock``, changed the moment the warehouse decides, before the crane moves) and
the one the camera *sees* (``shown``/``shown_stock``, changed when the crane has travelled).
"""
from __future__ import annotations

import base64
import heapq
import json
import logging
import math
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, NamedTuple

import numpy as np

from factory_assets.simulation.render import SLOTS, TYPES, CameraPose, encode_jpeg, render_warehouse
from factory_assets.vocabulary import (BME680_TOPIC, CRANE_TRAVEL_S, LDR_TOPIC, ORDER_MAX_AGE_S,  # noqa: F401
                                       ORDER_STATE_TOPIC, STATION_ERROR_CODE, STATION_STATE_PREFIX, STATIONS,
                                       STOCK_TOPIC, parse_ts)

logger = logging.getLogger(__name__)

# The order in which the controller's warehouse searches its rack (TxtHighBayWarehouseStorage):
# column 1 to 3, in each column the bottom row first. An incoming piece goes to the first empty
# slot; an order ships the first piece of its colour.
SEARCH_ORDER: tuple[str, ...] = ("C1", "B1", "A1", "C2", "B2", "A2", "C3", "B3", "A3")

FILL_CYCLE = 16  # decisions (an arrival or a customer's order) from one fill-level peak to the next

# Station state codes as the controller's LED codes (vocabulary.STATION_CODES).
READY, BUSY = 1, 2
# The input/output stations report their light barrier: 1 = free, 0 = a piece is there.
FREE, OCCUPIED = 1, 0
BUSY_ORDER_POLICIES = ("latch", "ignore")
CONTROLLER_VERSION = "0.8.1"  # the controller programs' version this simulator imitates


def iso_ms(dt: datetime) -> str:
    """``2026-11-23T10:00:00.123Z``."""
    dt = dt.astimezone(timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def brightness_string(ldr: int) -> str:
    """``br`` of ``i/ldr`` as the controller computes and prints it: ``(15000 - ldr) / 150``
    rounded to one decimal and written with the stream's default format (``"53.3"``, ``"53"``)."""
    value = float(np.float32((15000 - int(ldr)) / np.float32(150.0)))
    return format(round(value * 10) / 10, "g")


@dataclass(frozen=True)
class Timings:
    """How long the factory takes (seconds, before ``scale``). Only the 2 s pause between
    SHIPPED and WAITING_FOR_ORDER is in the controller's source; the rest are our estimates of
    the real machine (*unconfirmed*). ``scale`` multiplies every duration (tests: 0.01)."""
    crane_travel_s: tuple[float, float] = CRANE_TRAVEL_S  # report -> the piece is in/out of its slot
    intake_s: float = 20.0  # the robot takes a raw piece from the input: colour sensor, NFC tag
    handover_s: float = 6.0  # a container at the conveyor -> the robot has put in / taken out the piece
    process_s: float = 60.0  # oven, saw and sorting line of an order's piece
    deliver_s: float = 12.0  # sorted piece -> at the output station (SHIPPED)
    shipped_wait_s: float = 2.0  # SHIPPED -> WAITING_FOR_ORDER (the controller's own pause)
    pickup_s: float = 20.0  # a person takes the shipped piece off the output station
    customer_wait_s: float = 5.0  # the other customer orders this long after the factory is free
    fault_clear_s: float | None = 60.0  # a warehouse fault is quit after this (None: only f/o/state/ack)
    scale: float = 1.0

    def __post_init__(self):
        lo, hi = self.crane_travel_s
        if not 0 <= lo <= hi:
            raise ValueError(f"crane_travel_s must be (min, max) with 0 <= min <= max, got {self.crane_travel_s}")
        for name in ("intake_s", "handover_s", "process_s", "deliver_s", "shipped_wait_s", "pickup_s",
                     "customer_wait_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.fault_clear_s is not None and self.fault_clear_s <= 0:
            raise ValueError("fault_clear_s must be > 0 (or None)")
        if self.scale < 0:
            raise ValueError("scale must be >= 0")

    def of(self, seconds: float) -> float:
        return seconds * self.scale

    def crane(self, slot: str) -> float:
        """The crane's travel between the conveyor and ``slot``: ``min`` for C1 (the nearest, the
        first the warehouse fills) up to ``max`` for A3, linear in the number of slots between."""
        lo, hi = self.crane_travel_s
        distance = (int(slot[1]) - 1) + (2 - "ABC".index(slot[0]))  # 0 (C1) .. 4 (A3)
        return (lo + (hi - lo) * distance / 4) * self.scale


@dataclass(frozen=True)
class StockChange:
    t: float  # when the warehouse reported it (f/i/stock), seconds since the start
    slot: str
    before: dict | None  # the workpiece that was there (None: the slot was empty)
    after: dict | None  # the workpiece now there (None: it was fetched)
    visible_at: float | None = None  # when the camera sees it (the crane has travelled); None: at t

    @property
    def kind(self) -> str:
        return "store" if self.after is not None else "retrieve"

    @property
    def seen_at(self) -> float:
        return self.t if self.visible_at is None else self.visible_at

    def in_transit(self, t: float) -> bool:
        """The report says it happened but the rack does not show it yet."""
        return self.t <= t < self.seen_at


@dataclass(frozen=True)
class Camera:
    """A further camera looking at the factory's rack, beside the controller's own: ``camera_id``
    is what its ``i/cam`` messages carry (the ingester stamps its frames with it), ``pose`` where
    it looks from. The controller's own camera is the simulator's ``pose``; its messages carry no
    id (the ingester's ``--camera-id`` names it)."""
    camera_id: str
    pose: CameraPose


class Message(NamedTuple):
    t: float  # seconds since the start
    topic: str  # unprefixed controller topic
    payload: dict
    stock: dict  # f/i/stock: the reported stock; every other topic: the rack as shown at t


class FactorySimulator:
    """The true state of the simulated factory, evolving deterministically with ``seed``.

    Time is in seconds since ``start``; ``frame(ts)`` and the message builders also accept
    datetimes. Time only moves forward. ``advance(t)`` runs the factory to ``t``: what the
    controller publishes on the way lands in ``outbox`` (:class:`Message`), the reported
    changes in ``changes``. ``receive_order``/``receive_ack`` feed it ``f/o/order`` and
    ``f/o/state/ack`` payloads at a time. The factory's own schedule (about every
    ``change_every_s``) either puts a raw piece on the input station (``arrivals``) or lets
    another customer order a piece in stock (``demand``), keeping the fill level wandering
    between nearly empty and nearly full. ``customer_hook(payload, t)``, when set, carries the
    customer's order (the publisher sends it through the broker and returns what arrived, or
    None); without it the order reaches the controller directly.
    """

    def __init__(self, seed: int = 0, change_every_s: float = 20.0, *, start: datetime | None = None,
                 initial_fill: float = 0.5, lighting_period_s: float = 300.0, jpeg_quality: int = 85,
                 camera_id: str | None = None, factory_id: str | None = None, timings: Timings | None = None,
                 clock_offset_s: float = 0.0, arrivals: bool = True, demand: bool = True,
                 busy_orders: str = "latch", pose: CameraPose | None = None,
                 extra_cameras: tuple[Camera, ...] = ()):
        if change_every_s <= 0:
            raise ValueError("change_every_s must be > 0")
        if busy_orders not in BUSY_ORDER_POLICIES:
            raise ValueError(f"busy_orders must be one of {BUSY_ORDER_POLICIES}, got {busy_orders!r}")
        self.seed = int(seed)
        self.change_every_s = float(change_every_s)
        self.start = (start or datetime.now(timezone.utc)).astimezone(timezone.utc)
        self.lighting_period_s = lighting_period_s
        self.jpeg_quality = jpeg_quality
        self.camera_id = camera_id
        self.factory_id = factory_id
        self.timings = timings or Timings()
        self.clock_offset_s = float(clock_offset_s)
        self.arrivals = arrivals
        self.demand = demand
        self.busy_orders = busy_orders
        self.pose = pose or CameraPose()  # where this factory's camera looks at the rack
        self.extra_cameras = tuple(extra_cameras)  # cameras beside the controller's: camera 1, 2... of frame()
        ids = [c.camera_id for c in self.extra_cameras]
        if len(set(ids)) != len(ids) or not all(ids) or (camera_id and camera_id in ids):
            raise ValueError(f"each camera of a factory needs an id of its own, got {ids}"
                             + (f" beside {camera_id!r}" if camera_id else ""))
        self.customer_hook: Callable[[dict, float], dict | None] | None = None
        self._rng = np.random.default_rng([self.seed, 1])  # the factory's own schedule only
        self._env_phase = float(np.random.default_rng([self.seed, 2]).uniform(0, 2 * math.pi))
        self._fill_phase = float(np.random.default_rng([self.seed, 4]).uniform(0, 2 * math.pi))
        self._batch_type: str | None = None
        self.items: dict[str, dict | None] = {}
        for slot in SLOTS:
            self.items[slot] = self._new_workpiece() if self._rng.random() < initial_fill else None
        self.shown: dict[str, dict | None] = dict(self.items)
        self.now = 0.0
        self.changes: list[StockChange] = []
        self.outbox: deque[Message] = deque(maxlen=10_000)
        self._queue: list = []  # (t, seq, fn, args): the factory's pending events
        self._seq = 0
        # the controller
        self.stations: dict[str, tuple] = {}
        self.order: dict | None = None  # the order in work: {"type", "t"}
        self.latched: str | None = None  # an order received while one was in work (newest wins)
        self._latched_ack = False
        self.order_state: tuple[str, str] = ("WAITING_FOR_ORDER", "NONE")
        self.fault: str | None = None  # the warehouse's fault description
        self._fault_no = 0
        self._cell_busy = False  # the warehouse and the robot work on one piece at a time
        self._cell_jobs: list = []
        self._vgr_users: dict[str, str] = {}
        self._waiting_pieces = 0  # raw pieces on the input station, not yet taken
        self._customer_wish: str | None = None
        self.decisions = 0  # looks at the factory by its own schedule
        self.actions = 0  # ... that put a piece on the input or ordered one
        self.arrived = 0
        self.accepted_orders = 0
        self.ignored_orders = 0
        self.faults = 0
        for station in STATIONS:
            self._station(0.0, station, READY if station not in ("dsi", "dso") else FREE, 0)
        self._emit(0.0, ORDER_STATE_TOPIC, self._order_payload(0.0, "WAITING_FOR_ORDER", "NONE"))
        self._report(0.0)
        if arrivals or demand:
            self._at(self._next_interval(0.0), self._decide)

    # -- the event queue -----------------------------------------------------------
    def _at(self, t: float, fn, *args) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (t, self._seq, fn, args))

    @property
    def next_event_at(self) -> float:
        """When the factory does something next by itself (inf: never)."""
        return self._queue[0][0] if self._queue else math.inf

    next_change_at = next_event_at  # the name earlier callers used

    def advance(self, t: float | datetime) -> list[StockChange]:
        """Run the factory to time ``t``; the stock changes reported on the way (in order)."""
        t = self._seconds(t)
        n = len(self.changes)
        while self._queue and self._queue[0][0] <= t:
            when, _, fn, args = heapq.heappop(self._queue)
            self.now = max(self.now, when)
            fn(self.now, *args)
        self.now = max(self.now, t)
        return self.changes[n:]

    # -- what the controller publishes ---------------------------------------------
    def _emit(self, t: float, topic: str, payload: dict, stock: dict | None = None) -> None:
        self.outbox.append(Message(t, topic, payload, stock if stock is not None else self.shown_stock))

    def _report(self, t: float) -> None:
        self._emit(t, STOCK_TOPIC, self.stock_message(t), self.stock)

    def _station(self, t: float, station: str, code: int, active: int, target: str = "",
                 description: str = "") -> None:
        state = (code, active, target, description)
        if self.stations.get(station) == state:
            return
        self.stations[station] = state
        payload = {"ts": self.ts_string(t), "station": station, "code": int(code), "description": description,
                   "active": int(active)}
        if station == "vgr":
            payload["target"] = target
        self._emit(t, STATION_STATE_PREFIX + station, payload)

    def _order_payload(self, t: float, state: str, kind: str) -> dict:
        self.order_state = (state, kind)
        return {"ts": self.ts_string(t), "state": state, "type": kind}

    def _order_state(self, t: float, state: str) -> None:
        """The order in work moves to ``state``. Like the controller, a state change first
        announces an order received meanwhile (ORDERED with its type)."""
        if self._latched_ack and self.latched:
            self._latched_ack = False
            self._emit(t, ORDER_STATE_TOPIC, self._order_payload(t, "ORDERED", self.latched))
        self._emit(t, ORDER_STATE_TOPIC, self._order_payload(t, state, self.order["type"]))

    def _vgr(self, t: float, user: str, target: str | None) -> None:
        """The robot starts (``target``) or ends (None) a job for ``user``."""
        if target is None:
            self._vgr_users.pop(user, None)
        else:
            self._vgr_users[user] = target
        if self._vgr_users:
            self._station(t, "vgr", BUSY, 1, list(self._vgr_users.values())[-1])
        else:
            self._station(t, "vgr", READY, 0, "")

    def _dsi(self, t: float, active: bool) -> None:
        self._station(t, "dsi", OCCUPIED if self._waiting_pieces else FREE, int(active))

    # -- the warehouse cell: one piece at a time -----------------------------------
    def _request_cell(self, t: float, priority: int, job, *args) -> None:
        self._seq += 1
        heapq.heappush(self._cell_jobs, (priority, self._seq, job, args))
        self._start_cell(t)

    def _start_cell(self, t: float) -> None:
        if self._cell_busy or self.fault or not self._cell_jobs:
            return
        _, _, job, args = heapq.heappop(self._cell_jobs)
        self._cell_busy = True
        job(t, *args)

    def _hbw_idle(self, t: float) -> None:
        """The crane is back at its reference: ready, and (as on entering IDLE) the stock reported."""
        self._station(t, "hbw", READY, 0)
        self._report(t)
        self._cell_busy = False
        self._start_cell(t)

    def _show(self, t: float, slot: str, workpiece: dict | None) -> None:
        self.shown[slot] = workpiece

    # -- pieces arriving at the input station --------------------------------------
    def _new_workpiece(self) -> dict:
        uid = "04" + self._rng.bytes(6).hex()  # a 7-byte NFC UID, as on the real tags
        # Raw material arrives in batches: mostly the colour of the current batch.
        batch = self._batch_type
        kind = batch if batch and self._rng.random() < 0.7 else TYPES[int(self._rng.integers(len(TYPES)))]
        return {"id": uid, "type": kind, "state": "RAW"}

    def _arrive(self, t: float, workpiece: dict) -> None:
        self._waiting_pieces += 1
        self._dsi(t, bool(self._vgr_users.get("intake")))
        self._request_cell(t, 1, self._intake, workpiece)

    def _intake(self, t: float, workpiece: dict) -> None:
        self._waiting_pieces -= 1
        self._dsi(t, True)
        self._vgr(t, "intake", "hbw")
        self._at(t + self.timings.of(self.timings.intake_s), self._intake_container, workpiece)

    def _intake_container(self, t: float, workpiece: dict) -> None:
        slot = next((s for s in SEARCH_ORDER if self.items[s] is None), None)
        if slot is None:  # the controller's fetchContainer fails: the warehouse faults
            self._vgr(t, "intake", None)
            self._dsi(t, False)
            self._fault(t, f"no empty container for the {workpiece['type']} workpiece: the rack is full")
            return
        self._station(t, "hbw", BUSY, 1)
        self._report(t)  # fetching the empty container: the controller reports (unchanged)
        travel = self.timings.crane(slot)
        self._at(t + 2 * travel + self.timings.of(self.timings.handover_s), self._intake_store, workpiece, slot)

    def _intake_store(self, t: float, workpiece: dict, slot: str) -> None:
        travel = self.timings.crane(slot)
        self.items[slot] = workpiece
        self.changes.append(StockChange(t, slot, None, workpiece, t + travel))
        self._report(t)  # before the crane moves
        self._vgr(t, "intake", None)
        self._dsi(t, False)
        self._at(t + travel, self._show, slot, workpiece)
        self._at(t + travel, self._hbw_idle)

    # -- orders --------------------------------------------------------------------
    def controller_time(self, t: float | datetime) -> datetime:
        """The controller's clock at ``t``."""
        return self.start + timedelta(seconds=self._seconds(t) + self.clock_offset_s)

    def check_order(self, payload, t: float | datetime) -> tuple[str | None, str]:
        """``(type, "")`` for an order the controller takes at ``t``, else ``(None, reason)``: a JSON
        object whose ``ts`` is within ORDER_MAX_AGE_S of the controller's clock (either way) and
        whose ``type`` is exactly BLUE, RED or WHITE."""
        if isinstance(payload, (bytes, bytearray, str)):
            try:
                payload = json.loads(payload)
            except ValueError:
                return None, "not JSON"
        if not isinstance(payload, dict):
            return None, "not a JSON object"
        ts = payload.get("ts")
        try:
            when = parse_ts(ts) if isinstance(ts, str) else None
        except ValueError:
            when = None
        if when is None:
            return None, f"no readable 'ts' ({ts!r})"
        age = (self.controller_time(t) - when).total_seconds()
        if not abs(age) < ORDER_MAX_AGE_S:
            return None, (f"stale: ts {ts} is {age:+.1f} s from the controller's clock "
                          f"(more than {ORDER_MAX_AGE_S:g} s)")
        kind = payload.get("type")
        if kind not in TYPES:
            return None, f"'type' must be exactly BLUE, RED or WHITE, got {kind!r}"
        return kind, ""

    def receive_order(self, payload, t: float | datetime) -> tuple[bool, str]:
        """An ``f/o/order`` payload (bytes, str or dict) arriving at ``t``: ``(taken, what happened)``."""
        t = max(self._seconds(t), self.now)
        self.advance(t)
        return self._order(t, payload, "order")

    def _order(self, t: float, payload, source: str) -> tuple[bool, str]:
        kind, reason = self.check_order(payload, t)
        if kind is None:
            self.ignored_orders += 1
            logger.warning("ignored %s on f/o/order: %s", source, reason)
            return False, reason
        if self.order is not None:
            if self.busy_orders == "ignore":
                self.ignored_orders += 1
                logger.warning("ignored %s for %s: the %s order is still in work", source, kind, self.order["type"])
                return False, "busy"
            replaced = self.latched
            self.latched = kind
            self._latched_ack = True
            self.accepted_orders += 1
            logger.info("%s for %s waits for the %s order in work%s", source, kind, self.order["type"],
                        f" (replaces the waiting {replaced} order)" if replaced else "")
            return True, "waiting"
        self.accepted_orders += 1
        self._start_order(t, kind)
        logger.info("%s for %s taken", source, kind)
        return True, "ordered"

    def _start_order(self, t: float, kind: str) -> None:
        self.order = {"type": kind, "t": t}
        self._order_state(t, "ORDERED")
        self._vgr(t, "order", "hbw")
        self._request_cell(t, 0, self._fetch, kind)

    def _fetch(self, t: float, kind: str) -> None:
        slot = next((s for s in SEARCH_ORDER if self.items[s] and self.items[s]["type"] == kind), None)
        if slot is None:
            self.order["faulted"] = True
            self._fault(t, f"no {kind} workpiece in stock")
            return
        workpiece, travel = self.items[slot], self.timings.crane(slot)
        self.order["fetched"] = True
        self.items[slot] = None
        self.changes.append(StockChange(t, slot, workpiece, None, t + travel))
        self._station(t, "hbw", BUSY, 1)
        self._report(t)  # before the crane moves
        self._at(t + travel, self._show, slot, None)
        self._at(t + 2 * travel + self.timings.of(self.timings.handover_s), self._in_process, slot)

    def _in_process(self, t: float, slot: str) -> None:
        tm = self.timings
        self._order_state(t, "IN_PROCESS")
        self._vgr(t, "order", "mpo")
        self._station(t, "mpo", BUSY, 1)
        self._report(t)  # the warehouse stores the empty container back: reported (unchanged)
        self._at(t + tm.crane(slot), self._hbw_idle)
        self._at(t + tm.of(tm.handover_s), self._vgr, "order", None)
        self._at(t + tm.of(0.75 * tm.process_s), self._sorting)
        self._at(t + tm.of(tm.process_s), self._deliver)

    def _sorting(self, t: float) -> None:
        self._station(t, "mpo", READY, 0)
        self._station(t, "sld", BUSY, 1)

    def _deliver(self, t: float) -> None:
        self._station(t, "sld", READY, 0)
        self._vgr(t, "order", "dso")
        self._station(t, "dso", self.stations["dso"][0], 1)
        self._at(t + self.timings.of(self.timings.deliver_s), self._shipped)

    def _shipped(self, t: float) -> None:
        self._order_state(t, "SHIPPED")
        self._station(t, "dso", OCCUPIED, 1)
        self._at(t + self.timings.of(self.timings.shipped_wait_s), self._waiting)

    def _waiting(self, t: float) -> None:
        self._station(t, "dso", OCCUPIED, 0)
        self._vgr(t, "order", None)
        self._order_state(t, "WAITING_FOR_ORDER")
        self._order_state(t, "WAITING_FOR_ORDER")  # the controller sends it twice ("if message is lost")
        self.order = None
        self._at(t + self.timings.of(self.timings.pickup_s), self._picked_up)
        self._next_order(t)

    def _picked_up(self, t: float) -> None:
        if self.stations["dso"][1] == 0:
            self._station(t, "dso", FREE, 0)

    def _next_order(self, t: float) -> None:
        if self.order is not None or self.fault:
            return
        if self.latched:
            kind, self.latched, self._latched_ack = self.latched, None, False
            self._start_order(t, kind)
        elif self._customer_wish:
            self._at(t + self.timings.of(self.timings.customer_wait_s), self._customer_turn)

    # -- faults --------------------------------------------------------------------
    def _fault(self, t: float, description: str) -> None:
        self.fault = description
        self.faults += 1
        self._fault_no += 1
        self._station(t, "hbw", STATION_ERROR_CODE, 0, description=description)
        logger.warning("warehouse fault: %s", description)
        if self.timings.fault_clear_s is not None:
            self._at(t + self.timings.of(self.timings.fault_clear_s), self._clear_fault, self._fault_no)

    def _clear_fault(self, t: float, number: int | None = None) -> None:
        if not self.fault or (number is not None and number != self._fault_no):
            return
        logger.info("warehouse fault quit: %s", self.fault)
        self.fault = None
        if self.order is not None and self.order.get("faulted"):  # the order that faulted is given up
            self._vgr(t, "order", None)
            self._order_state(t, "WAITING_FOR_ORDER")
            self.order = None
        self._hbw_idle(t)
        self._next_order(t)

    def receive_ack(self, payload, t: float | datetime) -> bool:
        """``f/o/state/ack`` (the dashboard's Quit button, ``{"ts"}``) at ``t``: quits a fault."""
        t = max(self._seconds(t), self.now)
        self.advance(t)
        try:
            data = json.loads(payload) if isinstance(payload, (bytes, bytearray, str)) else payload
            when = parse_ts(data["ts"])
        except (ValueError, KeyError, TypeError):
            logger.warning("ignored f/o/state/ack without a readable ts: %r", payload)
            return False
        if not abs((self.controller_time(t) - when).total_seconds()) < ORDER_MAX_AGE_S:
            logger.warning("ignored stale f/o/state/ack (ts %s)", data["ts"])
            return False
        if not self.fault:
            return False
        self._clear_fault(t)
        return True

    # -- the factory's own schedule: arrivals and another customer -----------------
    def _next_interval(self, t: float) -> float:
        return t + self.change_every_s * float(self._rng.uniform(0.5, 1.5))

    def _decide(self, t: float) -> None:
        """One look at the factory: a person puts a raw piece on the free input station, or the other
        customer orders a piece in stock while the factory waits for orders, or neither. The fill
        level is steered along a wave of FILL_CYCLE such actions, between nearly empty and nearly
        full, so every mix of colours shows up."""
        self.decisions += 1
        k = self.actions
        intake_pending = self._waiting_pieces + sum(1 for j in self._cell_jobs if j[2] == self._intake) + (
            1 if "intake" in self._vgr_users else 0)
        stored = sum(w is not None for w in self.items.values())
        outgoing = 1 if (self._customer_wish or (self.order and not self.order.get("fetched"))) else 0
        fill = stored + intake_pending - outgoing
        target = 0.5 + 0.45 * math.sin(2 * math.pi * k / FILL_CYCLE + self._fill_phase)
        p_store = float(np.clip(0.5 + 3.0 * (target - fill / len(SLOTS)), 0.02, 0.98))
        store = bool(self._rng.random() < p_store)
        if store and self.arrivals and not intake_pending and stored < len(SLOTS):
            if self.arrived % 6 == 0:
                self._batch_type = TYPES[int(self._rng.integers(len(TYPES)))]
            self.arrived += 1
            self.actions += 1
            self._arrive(t, self._new_workpiece())
        elif not store and self.demand and self._customer_wish is None and self._idle_for_orders():
            available = [w["type"] for s, w in sorted(self.items.items()) if w is not None]
            if available:
                self.actions += 1
                self._customer_wish = available[int(self._rng.integers(len(available)))]
                self._customer_turn(t)
        self._at(self._next_interval(t), self._decide)

    def _idle_for_orders(self) -> bool:
        return self.order is None and not self.latched and not self.fault

    def _customer_turn(self, t: float) -> None:
        """The other customer orders its piece when the factory is free (else at its next WAITING_FOR_ORDER)."""
        kind = self._customer_wish
        if kind is None or not self._idle_for_orders():
            return
        if not any(w and w["type"] == kind for w in self.items.values()):
            self._customer_wish = None  # sold out meanwhile: the customer does not order
            return
        self._customer_wish = None
        payload = {"ts": self.ts_string(t), "type": kind}
        if self.customer_hook is not None:
            payload = self.customer_hook(payload, t)  # through the broker: what arrived (None: lost)
            if payload is None:
                return
        self._order(t, payload, "customer order")

    # -- environment ---------------------------------------------------------------
    def lighting(self, t: float | datetime) -> float:
        """Room lighting level at ``t`` (slow daylight-like swing between ~0.6 and ~1.1)."""
        t = self._seconds(t)
        return 0.85 + 0.25 * math.sin(2 * math.pi * t / self.lighting_period_s + self._env_phase)

    def _env_rng(self, t: float, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, stream, int(round(t * 1000))])

    # -- stock views -----------------------------------------------------------------
    @property
    def stock(self) -> dict[str, str | None]:
        """Slot -> workpiece type (``None`` = empty) as the warehouse reports it now."""
        return {s: (w["type"] if w else None) for s, w in self.items.items()}

    @property
    def shown_stock(self) -> dict[str, str | None]:
        """Slot -> workpiece type as the rack looks now (the crane has finished its moves)."""
        return {s: (w["type"] if w else None) for s, w in self.shown.items()}

    # -- pictures and messages -----------------------------------------------------
    @property
    def cameras(self) -> int:
        """How many cameras look at the rack: the controller's own and ``extra_cameras``."""
        return 1 + len(self.extra_cameras)

    def frame(self, ts: float | datetime, camera: int = 0) -> tuple[bytes, dict[str, str | None]]:
        """The JPEG of ``camera`` (0: the controller's own, k: ``extra_cameras[k - 1]``) at ``ts``
        and the rack it shows (advances the factory to ``ts``). Every camera sees the same rack,
        each through its own pose and with its own sensor noise."""
        t = self._seconds(ts)
        self.advance(t)
        stock = self.shown_stock
        if camera:
            pose = self.extra_cameras[camera - 1].pose
            rng = np.random.default_rng([self.seed, 3, int(round(t * 1000)), camera])
        else:
            pose, rng = self.pose, self._env_rng(t, 3)
        img = render_warehouse(stock, rng=rng, lighting=self.lighting(t), pose=pose)
        return encode_jpeg(img, self.jpeg_quality), stock

    def camera_message(self, ts: float | datetime, camera: int = 0) -> tuple[dict, dict[str, str | None]]:
        """``i/cam`` of ``camera`` (as :meth:`frame`) at ``ts``, and the rack it shows. A further
        camera's message carries its ``camera_id``; the controller's carries none (unless the
        simulator was given ``camera_id``)."""
        jpeg, stock = self.frame(ts, camera)
        msg = {"ts": self.ts_string(ts), "data": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")}
        if camera:
            msg["camera_id"] = self.extra_cameras[camera - 1].camera_id
            if self.factory_id:
                msg["factory_id"] = self.factory_id
            return msg, stock
        return self._ids(msg), stock

    def stock_message(self, ts: float | datetime) -> dict:
        """``f/i/stock`` for the stock reported at ``ts`` (does not advance the factory)."""
        items = [{"workpiece": dict(self.items[s]) if self.items[s] else None, "location": s} for s in SLOTS]
        return {"ts": self.ts_string(ts), "stockItems": items}

    def bme680_message(self, ts: float | datetime) -> dict:
        t = self._seconds(ts)
        r = self._env_rng(t, 4)
        temp = 22.0 + 1.5 * math.sin(2 * math.pi * t / 900 + self._env_phase) + r.normal(0, 0.05)
        hum = 41.0 - 4.0 * math.sin(2 * math.pi * t / 1200 + self._env_phase) + r.normal(0, 0.2)
        iaq = max(0.0, 55.0 + 20.0 * math.sin(2 * math.pi * t / 600 + self._env_phase) + r.normal(0, 2))
        return {"ts": self.ts_string(ts), "t": round(temp, 1), "rt": round(temp + 3.1 + r.normal(0, 0.05), 2),
                "h": round(hum, 1), "rh": round(hum - 6.0 + r.normal(0, 0.2), 2),
                "p": round(1013.2 + 0.8 * math.sin(2 * math.pi * t / 3600) + r.normal(0, 0.03), 1),
                "iaq": int(round(iaq)), "aq": 3 if t > 300 else (1 if t > 60 else 0),
                "gr": int(round(120_000 - 600 * iaq + r.normal(0, 500)))}

    def ldr_message(self, ts: float | datetime) -> dict:
        """``i/ldr``: the photo resistor's ``ldr`` (0..15000, an integer) and ``br`` derived from it
        as the controller does (a string)."""
        t = self._seconds(ts)
        br = min(100.0, max(0.0, 80.0 * self.lighting(t) + self._env_rng(t, 5).normal(0, 0.8)))
        ldr = int(min(15000, max(0, round(15000 * (1 - br / 100.0)))))
        return {"ts": self.ts_string(ts), "ldr": ldr, "br": brightness_string(ldr)}

    def broadcast_message(self, ts: float | datetime) -> dict:
        """``i/broadcast`` as the controller's main program announces itself at start ("init"),
        repeating until the first message for it arrives: the dashboard's cue to send its
        configuration (c/cam among it)."""
        mac = np.random.default_rng([self.seed, 7]).bytes(5).hex()
        return {"ts": self.ts_string(ts), "hardwareId": "02:" + ":".join(mac[i:i + 2] for i in range(0, 10, 2)),
                "hardwareModel": "TXT", "softwareName": "TxtFactoryMain", "softwareVersion": CONTROLLER_VERSION,
                "message": "init"}

    def ts_string(self, ts: float | datetime) -> str:
        """``ts`` (seconds since the start) as the controller stamps it, in its own clock."""
        return iso_ms(self.controller_time(ts))

    def _ids(self, msg: dict) -> dict:
        if self.camera_id:
            msg["camera_id"] = self.camera_id
        if self.factory_id:
            msg["factory_id"] = self.factory_id
        return msg

    def _seconds(self, ts: float | datetime) -> float:
        if isinstance(ts, datetime):
            return (ts.astimezone(timezone.utc) - self.start).total_seconds()
        return float(ts)
