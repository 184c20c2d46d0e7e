"""Reading "the newest n" as index ranges next to the end, not "sorted, limit n" over everything.

A server that applies ``limit`` after reading the whole index range (SecantusDB does) makes
``find(q).sort(ts, -1).limit(n)`` cost every matching document, the whole history. These helpers
read ranges of the sort key back from the end, widening while they hold too few documents (an
empty range reads no key), so what is read is about what is returned.
"""
from __future__ import annotations

from datetime import datetime, timedelta

FIRST_SPAN_S = 60.0
GROWTH = 4  # each range this many times longer than the one before
MAX_RANGES = 14  # 60 s x 4^13: more than a century


def newest_by_time(coll, query: dict, n: int, *, field: str = "ts", projection: dict | None = None,
                   until: datetime | None = None, first_span_s: float = FIRST_SPAN_S) -> list[dict]:
    """Up to ``n`` documents of ``query`` with the newest ``field`` (a datetime) before ``until``
    (default: a day from now, for clocks that run ahead), newest first: time ranges back from
    ``until``, each ``GROWTH`` times as long as the one before, until ``n`` are found or a century
    is covered.
    ``query`` must lead an index whose next key is ``field``."""
    from factory_assets.vocabulary import utcnow

    hi = until or utcnow() + timedelta(days=1)
    span = timedelta(seconds=first_span_s)
    found: list[dict] = []
    for _ in range(MAX_RANGES):
        lo = hi - span
        found += list(coll.find({**query, field: {"$gte": lo, "$lt": hi}}, projection))
        if len(found) >= n:
            break
        hi, span = lo, span * GROWTH
    found.sort(key=lambda d: d[field], reverse=True)
    return found[:n]


def newest_by_seq(coll, query: dict, upto: int, *, field: str = "seq", projection: dict | None = None,
                  first_span: int = 64) -> list[dict]:
    """The documents of ``query`` in the newest non-empty range of ``field`` (an integer sequence)
    at or below ``upto``: ranges back from ``upto``, doubling while empty; [] when none."""
    hi, span = upto, first_span
    while hi > 0:
        lo = max(0, hi - span)
        docs = list(coll.find({**query, field: {"$gt": lo, "$lte": hi}}, projection))
        if docs:
            return docs
        hi, span = lo, span * 2
    return []
