"""Frame documents in ``factory_camera`` and the cursor that never skips one.

One document per frame::

    {ts, received_at, camera_id, factory_id, content_type, width, height,
     sha256, size, image: BinData, source: {...}, seq}

Why ``seq`` and not ``_id``: ObjectIds minted by several ingest processes are
not monotonic, and a counter value allocated before an insert can become
visible *after* a higher one. A reader that remembered "the highest value I
saw" would then skip the slower frame forever.

The protocol (works on any MongoDB: no transactions or change streams):

1. A writer allocates a block of sequence numbers with a compare-and-swap on
   the ``counters`` document, and in the same atomic update registers the block
   as *pending* (``pending: [{lo, hi, at, owner}]``).
2. It inserts its frames with those numbers (duplicates simply leave holes).
3. It removes its pending entry.

A reader first reads the counter document: every number below the lowest
pending block is settled (its insert committed before the release, which
happened before the read). It then reads frames with ``cursor < seq <=
horizon`` in order. So the cursor (an int) only ever moves over settled
numbers. A writer that dies between 1 and 3 leaves a pending block; after
``lease_seconds`` readers reap it. If a writer still alive finds its lease
reaped it re-sequences its frames past the horizon, so nothing is lost.
"""
from __future__ import annotations

import hashlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterable

from pymongo.errors import BulkWriteError, DuplicateKeyError

from factory_assets.storage.errors import DUPLICATE_KEY, is_transient

from factory_assets.vocabulary import parse_data_url, parse_ts, utcnow  # noqa: F401 (re-exported)

DEFAULT_LEASE_SECONDS = 120.0

logger = logging.getLogger(__name__)






def build_frame(image: bytes, *, ts: datetime, camera_id: str, factory_id: str, content_type: str,
                width: int, height: int, source: dict, received_at: datetime | None = None) -> dict:
    from bson import Binary

    return {
        # BSON dates have millisecond precision: truncate now so identity is stable.
        "ts": ts.replace(microsecond=ts.microsecond // 1000 * 1000),
        "received_at": received_at or utcnow(),
        "camera_id": camera_id,
        "factory_id": factory_id,
        "content_type": content_type,
        "width": width,
        "height": height,
        "sha256": hashlib.sha256(image).hexdigest(),
        "size": len(image),
        "image": Binary(image),
        "source": source,
    }


# -- reading any frame document, including the original project's ---------------

def frame_image_bytes(doc: dict) -> bytes:
    """The image bytes of a frame: ``image`` (BinData) or the original's ``data``
    (a ``data:image/jpeg;base64,...`` string)."""
    if doc.get("image") is not None:
        return bytes(doc["image"])
    data = doc.get("data")
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, str):
        return parse_data_url(data)[1]
    raise KeyError(f"frame {doc.get('_id')} has neither 'image' nor 'data'")


def frame_ts(doc: dict) -> datetime:
    return parse_ts(doc["ts"])


# -- the sequence --------------------------------------------------------------

@dataclass
class Allocation:
    lo: int
    hi: int
    owner: str
    at: datetime = field(default_factory=utcnow)

    def entry(self) -> dict:
        return {"lo": self.lo, "hi": self.hi, "owner": self.owner, "at": self.at}


class FrameSequence:
    """Allocation and settlement of ``seq`` numbers for one collection."""

    def __init__(self, fdb, lease_seconds: float = DEFAULT_LEASE_SECONDS):
        self.fdb = fdb
        self.key = f"seq:{fdb.names.frames}"
        self.lease_seconds = lease_seconds
        self.owner = uuid.uuid4().hex
        # Blocks whose insert or release failed (database down mid-flush). Each stays pending,
        # holding readers below it, until a later insert_frames of the same documents through
        # this sequence has completed: then no write of the old block can still land, and it is
        # released at once instead of after its lease (see insert_frames).
        self.unsettled: list[Allocation] = []

    def allocate(self, n: int) -> Allocation:
        if n < 1:
            raise ValueError("allocate at least one number")
        counters = self.fdb.counters
        while True:  # compare-and-swap; retries only under contention
            doc = counters.find_one({"_id": self.key}) or {}
            current = doc.get("next", 0)
            alloc = Allocation(current + 1, current + n, self.owner)
            if doc:
                result = counters.update_one({"_id": self.key, "next": current},
                                             {"$set": {"next": alloc.hi}, "$push": {"pending": alloc.entry()}})
                if result.modified_count == 1:
                    return alloc
            else:
                try:
                    counters.insert_one({"_id": self.key, "next": alloc.hi, "pending": [alloc.entry()]})
                    return alloc
                except DuplicateKeyError:
                    pass

    def release(self, alloc: Allocation) -> bool:
        """Settle a block; False when a reader reaped it as expired meanwhile."""
        result = self.fdb.counters.update_one(
            {"_id": self.key, "pending": {"$elemMatch": {"lo": alloc.lo, "owner": alloc.owner}}},
            {"$pull": {"pending": {"lo": alloc.lo, "owner": alloc.owner}}})
        return result.modified_count == 1

    def horizon(self, now: datetime | None = None) -> int:
        """The highest seq below which every number is settled (inserted or a hole)."""
        doc = self.fdb.counters.find_one({"_id": self.key})
        if not doc:
            return 0
        now = now or utcnow()
        live, expired = [], []
        for entry in doc.get("pending", []):
            at = parse_ts(entry["at"])
            (expired if (now - at).total_seconds() > self.lease_seconds else live).append(entry)
        for entry in expired:  # a writer died between allocate and release
            self.fdb.counters.update_one({"_id": self.key},
                                         {"$pull": {"pending": {"lo": entry["lo"], "owner": entry["owner"]}}})
        if live:
            return min(e["lo"] for e in live) - 1
        return int(doc.get("next", 0))


@dataclass
class InsertResult:
    inserted: int = 0
    duplicates: int = 0
    inserted_ids: list = field(default_factory=list)
    # (document, server error) of each document the server refused for what it is
    # (``storage.errors.REFUSAL_CODES``); the rest of the batch is stored
    refused: list = field(default_factory=list)


def insert_frames(fdb, docs: list[dict], sequence: FrameSequence | None = None) -> InsertResult:
    """Insert frame documents with sequence numbers; duplicates are counted, not stored, and
    documents the server refuses for what they are come back in ``refused`` (the rest stored).

    When the database fails mid-call the exception propagates and the block stays pending
    (a write may still be in flight). A caller that retries the same documents through the
    same ``sequence`` (the Ingestor's flush) settles that block as soon as the retry completes:
    by then every one of those frames is stored under the new block or found as a duplicate
    under the old one, so readers resume at once rather than after the lease.
    """
    if not docs:
        return InsertResult()
    seq = sequence or FrameSequence(fdb)
    alloc = seq.allocate(len(docs))
    for i, doc in enumerate(docs):
        doc["seq"] = alloc.lo + i
        doc.pop("_id", None)
    result = InsertResult()
    failed: set[int] = set()
    refused: dict[int, dict] = {}
    try:
        fdb.frames.insert_many(docs, ordered=False)
    except BulkWriteError as exc:
        if is_transient(exc):  # not a final answer on every document: the caller retries them all
            seq.unsettled.append(alloc)
            raise
        for err in exc.details.get("writeErrors", []):
            if err.get("code") == DUPLICATE_KEY:
                failed.add(err["index"])
            else:  # refused for what it is; the server has answered for every document
                refused[err["index"]] = err
    except Exception:
        seq.unsettled.append(alloc)
        raise
    try:
        released = seq.release(alloc)
    except Exception:
        seq.unsettled.append(alloc)
        raise
    settle_earlier_blocks(seq)
    result.inserted_ids = [d["_id"] for i, d in enumerate(docs) if i not in failed and i not in refused]
    result.refused = [(docs[i], err) for i, err in sorted(refused.items())]
    result.inserted = len(result.inserted_ids)
    result.duplicates = len(failed)
    if not released and result.inserted_ids:
        # Our lease expired and a reader may already have passed these numbers:
        # move the frames past the horizon so they are read, not skipped.
        resequence(fdb, result.inserted_ids, seq)
    return result


def settle_earlier_blocks(seq: FrameSequence) -> None:
    """Release the blocks of failed attempts, now that their documents were written again."""
    while seq.unsettled:
        earlier = seq.unsettled[0]
        if not seq.release(earlier):
            # Reaped as expired: a reader may have passed it. Frames that landed under it are
            # moved past the horizon, as insert_frames does for its own block.
            landed = [d["_id"] for d in seq.fdb.frames.find(
                {"seq": {"$gte": earlier.lo, "$lte": earlier.hi}}, {"_id": 1})]
            if landed:
                resequence(seq.fdb, landed, seq)
        seq.unsettled.pop(0)


def resequence(fdb, ids: list, sequence: FrameSequence) -> None:
    alloc = sequence.allocate(len(ids))
    try:
        for i, _id in enumerate(ids):
            fdb.frames.update_one({"_id": _id}, {"$set": {"seq": alloc.lo + i}})
    finally:
        sequence.release(alloc)


# Frames written by other tools carry no ``seq``. ``{"seq": {"$exists": False}}`` cannot use
# the sparse ``frame_seq`` index (it holds no entry for them), so it scanned every frame with
# its image on every poll. ``{"seq": None}`` matches a missing field too and is served by the
# non-sparse ``frame_seq_id`` index (seq, _id), where all of them sit under the null key.
UNSEQUENCED = {"seq": None}


def assign_missing_seqs(fdb, limit: int = 1000, sequence: FrameSequence | None = None) -> int:
    """Give frames written by other tools (the original project, mongoimport) a seq
    so the cursor sees them too. Returns how many were sequenced."""
    ids = [d["_id"] for d in fdb.frames.find(UNSEQUENCED, {"_id": 1}).sort([("seq", 1), ("_id", 1)]).limit(limit)]
    if ids:
        seq = sequence or FrameSequence(fdb)
        alloc = seq.allocate(len(ids))
        try:
            for i, _id in enumerate(ids):
                fdb.frames.update_one({"_id": _id, **UNSEQUENCED}, {"$set": {"seq": alloc.lo + i}})
        finally:
            seq.release(alloc)
    return len(ids)


@dataclass
class FramePage:
    frames: list[dict]
    cursor: int  # pass back as ``after`` next time
    horizon: int

    @property
    def has_more(self) -> bool:
        return self.cursor < self.horizon


def read_frames_after(fdb, after: int, limit: int = 100, projection: dict | None = None,
                      sequence: FrameSequence | None = None) -> FramePage:
    """The next settled frames after cursor ``after``, oldest first.

    The range read is ``after < seq <= min(horizon, after + limit)``: its cost is bounded by
    ``limit`` whatever the backlog or history (a server that applies ``limit`` after reading
    the whole range, as SecantusDB does, would otherwise read every frame of a long backlog
    with its image). Every number in the window is settled, so when it holds fewer than
    ``limit`` frames (holes) the cursor moves to its end and nothing is skipped."""
    seq = sequence or FrameSequence(fdb)
    horizon = seq.horizon()
    if horizon <= after:
        return FramePage([], after, horizon)
    hi = min(horizon, after + max(int(limit), 1))
    frames = list(fdb.frames.find({"seq": {"$gt": after, "$lte": hi}}, projection)
                  .sort("seq", 1).limit(limit))
    cursor = frames[-1]["seq"] if len(frames) == limit else hi
    return FramePage(frames, cursor, horizon)


def latest_frame(fdb, projection: dict | None = None, window: int = 64,
                 sequence: FrameSequence | None = None, *, factory_id: str | None = None,
                 by: str = "ts") -> dict | None:
    """The newest frame (by capture time ``ts``, or by arrival ``seq``) among the last
    ``window`` settled seqs, of ``factory_id`` when given: an index range whatever the
    history (``find_one(sort=...)`` reads every frame on a server that applies ``limit``
    after the whole range, as SecantusDB does). Only the chosen frame is fetched with
    ``projection``. When the window holds none: ranges of seqs further back, doubling while empty."""
    horizon = (sequence or FrameSequence(fdb)).horizon()
    if horizon <= 0:
        return None
    recent = [d for d in fdb.frames.find({"seq": {"$gt": max(0, horizon - window), "$lte": horizon}},
                                         {"_id": 1, "seq": 1, "ts": 1, "factory_id": 1})
              if factory_id is None or d.get("factory_id") == factory_id]
    if recent:
        key = (lambda d: d["seq"]) if by == "seq" else (lambda d: (frame_ts(d), d["seq"]))
        return fdb.frames.find_one({"_id": max(recent, key=key)["_id"]}, projection)
    # further back: ranges of seqs back from the horizon, doubling while empty (factory_seq), not every frame
    from factory_assets.storage.ranges import newest_by_seq

    older = newest_by_seq(fdb.frames, {"factory_id": factory_id} if factory_id is not None else {},
                          max(0, horizon - window), projection={"_id": 1, "seq": 1, "ts": 1}, first_span=window)
    if not older:
        return None
    key = (lambda d: d["seq"]) if by == "seq" else (lambda d: (frame_ts(d), d["seq"]))
    return fdb.frames.find_one({"_id": max(older, key=key)["_id"]}, projection)


def day_query(day_start: datetime, day_end: datetime) -> dict:
    """Frames captured in [start, end): ``ts`` as a date or, in original documents, an ISO string."""
    iso_lo = day_start.strftime("%Y-%m-%dT%H:%M:%S")
    iso_hi = day_end.strftime("%Y-%m-%dT%H:%M:%S")
    return {"$or": [{"ts": {"$gte": day_start, "$lt": day_end}},
                    {"ts": {"$gte": iso_lo, "$lt": iso_hi, "$type": "string"}}]}


def day_queries(day_start: datetime, day_end: datetime) -> list[dict]:
    """The two branches of :func:`day_query`, each an index range on ``ts`` by itself (a range
    on a string only matches strings). SecantusDB plans no index for a top-level ``$or``."""
    iso_lo = day_start.strftime("%Y-%m-%dT%H:%M:%S")
    iso_hi = day_end.strftime("%Y-%m-%dT%H:%M:%S")
    return [{"ts": {"$gte": day_start, "$lt": day_end}}, {"ts": {"$gte": iso_lo, "$lt": iso_hi}}]


def iter_day_frames(fdb, day_start: datetime, day_end: datetime, projection: dict | None = None) -> Iterable[dict]:
    """Frames captured in [start, end) (see :func:`day_query`), one indexed query per branch."""
    for query in day_queries(day_start, day_end):
        yield from fdb.frames.find(query, projection)


def iter_frames(fdb, query: dict, projection: dict | None = None) -> Iterable[dict]:
    return fdb.frames.find(query, projection).sort([("ts", 1), ("_id", 1)])


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# -- waking up readers of the cursor ---------------------------------------------

CHANGE_STREAM_PREFIX = "changestream:"


class ChangeWaiter:
    """The wake-up signal of a reader that follows the seq cursor.

    Where the server offers change streams (a replica set: Atlas, SecantusDB) it waits
    on one over the database, matching frame inserts, updates of the frame sequence's
    counter (a writer releasing its block is what makes new frames readable),
    and the collections in ``extra`` (e.g. ``{"mqtt": {"fullDocument.topic": "f/i/stock"}}``);
    events carry no document, so no image bytes. Its resume token is kept in ``counters``
    under ``changestream:<name>``, like the cursor. Elsewhere (a standalone mongod) it polls
    adaptively: ``min_interval`` while there is work, doubling up to ``max_interval`` when idle.

    The seq cursor stays the source of truth: a wake-up only says "look now"; a
    reader also looks at least every ``max_interval`` (leases expire without events).
    """

    def __init__(self, fdb, name: str, *, extra: dict | None = None, min_interval: float = 0.05,
                 max_interval: float = 1.0, change_stream: bool = True, log=None):
        self.fdb = fdb
        self.name = name
        self.extra = extra or {}
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.interval = min_interval
        self.mode = "change_stream" if change_stream else "poll"
        del log  # accepted for old callers and ignored: this module's logger reports
        self._stream = None
        self._token_saved_at = 0.0
        self._token_dirty = False

    # the stream --------------------------------------------------------------
    def pipeline(self) -> list[dict]:
        names = self.fdb.names
        ors = [{"ns.coll": names.frames, "operationType": {"$in": ["insert", "update", "replace"]}},
               {"ns.coll": names.counters, "documentKey._id": f"seq:{names.frames}"}]
        for attr, cond in self.extra.items():
            ors.append({"ns.coll": getattr(names, attr, attr), **cond})
        return [{"$match": {"$or": ors}},
                # never the documents (a frame's image); _id is the resume token and must stay
                {"$project": {"_id": 1, "operationType": 1, "ns": 1, "documentKey": 1}}]

    def _token_id(self) -> str:
        return CHANGE_STREAM_PREFIX + self.name

    def _open(self):
        from pymongo.errors import OperationFailure

        doc = self.fdb.counters.find_one({"_id": self._token_id()})
        token = (doc or {}).get("token")
        kwargs = {"max_await_time_ms": int(self.max_interval * 1000)}
        try:
            return self.fdb.db.watch(self.pipeline(), resume_after=token, **kwargs) if token else \
                self.fdb.db.watch(self.pipeline(), **kwargs)
        except OperationFailure as exc:
            if token and exc.code in (260, 280, 286):  # token unknown or history lost: start afresh
                logger.info("change stream %s: resume token no longer usable (%s); starting afresh",
                            self.name, exc.code)
                return self.fdb.db.watch(self.pipeline(), **kwargs)
            raise

    def _save_token(self, force: bool = False) -> None:
        if self._stream is None or not self._token_dirty:
            return
        now = time.monotonic()
        if not force and now - self._token_saved_at < 1.0:
            return  # at most one write a second: the token is a hint, the seq cursor the truth
        token = self._stream.resume_token
        if token is not None:
            self.fdb.counters.update_one({"_id": self._token_id()}, {"$set": {"token": token, "at": utcnow()}},
                                         upsert=True)
        self._token_saved_at = now
        self._token_dirty = False

    def open(self) -> "ChangeWaiter":
        """Open the change stream now (before the first read, so no change falls in between)."""
        from pymongo.errors import ConfigurationError, OperationFailure

        if self.mode != "change_stream" or self._stream is not None:
            return self
        try:
            self._stream = self._open()
        except (OperationFailure, ConfigurationError) as exc:
            # A standalone server: "$changeStream stage is only supported on replica sets" (40573).
            self.mode = "poll"
            logger.info("%s: change streams unavailable (%s); polling adaptively every %g-%gs", self.name,
                        str(exc)[:120], self.min_interval, self.max_interval)
        return self

    def activity(self) -> None:
        """Work was found: poll fast again."""
        self.interval = self.min_interval

    def wait(self) -> set:
        """Block until something may have changed or ``max_interval`` passed.

        Returns the collections seen changing (empty after a quiet wait; ``{"*"}`` when
        polling, where anything may have changed)."""
        from pymongo.errors import PyMongoError

        if self.mode == "change_stream":
            try:
                self.open()
                if self._stream is not None:
                    change = self._stream.try_next()
                    if change is None:
                        self._save_token(force=False)
                        return set()
                    self._token_dirty = True
                    self._save_token()
                    return {change.get("ns", {}).get("coll", "*")}
            except PyMongoError as exc:
                # Server restarting: drop the stream, let the reader find out and retry.
                logger.info("change stream %s interrupted: %s", self.name, exc.__class__.__name__)
                self.close(save=False)
                time.sleep(self.min_interval)
                return {"*"}
        time.sleep(self.interval)
        self.interval = min(self.interval * 2, self.max_interval)
        return {"*"}

    def close(self, save: bool = True) -> None:
        if self._stream is not None:
            try:
                if save:
                    self._save_token(force=True)
                self._stream.close()
            except Exception:  # noqa: BLE001 - closing a stream on a server that went away
                pass
            self._stream = None
