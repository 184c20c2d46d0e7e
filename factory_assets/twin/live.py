"""The live twin updater: new frame in MongoDB -> endpoint -> twin, in well under 2 s.

Why a process beside ingestion and not a Dagster run per frame: launching a run
costs 7-11 s on this class of machine, so the quick path follows the frames'
seq cursor itself and calls the endpoint through the
``Predictor`` interface. Everything it writes is idempotent and shared with the
batch path (``inferences`` keyed by frame and model version; twin updates
guarded by frame time), and the ``twin_live_sensor`` turns each twin change it
makes into an asset event on ``twin_state`` with its provenance, so every
update is visible in Dagster. Frames it could not infer are left to the batch
path (``new_frames_sensor`` -> ``stock_inferences``), which converges to the same state.

Idle cost does not grow with history: between frames it waits on a MongoDB change
stream (``ChangeWaiter``; an adaptive 50 ms-1 s poll where the server has none),
every query it issues is a bounded index range, and it writes its cursor only
when the cursor moves.

Each frame is inferred with *its own factory's* model (docs/fleet.md): ``ModelRouter`` reads
the deployment of the frame's factory and camera (``storage.models.deployments``, only for the
factories of the page being read) and the frame is sent to the one multi-model endpoint under
that model's name, ``<factory_id>--<camera_id>--<version>`` (docs/multi-model.md). A frame of a
factory or camera without a deployment is passed (counted in ``no_model``) and left to the batch
path, which infers it once its model is deployed; a model deployed for one factory is never used
for another. Before the fleet has any deployment, the endpoint's own model (``/invocations``
without a name, as before) infers every frame, unless that model is registered for another
factory or camera.

Besides the frames it keeps the controller's side of the twin current, per factory (reads by
``factory_id`` first, index ``factory_topic_ts``): the newest ``f/i/stock`` report, the newest
``f/i/state/<station>`` of each station, the newest ``f/i/order`` and the clock offset the
ingester estimated (``storage.clocks``). The settle and persistence rules (``TwinRules``,
``FACTORY_SETTLE_S``...) decide which disagreements the twin flags.

A step's controller work costs what arrived, not the fleet's size or the history: the first step
catches up once with every known factory (its newest report, station, order and clock: what was
stored while the updater was down included); after that a step reads the stock, station and order
messages stored since its last look (``storage.arrivals.ArrivalCursor``, one ``_id`` range of the
``mqtt`` collection, with the fields the twin needs) and applies them to exactly their factories,
keeping each topic's newest message by ``ts`` (an older one arriving late does not regress the
twin). Every ``CONTROLLER_REFRESH_S`` it also re-reads the last few seconds of ids (a message a
slower or other writer made visible late) and the clock estimates that moved
(``storage.clocks.clocks_updated_since``: the clock changes without a message). A factory heard for
the first time is caught up like at the start. A message stored by another tool with an ``_id``
that is not an ObjectId is applied at the updater's next start (or with its factory's next message
of that topic, when it is the newest by ``ts``).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta

from factory_assets.storage.frames import (ChangeWaiter, assign_missing_seqs, frame_image_bytes, parse_ts,
                                           read_frames_after)
from factory_assets.storage.inferences import build_inference, record_inference
from factory_assets.storage.quarantine import quarantine
from factory_assets.storage.arrivals import LATE_S, ArrivalCursor
from factory_assets.storage.clocks import clock_info, clocks_updated_since
from factory_assets.twin.state import COLOURS, Observation, Reported, TwinRules, reported_from_stock
from factory_assets.twin.store import (CLOCK_SHOWN_TOLERANCE_S, _station_key, apply_controller_state,
                                       apply_observation, apply_reported)
from factory_assets.vocabulary import (DEFAULT_CAMERA_ID, DEFAULT_ENDPOINT, DEFAULT_FACTORY_ID, ORDER_STATE_TOPIC,
                                       STATION_CODES, STATION_ERROR_CODES, STATION_STATE_PREFIX, STATIONS,
                                       STOCK_TOPIC, parse_ts, utcnow)
from factory_assets.vocabulary.messages import parse_stock_report

STATION_TOPICS: dict[str, str] = {STATION_STATE_PREFIX + s: s for s in STATIONS}
CONTROLLER_TOPICS = (*STATION_TOPICS, ORDER_STATE_TOPIC)
TWIN_TOPICS = (STOCK_TOPIC, *CONTROLLER_TOPICS)  # the messages the twin follows
ARRIVAL_FIELDS = {"factory_id": 1, "topic": 1, "ts": 1, "payload": 1, "message_id": 1}
CONTROLLER_REFRESH_S = 2.0  # the stations, order and clock are looked at least this often
FACTORIES_REFRESH_S = 5.0   # and the set of factories to look at

CURSOR_PREFIX = "cursor:"
DEPLOYMENTS_REFRESH_S = 1.0  # a factory's deployments are read again at most this often

logger = logging.getLogger(__name__)


class ForeignModel(Exception):
    """The endpoint answered with a model registered for another factory or camera than the frame's."""


@dataclass(frozen=True)
class ModelChoice:
    """The model that infers a frame: ``version``, asked for by ``target_model``; ``target_model``
    None: the endpoint's own model (before the fleet has any deployment), ``version`` then the one
    the endpoint document names, when known."""
    version: str | None
    target_model: str | None


def frame_owner(doc: dict) -> tuple[str, str]:
    """(factory_id, camera_id) of a frame (documents written before factories had ids: the defaults)."""
    return doc.get("factory_id") or DEFAULT_FACTORY_ID, doc.get("camera_id") or DEFAULT_CAMERA_ID


class ModelRouter:
    """Which model infers a frame of (factory, camera): that camera's deployment on ``endpoint``,
    by name; ``None`` when the fleet is served per factory and this camera has no model yet; the
    endpoint's own model (a ``ModelChoice`` without a target) while no factory has a deployment.

    Reads are bounded by what is asked: ``prepare(factory_ids)`` reads the deployments of those
    factories only (one query), each at most every ``refresh_s``; whether the fleet has any
    deployment is one indexed lookup, at most every ``refresh_s``."""

    def __init__(self, fdb, endpoint: str = DEFAULT_ENDPOINT, refresh_s: float = DEPLOYMENTS_REFRESH_S,
                 clock=time.monotonic):
        self.fdb = fdb
        self.endpoint = endpoint
        self.refresh_s = refresh_s
        self.clock = clock
        self._versions: dict[str, tuple[float, dict]] = {}  # factory -> (read at, {camera: version})
        self._fleet: tuple[float, bool] | None = None
        self._legacy: tuple[float, str | None] | None = None  # the endpoint document's own model
        self._owners: dict[str, tuple] = {}  # version -> (factory_id, camera_id) it is registered for

    def prepare(self, factory_ids) -> None:
        from factory_assets.storage.models import deployments, has_deployments

        now = self.clock()
        stale = sorted({f for f in factory_ids if now - self._versions.get(f, (float("-inf"),))[0] >= self.refresh_s})
        if stale:
            found: dict = {f: {} for f in stale}
            for doc in deployments(self.fdb, endpoint=self.endpoint, factory_ids=stale):
                if doc.get("model_version"):
                    found[doc["factory_id"]][doc["camera_id"]] = doc["model_version"]
            for f, cameras in found.items():
                self._versions[f] = (now, cameras)
        if self._fleet is None or now - self._fleet[0] >= self.refresh_s:
            self._fleet = (now, has_deployments(self.fdb, endpoint=self.endpoint))

    @property
    def per_factory(self) -> bool:
        """Whether the fleet is served per factory (some factory has a deployment)."""
        if self._fleet is None:
            self.prepare(())
        return self._fleet[1]

    def cameras(self, factory_id: str) -> dict[str, str]:
        """camera_id -> deployed version of ``factory_id``."""
        if factory_id not in self._versions:
            self.prepare([factory_id])
        return dict(self._versions[factory_id][1])

    def deployed(self, factory_id: str, camera_id: str) -> str | None:
        if factory_id not in self._versions:
            self.prepare([factory_id])
        return self._versions[factory_id][1].get(camera_id)

    def choice(self, factory_id: str, camera_id: str) -> ModelChoice | None:
        from factory_assets.serving.models import InvalidModelName, model_name

        version = self.deployed(factory_id, camera_id)
        if version is not None:
            try:
                return ModelChoice(version, model_name(factory_id, camera_id, version))
            except InvalidModelName:  # an id no model name can hold: no model can be asked for
                logger.warning("%s camera %s cannot be named in a model name; its frames are not inferred",
                               factory_id, camera_id)
                return None
        if self.per_factory:
            return None
        now = self.clock()
        if self._legacy is None or now - self._legacy[0] >= self.refresh_s:
            from factory_assets.storage.models import served_version

            self._legacy = (now, served_version(self.fdb, self.endpoint))
        legacy = self._legacy[1]
        if legacy is not None and not self.allows(legacy, factory_id, camera_id):
            return None
        return ModelChoice(legacy, None)

    def allows(self, version: str, factory_id: str, camera_id: str) -> bool:
        """Whether ``version`` may infer frames of (factory, camera): it is registered for them, or for
        no factory (a model from before the fleet)."""
        if version not in self._owners:
            doc = self.fdb.models.find_one({"_id": version}, {"factory_id": 1, "camera_id": 1}) or {}
            self._owners[version] = (doc.get("factory_id"), doc.get("camera_id"))
        owner = self._owners[version]
        return owner[0] is None or owner == (factory_id, camera_id)


def load_cursor(fdb, name: str) -> int:
    doc = fdb.counters.find_one({"_id": CURSOR_PREFIX + name})
    return int(doc["seq"]) if doc else 0


def save_cursor(fdb, name: str, seq: int) -> None:
    # $max: a cursor only moves forward, even with two updaters running by mistake.
    fdb.counters.update_one({"_id": CURSOR_PREFIX + name}, {"$max": {"seq": seq}}, upsert=True)


_TWIN_REPORT_TIME = object()


MAX_UNREADABLE_REPORTS = 10  # unreadable newest reports apply_latest_stock passes over before it gives up


def known_factories(fdb) -> list[str]:
    """The factories the twin follows: every factory the ingester stored something of (the
    ``factories`` collection, one small document per factory: ``storage.factories``), and the
    default one. One read whatever the history."""
    from factory_assets.storage.factories import known_factories as stored

    return sorted({DEFAULT_FACTORY_ID, *stored(fdb)})


def apply_latest_stock(fdb, factory_id: str | None = None, after=_TWIN_REPORT_TIME,
                       rules: TwinRules | None = None) -> bool:
    """Apply the newest readable stock report of ``factory_id`` (None: of every known factory)
    to the twin. Only reports newer than ``after`` are looked at — by default the report time the
    twin already shows (an older one would be rejected anyway) — so the read is an index range
    over new reports (``factory_topic_ts``), not the history."""
    if factory_id is None:
        applied = False
        for fid in known_factories(fdb):
            applied = apply_latest_stock(fdb, fid, after, rules) or applied
        return applied
    if after is _TWIN_REPORT_TIME:
        after = latest_stock_ts(fdb, factory_id)
    query: dict = {"factory_id": factory_id, "topic": STOCK_TOPIC}
    if after is not None:
        query["ts"] = {"$gt": after}
    # newest first: an unreadable newest report (quarantined) falls back to the one before it,
    # so one bad report does not leave the twin on an older rack until the next good one
    for msg in fdb.mqtt.find(query, sort=[("ts", -1)], limit=MAX_UNREADABLE_REPORTS + 1):
        rep = reported_or_quarantine(fdb, msg)
        if rep is not None:
            return apply_reported(fdb, rep, rules)
    return False


def station_state(payload) -> dict | None:
    """A ``f/i/state/<station>`` payload -> the twin's view of it (None when unreadable):
    ``{code, meaning, description, active, ts, fault[, target]}``; ``fault`` is true for the
    controller's error codes (``vocabulary.STATION_ERROR_CODES``)."""
    if not isinstance(payload, dict):
        return None
    code = payload.get("code")
    if isinstance(code, str) and code.strip().lstrip("-").isdigit():
        code = int(code)
    if not isinstance(code, int) or isinstance(code, bool):
        return None
    active = payload.get("active")
    state = {"code": code, "meaning": STATION_CODES.get(code, f"code {code}"),
             "description": str(payload.get("description") or ""),
             "active": bool(active) if isinstance(active, (bool, int)) else None,
             "ts": _payload_ts(payload), "fault": code in STATION_ERROR_CODES}
    if "target" in payload:
        state["target"] = payload["target"]
    return state


def _payload_ts(payload: dict):
    try:
        return parse_ts(payload.get("ts"))
    except (ValueError, TypeError, OverflowError):
        return None


def controller_state(fdb, factory_id: str) -> dict:
    """The newest state of each station, the newest ``f/i/order`` and the clock estimate of
    ``factory_id``: ``{"stations": {...}, "order": {...} | None, "clock": {...} | None}``.
    One bounded index lookup per topic (``factory_topic_ts``), one by ``_id`` for the clock."""
    return controller_state_from(newest_controller_messages(fdb, factory_id), clock_info(fdb, factory_id))


def newest_controller_messages(fdb, factory_id: str) -> dict[str, dict]:
    """topic -> the newest (by ``ts``) stored message of each station's and the order's topic."""
    newest = {}
    for topic in CONTROLLER_TOPICS:
        msg = fdb.mqtt.find_one({"factory_id": factory_id, "topic": topic}, {"payload": 1, "ts": 1},
                                sort=[("ts", -1)])
        if msg is not None:
            newest[topic] = msg
    return newest


def controller_state_from(messages: dict[str, dict], clock: dict | None) -> dict:
    """``controller_state`` of the newest message of each topic (topic -> message) and the clock."""
    stations = {}
    for topic, station in STATION_TOPICS.items():
        msg = messages.get(topic)
        state = station_state((msg or {}).get("payload"))
        if state is not None:
            state["ts"] = state["ts"] or msg.get("ts")
            stations[station] = state
    order = None
    msg = messages.get(ORDER_STATE_TOPIC)
    if msg is not None and isinstance(msg.get("payload"), dict) and msg["payload"].get("state"):
        order = {"state": str(msg["payload"]["state"]), "type": msg["payload"].get("type") or None,
                 "ts": _payload_ts(msg["payload"]) or msg.get("ts")}
    return {"stations": stations, "order": order, "clock": clock}


def _newer(ts, than) -> bool:
    """Whether a message time ``ts`` is newer than ``than`` (None: nothing seen yet). Times another
    tool stored in a type that does not compare count as newer (the twin's own guards decide)."""
    if than is None:
        return True
    if ts is None:
        return False
    try:
        return ts > than
    except TypeError:
        return True


def apply_controller_states(fdb, factory_ids=None) -> None:
    """Bring the stations, order state and clock of each factory onto its twin."""
    for fid in factory_ids if factory_ids is not None else known_factories(fdb):
        state = controller_state(fdb, fid)
        if state["stations"] or state["order"] or state["clock"]:
            apply_controller_state(fdb, fid, **state)


def reported_or_quarantine(fdb, msg: dict) -> Reported | None:
    """The twin's view of a stored ``f/i/stock`` message, or None when it cannot be read
    (then it is quarantined with the reason, and the caller moves past it)."""
    try:
        # the ingester's own check (it quarantines such reports on the way in): a report another
        # tool stored is read as strictly, not with its bad items quietly read as empty slots
        parse_stock_report(msg["payload"])
        return reported_from_stock(msg["payload"], msg["ts"], msg.get("factory_id") or "factory-1",
                                   msg.get("message_id"))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # FormatError is a ValueError
        logger.warning("stock report %s cannot be read (%s: %s); skipped", msg.get("_id"),
                       exc.__class__.__name__, str(exc)[:200])
        payload = msg.get("payload")
        quarantine(fdb, reason="stock_report_unreadable", message=f"{exc.__class__.__name__}: {exc}",
                   source={"kind": "mqtt", "topic": STOCK_TOPIC, "path": str(msg.get("_id"))},
                   payload=payload if isinstance(payload, (str, bytes)) else repr(payload), topic=STOCK_TOPIC)
        return None


def latest_stock_ts(fdb, factory_id: str | None = None):
    """The time of the newest stock report the twin of ``factory_id`` shows (None before the
    first; with no factory, the newest over every twin)."""
    query = {"_id": factory_id} if factory_id else {}
    times = [d["reported"]["ts"] for d in fdb.twin.find(query, {"reported.ts": 1}) if (d.get("reported") or {}).get("ts")]
    return max(times) if times else None


def thresholds_for(fdb, version: str, cache: dict) -> dict:
    if version not in cache:
        doc = fdb.models.find_one({"version": version}, {"thresholds": 1}) or {}
        cache[version] = doc.get("thresholds") or {c: 0.5 for c in COLOURS}
    return cache[version]


def infer_frame(fdb, predictor, frame: dict, *, source: str, thresholds_cache: dict,
                rules: TwinRules | None = None, target_model: str | None = None, router: ModelRouter | None = None
                ) -> dict | None:
    """Infer one frame, store the inference and update the twin.

    ``target_model``: the model to ask for by name (the frame's factory's); without one, the
    endpoint's own model, which ``router`` (when given) must allow for the frame's factory and
    camera, else ``ForeignModel`` is raised and nothing is stored.
    Returns the inference document, or None when the frame was rejected as bad
    input (quarantined). Raises ``EndpointUnavailable`` when the endpoint is down."""
    from factory_assets.serving.predictor import BadInput
    from factory_assets.vision.decode import ImageDecodeError

    source_ref = {"kind": "frame", "frame_id": str(frame["_id"]), "path": str(frame["_id"])}
    try:
        # a frame another tool wrote: bad base64 in ``data``, no image, no or an unreadable ``ts``
        image = frame_image_bytes(frame)
        parse_ts(frame["ts"])
    except (ValueError, KeyError, TypeError) as exc:  # FormatError is a ValueError
        quarantine(fdb, reason="frame_unreadable", message=f"{exc.__class__.__name__}: {exc}", source=source_ref)
        return None
    try:
        if target_model:
            pred = predictor.predict(image, frame.get("content_type") or "image/jpeg", target_model=target_model)
        else:
            pred = predictor.predict(image, frame.get("content_type") or "image/jpeg")
    except (BadInput, ImageDecodeError) as exc:
        quarantine(fdb, reason="inference_rejected", message=str(exc), source=source_ref)
        return None
    version = pred.model_version or "unknown"
    if not target_model and router is not None and not router.allows(version, *frame_owner(frame)):
        raise ForeignModel(f"the endpoint's model {version} is registered for another factory or camera than "
                           f"{'/'.join(frame_owner(frame))}")
    thresholds = getattr(pred, "thresholds", None) or thresholds_for(fdb, version, thresholds_cache)
    # a per-slot model's slots travel with the inference, so the twin shows observed.slots and delta.slots
    doc = build_inference(frame, probabilities=dict(zip(COLOURS, pred.probabilities)), thresholds=thresholds,
                          model_version=version, latency_ms=pred.latency_ms, source=source,
                          slots=getattr(pred, "slots", None), model_kind=getattr(pred, "model_kind", None))
    record_inference(fdb, doc)
    apply_observation(fdb, Observation.from_inference(doc, source), rules)
    return doc


@dataclass
class LiveStats:
    inferred: int = 0
    rejected: int = 0
    skipped_to_batch: int = 0
    endpoint_errors: int = 0
    database_errors: int = 0  # reads or writes that failed because MongoDB was unreachable
    failed: int = 0  # frames an unexpected error stopped: left to the batch path
    no_model: int = 0  # frames of a factory or camera without a deployed model: left to the batch path
    unknown_model: int = 0  # frames whose factory's model the endpoint could not find: left to the batch path
    foreign_model: int = 0  # frames the endpoint's own model may not infer (another factory's): passed
    # the most recent ones only: a process that runs for months must not keep every latency
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=10_000))


class LiveTwinUpdater:
    def __init__(self, fdb, predictor, *, cursor_name: str = "twin-live", batch: int = 32,
                 max_backlog: int = 200, poll_seconds: float = 0.05, log=None,
                 max_idle_seconds: float = 1.0, change_stream: bool = True, rules: TwinRules | None = None,
                 endpoint: str = DEFAULT_ENDPOINT):
        # ``log`` is accepted for compatibility and ignored: progress goes to this module's logger.
        # ``endpoint``: the fleet's endpoint whose per-factory deployments say which model infers a frame
        self.fdb = fdb
        self.router = ModelRouter(fdb, endpoint)
        self._warned: dict[str, float] = {}
        self.rules = rules or TwinRules.from_env()
        self.predictor = predictor
        self.cursor_name = cursor_name
        self.batch = batch
        self.max_backlog = max_backlog
        self.poll_seconds = poll_seconds
        self.cursor = load_cursor(fdb, cursor_name)
        self.stats = LiveStats()
        self._thresholds: dict = {}
        self._last_housekeeping = 0.0
        self._saved_cursor = self.cursor
        self._stock_after: dict = {}  # factory -> the newest report time seen
        self._factories: list[str] = []
        self._factories_at = float("-inf")
        self._controller_at = float("-inf")
        # what arrived since the last look (storage.arrivals); the first step catches up instead
        self.arrivals = ArrivalCursor(fdb.mqtt, {"topic": {"$in": list(TWIN_TOPICS)}}, ARRIVAL_FIELDS)
        self._caught_up = False
        self._newest: dict = {}  # factory -> topic -> the newest station/order message seen (by ts)
        self._controller_shown: dict = {}  # factory -> the controller state last applied
        self._clocks_after = None  # the newest clock estimate's updated_at seen
        self._more = False
        # Between frames: a change stream where the server offers one, else a 50 ms-1 s poll.
        # Stock, station and order messages wake it too.
        self.waiter = ChangeWaiter(fdb, cursor_name, extra={"mqtt": {"fullDocument.topic": {
                                       "$in": [STOCK_TOPIC, ORDER_STATE_TOPIC, *STATION_TOPICS]}}},
                                   min_interval=poll_seconds, max_interval=max_idle_seconds,
                                   change_stream=change_stream)

    def _warn(self, key: str, message: str, *args) -> None:
        """One warning per key and minute (a factory whose model is missing must not flood the log)."""
        now = time.monotonic()
        if now - self._warned.get(key, float("-inf")) >= 60:
            self._warned[key] = now
            logger.warning(message, *args)

    def _save_cursor(self) -> None:
        if self.cursor != self._saved_cursor:  # no write while nothing moves
            save_cursor(self.fdb, self.cursor_name, self.cursor)
            self._saved_cursor = self.cursor

    def factories(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        if now - self._factories_at >= FACTORIES_REFRESH_S:
            self._factories = known_factories(self.fdb)
            self._factories_at = now
        return self._factories

    def _catch_up(self, fid: str) -> None:
        """A factory's newest report, station and order states and clock, read by its index ranges
        (``factory_topic_ts``): once per factory, at the first step or when first heard."""
        if fid not in self._stock_after:
            self._stock_after[fid] = latest_stock_ts(self.fdb, fid)
        query: dict = {"factory_id": fid, "topic": STOCK_TOPIC}
        if self._stock_after[fid] is not None:
            query["ts"] = {"$gt": self._stock_after[fid]}  # only reports newer than the twin shows
        msg = self.fdb.mqtt.find_one(query, sort=[("ts", -1)])
        if msg:
            self._apply_stock_message(fid, msg)
        self._newest[fid] = newest_controller_messages(self.fdb, fid)
        self._show(fid, controller_state_from(self._newest[fid], clock_info(self.fdb, fid)))

    def _apply_stock_message(self, fid: str, msg: dict) -> None:
        self._guarded(lambda m=msg: self._apply_report(m), f"stock report {msg.get('_id')}")
        if msg.get("ts") is not None:
            self._stock_after[fid] = msg["ts"]  # an unreadable report is quarantined and passed, never retried

    def _apply_report(self, msg: dict) -> None:
        rep = reported_or_quarantine(self.fdb, msg)
        if rep is not None:
            apply_reported(self.fdb, rep, self.rules)

    def _show(self, fid: str, state: dict) -> None:
        """Apply what differs from the controller state last applied (all of it the first time:
        ``apply_controller_state`` compares with the twin and writes only what changed)."""
        shown = self._controller_shown.get(fid)
        if shown is None:
            if not (state["stations"] or state["order"] or state["clock"]):
                self._controller_shown[fid] = state
                return
            change = state
        else:
            stations = {name: st for name, st in state["stations"].items()
                        if _station_key(st) != _station_key(shown["stations"].get(name))}
            order = state["order"] if state["order"] is not None and (
                (state["order"].get("state"), state["order"].get("type"))
                != ((shown["order"] or {}).get("state"), (shown["order"] or {}).get("type"))) else None
            clock, was = state["clock"] or {}, shown["clock"] or {}
            moved = clock.get("offset_s") is not None and (
                was.get("offset_s") is None
                or abs(float(clock["offset_s"]) - float(was["offset_s"])) >= CLOCK_SHOWN_TOLERANCE_S)
            if not (stations or order or moved):
                # nothing a person would see: remembered, no read or write of the twin
                self._controller_shown[fid] = {**state, "clock": state["clock"] if moved else shown["clock"]}
                return
            change = {"stations": stations, "order": order, "clock": state["clock"] if moved else None}
        if self._guarded(lambda c=change: apply_controller_state(self.fdb, fid, **c), f"controller state of {fid}"):
            self._controller_shown[fid] = state if shown is None or change["clock"] is not None \
                else {**state, "clock": shown["clock"]}

    def _follow_controller(self, changed: set | None, now: float) -> None:
        """The stock reports, stations, order states and clocks: of the factories whose messages
        arrived since the last look (when a message may have arrived), and at least every
        ``CONTROLLER_REFRESH_S`` the late ones and the clock estimates that moved."""
        if not self._caught_up:
            self.arrivals.start()  # before the catch-up's reads: what arrives meanwhile is read next
            self._clocks_after = utcnow() - timedelta(seconds=LATE_S)
            for fid in self.factories(now):
                self._catch_up(fid)
            self._caught_up = True
            self._controller_at = now
            return
        woken = changed is None or "*" in changed or self.fdb.names.mqtt in changed
        sweep = now - self._controller_at >= CONTROLLER_REFRESH_S
        if not (woken or sweep):
            return
        heard: dict[str, list] = {}
        for msg in self.arrivals.read(sweep=sweep):
            heard.setdefault(msg.get("factory_id") or DEFAULT_FACTORY_ID, []).append(msg)
        clocks: dict = {}
        if sweep:
            # re-read a few seconds back: an estimate written slowly becomes visible late
            for doc in clocks_updated_since(self.fdb, self._clocks_after - timedelta(seconds=LATE_S)):
                if isinstance(doc.get("_id"), str):
                    clocks[doc.pop("_id")] = doc
                    if doc.get("updated_at") is not None and _newer(doc["updated_at"], self._clocks_after):
                        self._clocks_after = doc["updated_at"]
        for fid in sorted(set(heard) | set(clocks)):
            if fid not in self._newest:  # first heard: caught up like at the start
                self._catch_up(fid)
                continue
            stock = None
            moved = fid in clocks
            for msg in heard.get(fid, ()):
                if msg.get("topic") == STOCK_TOPIC:
                    if _newer(msg.get("ts"), self._stock_after.get(fid)) and (
                            stock is None or _newer(msg.get("ts"), stock.get("ts"))):
                        stock = msg
                elif _newer(msg.get("ts"), (self._newest[fid].get(msg.get("topic")) or {}).get("ts")):
                    self._newest[fid][msg["topic"]] = msg
                    moved = True
            if stock is not None:
                self._apply_stock_message(fid, stock)
            if moved:
                clock = clocks[fid] if fid in clocks else (self._controller_shown.get(fid) or {}).get("clock")
                self._show(fid, controller_state_from(self._newest[fid], clock))
        self.arrivals.commit()
        if sweep:
            self._controller_at = now

    def _guarded(self, apply, what: str) -> bool:
        try:
            apply()
            return True
        except Exception as exc:  # noqa: BLE001 - one report must not stop the frames
            from factory_assets.storage.errors import is_transient

            if is_transient(exc):
                raise  # MongoDB down: applied after the outage
            # (e.g. endless write contention on the twin): the next message brings it again
            logger.exception("live: %s could not be applied; passed", what)
            return False

    def step(self, changed: set | None = None) -> int:
        """Process at most one page of new frames; returns how many were handled.

        ``changed``: the collections a wake-up reported (None: look at everything)."""
        from factory_assets.serving.predictor import EndpointUnavailable, UnknownModel
        from factory_assets.storage.errors import is_transient

        now = time.monotonic()
        frames_changed = changed is None or "*" in changed or self.fdb.names.frames in changed
        if frames_changed or now - self._last_housekeeping > 2.0:
            assign_missing_seqs(self.fdb)  # frames written by other tools (an index lookup)
            self._last_housekeeping = now
        self._follow_controller(changed, now)
        page = read_frames_after(self.fdb, self.cursor, limit=self.batch)
        if page.horizon - self.cursor > self.max_backlog:
            # A long backlog (e.g. frames that arrived before the first model): jump to the
            # recent frames so the twin is live now; the batch path infers the older ones.
            skip_to = page.horizon - self.max_backlog
            self.stats.skipped_to_batch += skip_to - self.cursor
            logger.info("live: %d older frames left to the batch path", skip_to - self.cursor)
            self.cursor = skip_to
            self._save_cursor()
            page = read_frames_after(self.fdb, self.cursor, limit=self.batch)
        while not page.frames and page.has_more:  # a window of holes (duplicates): read on
            self.cursor = page.cursor
            page = read_frames_after(self.fdb, self.cursor, limit=self.batch)
        handled = 0
        done: set = set()
        if page.frames:
            # the page's factories' deployments (one query), and which frame already has an inference
            # by which model (one query by frame id: SecantusDB plans no index for $in with a second field)
            self.router.prepare({frame_owner(f)[0] for f in page.frames})
            done = {(d["frame_id"], d.get("model_version")) for d in self.fdb.inferences.find(
                {"frame_id": {"$in": [f["_id"] for f in page.frames]}}, {"frame_id": 1, "model_version": 1})}
        for frame in page.frames:
            choice = self.router.choice(*frame_owner(frame))
            if choice is None:  # no model for this factory's camera yet: the batch path infers it later
                self.stats.no_model += 1
            elif choice.version is None or (frame["_id"], choice.version) not in done:
                try:
                    doc = infer_frame(self.fdb, self.predictor, frame, source="live",
                                      thresholds_cache=self._thresholds, rules=self.rules,
                                      target_model=choice.target_model, router=self.router)
                except UnknownModel as exc:  # this factory's model only: the others go on
                    self.stats.unknown_model += 1
                    self._warn(str(choice.target_model), "live: %s; frame %s left to the batch path", exc,
                               frame["_id"])
                    doc = False
                except ForeignModel as exc:
                    self.stats.foreign_model += 1
                    self._warn("foreign", "live: %s; frame %s not inferred", exc, frame["_id"])
                    doc = False
                except EndpointUnavailable as exc:
                    # Do not move past a frame that was not inferred.
                    self.stats.endpoint_errors += 1
                    self._save_cursor()
                    raise exc
                except Exception as exc:  # noqa: BLE001 - one frame must not stop the live path
                    if is_transient(exc):  # MongoDB down: resume here
                        self._save_cursor()
                        raise
                    # A bug, an input nobody foresaw or a write the database refuses for what it
                    # is: retrying would stop here for ever (and a restarted process with it). The
                    # batch path infers what the live path left, and gives up on a frame that
                    # keeps failing (twin/batch.py).
                    logger.exception("live: frame %s failed; left to the batch path", frame["_id"])
                    self.stats.failed += 1
                    doc = False
                if doc is None:
                    self.stats.rejected += 1
                elif doc is not False:
                    self.stats.inferred += 1
                    self.stats.latencies_ms.append(doc["latency_ms"])
            self.cursor = frame["seq"]
            handled += 1
        # every frame of the window was read: the cursor may pass its holes too
        self.cursor = max(self.cursor, page.cursor)
        self._more = page.has_more
        self._save_cursor()
        return handled

    def run(self, stop=None, duration: float | None = None) -> LiveStats:
        from pymongo.errors import PyMongoError

        from factory_assets.serving.predictor import EndpointUnavailable

        deadline = time.monotonic() + duration if duration else None
        backoff = 0.2
        last_log = time.monotonic()
        outages: dict[str, int] = {}
        last_outage_log: dict[str, float] = {}
        changed = None
        try:
            while not (stop and stop.is_set()) and (deadline is None or time.monotonic() < deadline):
                try:
                    self.waiter.open()  # before reading, so a frame arriving meanwhile still wakes us
                    handled = self.step(changed)
                    backoff = 0.2
                    for what, count in list(outages.items()):
                        logger.info("live: %s available again after %d failed attempts", what, count)
                        del outages[what]
                except (EndpointUnavailable, PyMongoError) as exc:
                    # Endpoint or MongoDB restarting: nothing was skipped (the cursor only moves
                    # past stored inferences), so wait and resume from the stored cursor.
                    what = "endpoint" if isinstance(exc, EndpointUnavailable) else "MongoDB"
                    if what == "MongoDB":
                        self.stats.database_errors += 1
                    now = time.monotonic()
                    outages[what] = outages.get(what, 0) + 1
                    if outages[what] == 1 or now - last_outage_log.get(what, 0.0) >= 60:
                        # the first failure, then one line a minute: a model-less bootstrap or a
                        # long outage must not flood the log
                        # no model loaded yet: the expected wait of every start-up (INFO), until the first
                        # model is deployed ("available again" below says when)
                        expected = "no model loaded yet" in str(exc)
                        logger.log(logging.INFO if expected else logging.WARNING,
                                   "live: %s unavailable (%s: %s); retrying (%d attempts so far)", what,
                                   exc.__class__.__name__, str(exc)[:200], outages[what])
                        last_outage_log[what] = now
                    if isinstance(exc, PyMongoError):
                        self.waiter.close(save=False)
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    changed = None
                    continue
                if time.monotonic() - last_log > 30:
                    logger.info("live: inferred=%d rejected=%d cursor=%d", self.stats.inferred,
                                self.stats.rejected, self.cursor)
                    last_log = time.monotonic()
                if handled or self._more:
                    self.waiter.activity()
                    changed = None
                else:
                    changed = self.waiter.wait()
        finally:
            self.waiter.close()
        return self.stats
