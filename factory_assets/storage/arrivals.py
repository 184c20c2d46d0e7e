"""What was stored since the last look: a cursor over a collection's ObjectId ``_id``.

A reader that must act on what *arrived* (the live twin updater: which factories' stock, station
and order messages came in) reads ``{_id: {$gt: cursor}}`` on the ``_id`` index, hinted (SecantusDB
plans a collection scan for an ``_id`` range without the hint): an empty range reads no key, so a
look costs what arrived, whatever the fleet's size or the history.

Why ``_id``: every document the ingester stores gets an ObjectId from pymongo when it is written
(``insert_many``), and the ``_id`` index exists everywhere; no field to add, no index to build. The
index spans the fleet on purpose (like the frames' ``seq``): "what arrived, from any factory" is
the question, so it cannot lead with ``factory_id``; what follows per factory does.

An ObjectId is (seconds, a random value per process, a counter): ordered within one writer
process, but two processes' ids of the same second are ordered by their random values, and a
slow write makes its ids visible late. So a strict look (``_id > newest read``) can pass over a
message made visible after a newer one; a *sweep* (``read(sweep=True)``, the caller's periodic
look) re-reads the last ``late_s`` seconds of ids and returns those not returned before.

Documents whose ``_id`` is not an ObjectId (a string or a number another tool chose) are never in
an ObjectId range (MongoDB compares by type first): a reader sees them only through its own
catch-up (the live updater's start) or a later message of the same factory and topic.
"""
from __future__ import annotations

from datetime import datetime, timedelta

from bson import ObjectId

from factory_assets.vocabulary import utcnow

ID_INDEX = [("_id", 1)]
LATE_S = 5.0  # a message may become visible this long after a newer one (another process's ids, a slow write)


class ArrivalCursor:
    """The documents of ``query`` stored in ``coll`` since the last :meth:`read` (``projection``:
    the fields the caller needs; ``_id`` always comes)."""

    def __init__(self, coll, query: dict | None = None, projection: dict | None = None, *, late_s: float = LATE_S):
        self.coll = coll
        self.query = dict(query or {})
        self.projection = projection
        self.late_s = late_s
        self.after: ObjectId | None = None
        self._returned: set[ObjectId] = set()  # ids of the sweep window already returned
        self._pending: tuple | None = None  # (after, ids) of a read not yet committed

    def start(self, at: datetime | None = None) -> None:
        """Look from ``late_s`` before ``at`` (default now) on: called *before* the caller's catch-up
        reads, so a message stored meanwhile is read by the next look (at worst twice)."""
        self.after = ObjectId.from_datetime((at or utcnow()) - timedelta(seconds=self.late_s))
        self._returned.clear()
        self._pending = None

    def _floor(self) -> ObjectId:
        return ObjectId.from_datetime(self.after.generation_time - timedelta(seconds=self.late_s))

    def read(self, *, sweep: bool = False) -> list[dict]:
        """What arrived since the last :meth:`commit`, oldest id first; ``sweep``: also what became
        visible late within ``late_s`` before the newest id read (each document is returned once
        committed). Nothing moves until :meth:`commit`: a reader that fails half-way (the database
        went away) reads the same documents again."""
        if self.after is None:
            self.start()
        lo = min(self.after, self._floor()) if sweep else self.after
        docs = list(self.coll.find({**self.query, "_id": {"$gt": lo}}, self.projection).hint(ID_INDEX))
        docs.sort(key=lambda d: d["_id"])
        new = [d for d in docs if d["_id"] not in self._returned]
        after = max(self.after, docs[-1]["_id"]) if docs else self.after
        self._pending = (after, [d["_id"] for d in new])
        return new

    def commit(self) -> None:
        """The documents of the last :meth:`read` were handled: the next look starts after them."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        self.after, ids = pending
        floor = self._floor()
        self._returned = {i for i in self._returned if i > floor} | {i for i in ids if i > floor}
