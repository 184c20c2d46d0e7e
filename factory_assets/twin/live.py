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

Besides the frames it keeps the controller's side of the twin current, per factory (reads by
``factory_id`` first, index ``factory_topic_ts``): the newest ``f/i/stock`` report, the newest
``f/i/state/<station>`` of each station, the newest ``f/i/order`` and the clock offset the
ingester estimated (``storage.clocks``). The settle and persistence rules (``TwinRules``,
``FACTORY_SETTLE_S``...) decide which disagreements the twin flags.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from factory_assets.storage.frames import (ChangeWaiter, assign_missing_seqs, frame_image_bytes, parse_ts,
                                           read_frames_after)
from factory_assets.storage.inferences import build_inference, inferred_frame_ids, record_inference
from factory_assets.storage.quarantine import quarantine
from factory_assets.storage.clocks import clock_info
from factory_assets.twin.state import COLOURS, Observation, Reported, TwinRules, reported_from_stock
from factory_assets.twin.store import apply_controller_state, apply_observation, apply_reported
from factory_assets.vocabulary import (DEFAULT_FACTORY_ID, ORDER_STATE_TOPIC, STATION_CODES, STATION_ERROR_CODES,
                                       STATION_STATE_PREFIX, STATIONS, STOCK_TOPIC, parse_ts)
from factory_assets.vocabulary.messages import parse_stock_report

STATION_TOPICS: dict[str, str] = {STATION_STATE_PREFIX + s: s for s in STATIONS}
CONTROLLER_REFRESH_S = 2.0  # the stations, order and clock are looked at least this often
FACTORIES_REFRESH_S = 5.0   # and the set of factories to look at

CURSOR_PREFIX = "cursor:"

logger = logging.getLogger(__name__)


def load_cursor(fdb, name: str) -> int:
    doc = fdb.counters.find_one({"_id": CURSOR_PREFIX + name})
    return int(doc["seq"]) if doc else 0


def save_cursor(fdb, name: str, seq: int) -> None:
    # $max: a cursor only moves forward, even with two updaters running by mistake.
    fdb.counters.update_one({"_id": CURSOR_PREFIX + name}, {"$max": {"seq": seq}}, upsert=True)


_TWIN_REPORT_TIME = object()


MAX_UNREADABLE_REPORTS = 10  # unreadable newest reports apply_latest_stock passes over before it gives up


def known_factories(fdb) -> list[str]:
    """The factories the twin follows: every ``factory_id`` the ingester stamped on a message
    (a skip scan of the ``factory_topic_ts`` index: one index lookup per factory, whatever the
    history), and the default one."""
    ids, last = {DEFAULT_FACTORY_ID}, ""
    while True:
        doc = fdb.mqtt.find_one({"factory_id": {"$gt": last}}, {"factory_id": 1}, sort=[("factory_id", 1)])
        if doc is None or not isinstance(doc.get("factory_id"), str):
            break
        last = doc["factory_id"]
        ids.add(last)
    return sorted(ids)


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
    stations = {}
    for topic, station in STATION_TOPICS.items():
        msg = fdb.mqtt.find_one({"factory_id": factory_id, "topic": topic}, {"payload": 1, "ts": 1},
                                sort=[("ts", -1)])
        state = station_state((msg or {}).get("payload"))
        if state is not None:
            state["ts"] = state["ts"] or msg.get("ts")
            stations[station] = state
    order = None
    msg = fdb.mqtt.find_one({"factory_id": factory_id, "topic": ORDER_STATE_TOPIC}, {"payload": 1, "ts": 1},
                            sort=[("ts", -1)])
    if msg is not None and isinstance(msg.get("payload"), dict) and msg["payload"].get("state"):
        order = {"state": str(msg["payload"]["state"]), "type": msg["payload"].get("type") or None,
                 "ts": _payload_ts(msg["payload"]) or msg.get("ts")}
    return {"stations": stations, "order": order, "clock": clock_info(fdb, factory_id)}


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
                rules: TwinRules | None = None) -> dict | None:
    """Infer one frame, store the inference and update the twin.

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
        pred = predictor.predict(image, frame.get("content_type") or "image/jpeg")
    except (BadInput, ImageDecodeError) as exc:
        quarantine(fdb, reason="inference_rejected", message=str(exc), source=source_ref)
        return None
    version = pred.model_version or "unknown"
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
    # the most recent ones only: a process that runs for months must not keep every latency
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=10_000))


class LiveTwinUpdater:
    def __init__(self, fdb, predictor, *, cursor_name: str = "twin-live", batch: int = 32,
                 max_backlog: int = 200, poll_seconds: float = 0.05, log=None,
                 max_idle_seconds: float = 1.0, change_stream: bool = True, rules: TwinRules | None = None):
        # ``log`` is accepted for compatibility and ignored: progress goes to this module's logger.
        self.fdb = fdb
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
        self._controller_shown: dict = {}  # factory -> the controller state last applied
        self._more = False
        # Between frames: a change stream where the server offers one, else a 50 ms-1 s poll.
        # Stock, station and order messages wake it too.
        self.waiter = ChangeWaiter(fdb, cursor_name, extra={"mqtt": {"fullDocument.topic": {
                                       "$in": [STOCK_TOPIC, ORDER_STATE_TOPIC, *STATION_TOPICS]}}},
                                   min_interval=poll_seconds, max_interval=max_idle_seconds,
                                   change_stream=change_stream)

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

    def _apply_stock(self) -> None:
        for fid in self.factories():
            if fid not in self._stock_after:
                self._stock_after[fid] = latest_stock_ts(self.fdb, fid)
            query: dict = {"factory_id": fid, "topic": STOCK_TOPIC}
            if self._stock_after[fid] is not None:
                query["ts"] = {"$gt": self._stock_after[fid]}  # only reports newer than the last one seen
            msg = self.fdb.mqtt.find_one(query, sort=[("ts", -1)])
            if not msg:
                continue
            self._guarded(lambda m=msg: self._apply_report(m), f"stock report {msg.get('_id')}")
            if msg.get("ts") is not None:
                self._stock_after[fid] = msg["ts"]  # an unreadable report is quarantined and passed, never retried

    def _apply_report(self, msg: dict) -> None:
        rep = reported_or_quarantine(self.fdb, msg)
        if rep is not None:
            apply_reported(self.fdb, rep, self.rules)

    def _apply_controller(self, changed: set | None, now: float) -> None:
        """The stations, order state and clock: when a message may have arrived, and at least
        every ``CONTROLLER_REFRESH_S`` (the clock estimate changes without a message)."""
        woken = changed is None or "*" in changed or self.fdb.names.mqtt in changed
        if not woken and now - self._controller_at < CONTROLLER_REFRESH_S:
            return
        self._controller_at = now
        for fid in self.factories(now):
            state = controller_state(self.fdb, fid)
            if self._controller_shown.get(fid) == state or not (state["stations"] or state["order"] or state["clock"]):
                continue
            if self._guarded(lambda f=fid, s=state: apply_controller_state(self.fdb, f, **s),
                             f"controller state of {fid}"):
                self._controller_shown[fid] = state

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
        from factory_assets.serving.predictor import EndpointUnavailable
        from factory_assets.storage.errors import is_transient

        now = time.monotonic()
        frames_changed = changed is None or "*" in changed or self.fdb.names.frames in changed
        if frames_changed or now - self._last_housekeeping > 2.0:
            assign_missing_seqs(self.fdb)  # frames written by other tools (an index lookup)
            self._last_housekeeping = now
        self._apply_stock()
        self._apply_controller(changed, now)
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
        done_ids = set()
        served = getattr(self.predictor, "model_version", None)
        if served and page.frames:
            done_ids = inferred_frame_ids(self.fdb, [f["_id"] for f in page.frames], served)
        for frame in page.frames:
            if frame["_id"] not in done_ids:
                try:
                    doc = infer_frame(self.fdb, self.predictor, frame, source="live",
                                      thresholds_cache=self._thresholds, rules=self.rules)
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
