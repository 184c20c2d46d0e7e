"""One database reader per process, fanned out to every SSE/WebSocket subscriber.

A background thread follows the ``digital_twin`` collection: a MongoDB change
stream where the server offers one (replica sets, SecantusDB), else an indexed
poll of the (tiny: one document per factory) collection. For each new twin
version it reads the ``twin_history`` entries written since the previous one
(index ``factory_version``) and hands one ``TwinEvent`` to the subscribers of that
factory on the event loop. However many clients follow the twin, the database
sees one reader.

A subscriber's queue is bounded; a subscriber that falls behind is not allowed
to hold memory: its queue is dropped and it is sent a fresh snapshot instead.

``follow()`` turns a subscription into the message stream the clients see:
``snapshot`` (the whole twin) first, or, when the client says which version it
last saw (``Last-Event-ID``), exactly the ``twin_history`` entries it missed
(``change``) and the current twin (``update``), then the live updates. Ids
strictly increase, so nothing is delivered twice and nothing is skipped.
"""
from __future__ import annotations

import asyncio
import logging
import time
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone

from bson import ObjectId

logger = logging.getLogger(__name__)

MAX_REPLAY = 500
LATE_WINDOW = 8
# How long an expected twin_history entry is awaited. The writer appends it right after
# its twin update, so it normally lands within milliseconds; the bound only matters when a
# writer died between the two writes. Emitting the version before its entry would lose the
# entry for a client that disconnects right then (its Last-Event-ID is already past it).
HISTORY_WAIT_SECONDS = 15.0
# How long a stream waits for the hub's first read of the twins (only when the API started
# without it: the server's startup already waits for it).
HUB_READY_SECONDS = 10.0


def expects_history(doc: dict) -> bool:
    """Does this twin version come with a ``twin_history`` entry? The writers set
    ``history_version`` to the version in the same atomic update when it does. For twin
    documents written before that field existed: writers stamp the section
    they update (``observed``/``reported``/``desired``) with ``updated_at`` and set
    ``metadata.<section>.<field>.changed_at`` to that same instant for what changed."""
    if "history_version" in doc:
        return doc["history_version"] == doc.get("version")
    sections = [(doc.get(k) or {}).get("updated_at") for k in ("observed", "reported", "desired")]
    latest = max((i for i, t in enumerate(sections) if t is not None), key=lambda i: sections[i], default=None)
    if latest is None:
        return False
    name = ("observed", "reported", "desired")[latest]
    if name == "desired":
        return True
    meta = ((doc.get("metadata") or {}).get(name)) or {}
    return any(isinstance(m, dict) and m.get("changed_at") == sections[latest] for m in meta.values())  # a client further behind than this many changes gets a snapshot


def to_json(value):
    """BSON-ish values -> JSON-able (datetimes as ISO-8601 UTC with ``Z``, ObjectIds as hex)."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, bytes):
        return None
    return value


def twin_json(doc: dict | None) -> dict | None:
    if doc is None:
        return None
    out = to_json(doc)
    out["factory_id"] = out.pop("_id", out.get("factory_id"))
    out.setdefault("desired", {})
    out.pop("on_order", None)  # order bookkeeping (changes without a version): GET .../orders shows the orders
    return out


def history_json(entry: dict) -> dict:
    out = to_json(entry)
    out.pop("_id", None)
    return out


@dataclass
class TwinEvent:
    factory_id: str
    version: int
    twin: dict  # JSON-ready
    changes: list  # JSON-ready twin_history entries with version <= self.version


@dataclass
class FrameEvent:
    factory_id: str
    frame: dict  # JSON-ready: id, seq, ts, camera_id, url (never the image)


@dataclass(eq=False)
class Subscription:
    factory_id: str
    queue: asyncio.Queue
    overflowed: bool = False
    closed: bool = False


@dataclass
class HubStats:
    reads: int = 0
    events: int = 0
    mode: str = "starting"
    subscribers: int = 0
    errors: int = 0
    failing: int = 0  # failed reads in a row; 0 after any read that worked
    bad_documents: int = 0  # twin documents passed over because they could not be read
    overflows: int = 0
    extra: dict = field(default_factory=dict)


# Reads failing this many times in a row (about 0.2 + 0.4 + 0.8 s of backoff, plus the server
# selection timeouts) make /api/health answer 503: the reader runs, yet every stream is silent.
DEGRADED_AFTER_FAILURES = 3


class TwinHub:
    def __init__(self, fdb, *, poll_interval: float = 0.1, change_streams: bool = True, queue_size: int = 256,
                 on_twin=None):
        self.fdb = fdb
        self.poll_interval = poll_interval
        self.change_streams = change_streams
        self.queue_size = queue_size
        self.on_twin = on_twin  # callback(twin_doc) in the reader thread (order bookkeeping)
        self.stats = HubStats()
        self._subs: dict[str, set[Subscription]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._versions: dict[str, int] = {}
        self._history: dict[str, int] = {}
        self._recent: dict[str, set] = {}
        self._frame_seq: int | None = None
        self._bad: set[tuple[str, str]] = set()  # (id, version) of twin documents passed over
        self.ready = threading.Event()
        self._ready_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> "TwinHub":
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="twin-hub", daemon=True)
        self._thread.start()
        return self

    def alive(self) -> bool:
        """The reader thread runs (health reports a stopped one: streams would be silent)."""
        return self._thread is not None and self._thread.is_alive()

    async def wait_ready(self, timeout: float) -> bool:
        """Wait on the event loop, holding no worker thread, for the reader's first read of the
        twins (``ready``); False after ``timeout`` seconds without it."""
        if self.ready.is_set():
            return True
        loop = asyncio.get_running_loop()
        waiter = (loop, loop.create_future())
        with self._lock:
            self._ready_waiters.append(waiter)
        try:
            if self.ready.is_set():  # set between the check and the registration
                return True
            await asyncio.wait_for(asyncio.shield(waiter[1]), timeout)
            return True
        except asyncio.TimeoutError:
            return self.ready.is_set()
        finally:
            with self._lock:
                if waiter in self._ready_waiters:
                    self._ready_waiters.remove(waiter)

    def _set_ready(self) -> None:
        self.ready.set()
        with self._lock:
            waiters = list(self._ready_waiters)
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(lambda f=future: f.done() or f.set_result(True))
            except RuntimeError:  # that loop closed meanwhile
                pass

    def healthy(self) -> bool:
        """The reader runs and its reads work (not failing ``DEGRADED_AFTER_FAILURES`` times in a row)."""
        return self.alive() and self.stats.failing < DEGRADED_AFTER_FAILURES

    def close(self) -> None:
        """Stop the reader and end every subscriber's stream."""
        self._stop.set()
        with self._lock:
            subs = [s for group in self._subs.values() for s in group]
        for sub in subs:
            sub.closed = True
            self._call(_wake, sub)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _call(self, fn, *args) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # loop closed meanwhile
                pass

    # -- subscribers (event loop) ----------------------------------------------------------
    def subscribe(self, factory_id: str) -> Subscription:
        sub = Subscription(factory_id, asyncio.Queue(self.queue_size))
        with self._lock:
            self._subs.setdefault(factory_id, set()).add(sub)
            self.stats.subscribers += 1
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            group = self._subs.get(sub.factory_id)
            if group and sub in group:
                group.discard(sub)
                self.stats.subscribers -= 1

    def _dispatch(self, event: TwinEvent) -> None:
        with self._lock:
            subs = list(self._subs.get(event.factory_id, ()))
        for sub in subs:
            if sub.overflowed:
                continue
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                # too slow: drop what it has queued, it resynchronises with a snapshot
                sub.overflowed = True
                self.stats.overflows += 1
                while not sub.queue.empty():
                    sub.queue.get_nowait()
                sub.queue.put_nowait("resync")

    # -- the one reader (thread) -------------------------------------------------------------
    def _run(self) -> None:
        from pymongo.errors import PyMongoError

        backoff = 0.2
        while not self._stop.is_set():
            try:
                if not self.ready.is_set():  # once: after an outage, _poll_once catches up from what was seen
                    self._prime()
                    self.stats.failing = 0
                    self._set_ready()
                if self.change_streams and self._watch():
                    continue
                self._poll()
            except PyMongoError as exc:
                self.stats.errors += 1
                self.stats.failing += 1
                logger.warning("twin hub: MongoDB unavailable (%s); retrying in %.1fs",
                               exc.__class__.__name__, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception as exc:  # noqa: BLE001 - the one reader must outlive a bad document
                # (e.g. InvalidBSON from another tool's write): a dead reader would leave every
                # stream silent while the API answers as if all were well
                self.stats.errors += 1
                self.stats.failing += 1
                logger.exception("twin hub: reader failed (%s); retrying in %.1fs", exc.__class__.__name__, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _prime(self) -> None:
        """Start from what is there now: only newer versions become events."""
        for doc in self.fdb.twin.find({}, {"version": 1}):
            fid = doc["_id"]
            if fid not in self._versions:
                self._versions[fid] = doc.get("version", 0)
                self._history[fid] = self._newest_history(fid, doc.get("version", 0))
                self._recent[fid] = set(range(self._history[fid] - LATE_WINDOW, self._history[fid] + 1))

    def _newest_history(self, fid, version) -> int:
        """The newest history version of ``fid`` at or below its twin's ``version``, looked for among
        the last ``LATE_WINDOW`` versions only (a range of ``factory_version``, not the factory's
        history); ``version - LATE_WINDOW`` when none is there (older entries are never emitted)."""
        if not isinstance(version, int) or isinstance(version, bool):
            return 0
        recent = [d.get("version") for d in self.fdb.twin_history.find(
            {"factory_id": fid, "version": {"$gt": version - LATE_WINDOW, "$lte": version}}, {"version": 1})]
        recent = [v for v in recent if isinstance(v, int)]
        return max(recent) if recent else max(0, version - LATE_WINDOW)

    def _watch(self) -> bool:
        """Follow a change stream; False when the server has none (then poll)."""
        from pymongo.errors import OperationFailure

        try:
            stream = self.fdb.twin.watch(full_document="updateLookup", max_await_time_ms=250)
        except OperationFailure as exc:
            logger.info("twin hub: no change streams on this server (%s); polling", exc.code)
            self.change_streams = False
            return False
        self.stats.mode = "change-stream"
        logger.info("twin hub: following digital_twin through a change stream")
        with stream:
            # a change between _prime and watch(): catch up once
            self._poll_once()
            while not self._stop.is_set() and stream.alive:
                change = stream.try_next()
                self._check_frames()
                self.stats.failing = 0
                if change is None:
                    continue
                self.stats.reads += 1
                doc = change.get("fullDocument")
                if doc is None and change.get("operationType") in ("insert", "update", "replace"):
                    doc = self.fdb.twin.find_one({"_id": change["documentKey"]["_id"]})
                if doc is not None:
                    self._emit_isolated(doc)
        return True

    def _poll(self) -> None:
        self.stats.mode = "poll"
        while not self._stop.is_set():
            self._poll_once()
            self._check_frames()
            self._stop.wait(self.poll_interval)

    def _poll_once(self) -> None:
        self.stats.reads += 1
        for head in self.fdb.twin.find({}, {"version": 1}):  # _id index; one small doc per factory
            if self._isolated(head, lambda h=head: h.get("version", 0) > self._versions.get(h["_id"], -1)):
                doc = self.fdb.twin.find_one({"_id": head["_id"]})
                if doc is not None:
                    self._emit_isolated(doc)
        self.stats.failing = 0

    def _emit_isolated(self, doc: dict) -> None:
        self._isolated(doc, lambda: self._emit(doc))

    def _isolated(self, doc: dict, step):
        """``step()`` for one twin document; a document that cannot be read (another tool's, a
        version that is not a number) is logged once per version and passed over, so it holds
        back neither the reader nor the other factories' streams. MongoDB errors propagate."""
        from pymongo.errors import PyMongoError

        try:
            return step()
        except PyMongoError:
            raise
        except Exception as exc:  # noqa: BLE001 - one document, not the reader
            key = (repr(doc.get("_id")), repr(doc.get("version")))
            if key not in self._bad:
                self._bad.add(key)
                self.stats.bad_documents += 1
                logger.error("twin hub: passing over twin document %s version %s (%s: %s)", key[0], key[1],
                             type(exc).__name__, str(exc)[:200])
            return None

    def _check_frames(self) -> None:
        """The newest camera frame that arrived since the last look (``frame_seq`` index, a range of
        what arrived, no image bytes) -> ``frame`` events; only frames from the first look on are news."""
        if self._frame_seq is None:
            # the first look: news start at the frames settled now (not the newest of every frame
            # stored: a server that applies limit after the range would read them all)
            from factory_assets.storage.frames import FrameSequence

            self._frame_seq = FrameSequence(self.fdb).horizon()
            return
        head = self.fdb.frames.find_one({"seq": {"$gt": self._frame_seq}},
                                        {"seq": 1, "ts": 1, "camera_id": 1, "factory_id": 1}, sort=[("seq", -1)])
        if head is None:
            return
        self._frame_seq = head["seq"]
        frame = to_json(head)
        frame["id"] = frame.pop("_id")
        frame["url"] = f"/api/frames/{frame['id']}.jpg"
        self._call(self._dispatch, FrameEvent(head.get("factory_id") or "factory-1", frame))

    def _emit(self, doc: dict) -> None:
        fid = doc["_id"]
        version = doc.get("version", 0)
        if version <= self._versions.get(fid, -1):
            return
        self._versions[fid] = version
        since = self._history.get(fid, 0)
        # a little behind ``since`` too: a writer appends its history entry just after its
        # twin update, so an entry can show up after a newer version was already emitted
        seen = self._recent.setdefault(fid, set())
        expect = expects_history(doc)
        deadline = time.monotonic() + HISTORY_WAIT_SECONDS
        pause = 0.005
        while True:
            entries = [e for e in self.fdb.twin_history.find(
                {"factory_id": fid, "version": {"$gt": since - LATE_WINDOW, "$lte": version}}).sort("version", 1)
                if e["version"] not in seen]
            if not expect or any(e["version"] == version for e in entries) or self._stop.is_set():
                break
            if time.monotonic() >= deadline:
                logger.warning("twin %s v%s: no twin_history entry after %.0f s (a writer died mid-update?); "
                               "emitting the version without it", fid, version, HISTORY_WAIT_SECONDS)
                break
            self._stop.wait(pause)  # the writer appends the entry right after the twin update
            pause = min(pause * 2, 0.05)
        if entries:
            self._history[fid] = max(since, entries[-1]["version"])
            seen.update(e["version"] for e in entries)
            if len(seen) > 4 * LATE_WINDOW:
                floor = self._history[fid] - LATE_WINDOW
                seen.difference_update([v for v in seen if v <= floor])
        event = TwinEvent(fid, version, twin_json(doc), [history_json(e) for e in entries])
        self.stats.events += 1
        if self.on_twin is not None:
            try:
                self.on_twin(doc)
            except Exception:  # bookkeeping must never stop the stream
                logger.exception("twin hub: on_twin callback failed")
        self._call(self._dispatch, event)


def _wake(sub: Subscription) -> None:
    while sub.queue.full():
        sub.queue.get_nowait()
    sub.queue.put_nowait(None)


# -- the stream a client sees ------------------------------------------------------------------

def snapshot_message(twin: dict) -> dict:
    return {"type": "snapshot", "version": twin["version"], "twin": twin}


async def follow(hub: TwinHub, fdb, factory_id: str, last_id: int | None, *, keepalive: float = 15.0):
    """Yield the client's messages: dicts, or None for a keep-alive.

    The subscription is registered *before* the database is read, so a change
    made while the replay is read is queued and nothing falls between the two."""
    sub = hub.subscribe(factory_id)
    try:
        if not hub.ready.is_set():
            # a catch-up read before the hub's first read could miss a change between the two
            await hub.wait_ready(HUB_READY_SECONDS)
        sent = -1
        replayed = -1  # the history up to this version was read from the database
        for message in await asyncio.to_thread(_catch_up, fdb, factory_id, last_id):
            sent = replayed = message["version"]
            yield message
        while not sub.closed:
            try:
                item = await asyncio.wait_for(sub.queue.get(), keepalive)
            except asyncio.TimeoutError:
                yield None
                continue
            if item is None:
                return
            if isinstance(item, FrameEvent):
                yield {"type": "frame", "frame": item.frame}
                continue
            if item == "resync":
                sub.overflowed = False
                twin = await asyncio.to_thread(_current, fdb, factory_id)
                if twin is not None and twin["version"] > sent:
                    sent = replayed = twin["version"]
                    yield snapshot_message(twin)
                continue
            if item.version <= sent:
                continue
            # the hub hands each history entry out once; only drop what the replay already sent
            changes = [c for c in item.changes if c.get("version", 0) > replayed]
            sent = item.version
            yield {"type": "update", "version": item.version, "twin": item.twin, "changes": changes}
    finally:
        hub.unsubscribe(sub)


def _current(fdb, factory_id: str) -> dict | None:
    return twin_json(fdb.twin.find_one({"_id": factory_id}))


def _catch_up(fdb, factory_id: str, last_id: int | None) -> list[dict]:
    raw = fdb.twin.find_one({"_id": factory_id})
    twin = twin_json(raw)
    if twin is None:
        return []
    version = twin["version"]
    if last_id is None or last_id > version:  # a new client, or one from a database that was reset
        return [snapshot_message(twin)]
    if last_id == version:
        return []
    # ranges of versions after last_id, until more than a replay holds (not every entry since)
    rows, more = history_page(fdb, factory_id, version, limit=MAX_REPLAY, cursor=last_id, order="asc")
    if more:
        return [snapshot_message(twin)]
    entries = [history_json(e) for e in rows]
    if expects_history(raw) and not (entries and entries[-1]["version"] == version):
        # The newest version's history entry is still being written: replay what is stored
        # and leave that version to the hub, which emits it once its entry exists (the
        # subscription was registered before this read, so nothing falls in between).
        return [{"type": "change", "version": e["version"], "change": e} for e in entries]
    out = [{"type": "change", "version": e["version"], "change": e} for e in entries if e["version"] < version]
    out.append({"type": "update", "version": version, "twin": twin,
                "changes": [e for e in entries if e["version"] == version]})
    return out


# -- a page of a factory's history, bounded by the page -----------------------------------------

HISTORY_SLAB = 64  # the first range of versions a page looks at (history is sparse: not every version has an entry)
HISTORY_TIME_SLAB_S = 600.0  # the first time range looked at for a since/until boundary
MAX_TIME_DOUBLINGS = 24  # 600 s x 2^24: three centuries


def _as_int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _boundary_version(fdb, factory_id: str, t: datetime, *, before: bool, now: datetime) -> int | None:
    """The newest version with ``at < t`` (``before``), or the oldest with ``at >= t``: time ranges
    of ``factory_at`` next to ``t``, doubling while empty (an empty range reads no key), so what is
    read is the first non-empty range, not the history. None when there is none."""
    from datetime import timedelta

    span = timedelta(seconds=HISTORY_TIME_SLAB_S)
    for _ in range(MAX_TIME_DOUBLINGS):
        rng = {"$gte": t - span, "$lt": t} if before else {"$gte": t, "$lt": t + span}
        versions = [v for v in (_as_int(d.get("version")) for d in fdb.twin_history.find(
            {"factory_id": factory_id, "at": rng}, {"version": 1})) if v is not None]
        if versions:
            return max(versions) if before else min(versions)
        if not before and t + span > now:
            return None  # nothing from t up to now
        span *= 2
    return None


def history_page(fdb, factory_id: str, top: int, *, limit: int, cursor: int | None = None, order: str = "desc",
                 since: datetime | None = None, until: datetime | None = None,
                 now: datetime | None = None) -> tuple[list[dict], bool]:
    """One page of ``factory_id``'s history: up to ``limit`` entries (``order`` by version) after
    ``cursor`` and with ``since <= at < until``, and whether there are more. ``top``: the twin's
    version (no entry is newer).

    Every read is a range of ``factory_version`` of this factory, next to the page, never "sorted,
    limit n" over the whole history (a server that applies ``limit`` after reading the range, as
    SecantusDB does, would read every entry): ranges of versions from the cursor on, widened while
    they hold too few entries (an empty range reads no key), and for ``since``/``until`` without a
    cursor, the version at that time found by :func:`_boundary_version` first."""
    from factory_assets.vocabulary import utcnow

    now = now or utcnow()
    since, until = (t if t is None or t.tzinfo else t.replace(tzinfo=timezone.utc) for t in (since, until))
    desc = order == "desc"
    if desc:
        edge = min(top, cursor - 1) if cursor is not None else top  # the newest version the page may hold
        if cursor is None and until is not None:
            found = _boundary_version(fdb, factory_id, until, before=True, now=now)
            edge = min(edge, found) if found is not None else 0
    else:
        edge = max(0, cursor) if cursor is not None else 0  # the page starts after this version
        if cursor is None and since is not None:
            found = _boundary_version(fdb, factory_id, since, before=False, now=now)
            edge = found - 1 if found is not None else top
    rows: list[dict] = []
    width, scanned, passed = HISTORY_SLAB, 0, False
    while len(rows) <= limit and not passed and (edge > 0 if desc else edge < top):
        lo, hi = (max(0, edge - width), edge) if desc else (edge, min(top, edge + width))
        for doc in fdb.twin_history.find({"factory_id": factory_id, "version": {"$gt": lo, "$lte": hi}}):
            at = doc.get("at")
            if isinstance(at, datetime):
                at = at if at.tzinfo else at.replace(tzinfo=timezone.utc)
                if since is not None and at < since:
                    passed = passed or desc  # older than the page's time range: the rest is older still
                    continue
                if until is not None and at >= until:
                    passed = passed or not desc
                    continue
            rows.append(doc)
        scanned += hi - lo
        edge = lo if desc else hi
        need = limit + 1 - len(rows)
        # wider while empty; else as wide as the density seen says the rest needs (at most 8x at once)
        estimate = width * 8 if not rows else int(need * scanned / len(rows) * 1.25) + 1
        width = max(HISTORY_SLAB, min(width * 8, estimate))
    rows.sort(key=lambda d: d.get("version", 0), reverse=desc)
    return rows[:limit], len(rows) > limit
