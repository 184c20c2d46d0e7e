"""The project's one clock and its one parser of days.

Every "now" in code that decides something goes through :func:`utcnow`, so the
UTC convention lives in one place; a day on the command line, in run config or in
a partition key is a ``YYYY-MM-DD`` string in UTC, parsed by :func:`parse_day`.
"""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

DAY_FORMAT = "%Y-%m-%d"


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(timezone.utc)


def parse_day(text: str) -> datetime:
    """Midnight UTC of ``YYYY-MM-DD``; ``ValueError`` naming the bad value otherwise."""
    try:
        return datetime.strptime(str(text), DAY_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        raise ValueError(f"{text!r} is not a day (YYYY-MM-DD)") from None


def day_key(moment: datetime | date) -> str:
    """The UTC day of ``moment`` as ``YYYY-MM-DD`` (naive datetimes are UTC)."""
    if isinstance(moment, datetime):
        moment = (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
    return moment.strftime(DAY_FORMAT)


def day_range(first: str, last: str) -> list[str]:
    """Every day from ``first`` to ``last`` inclusive; ``ValueError`` when first is after last."""
    start, end = parse_day(first), parse_day(last)
    if start > end:
        raise ValueError(f"{first} is after {last}")
    return [day_key(start + timedelta(days=i)) for i in range((end - start).days + 1)]


def recent_days(n: int, now: datetime | None = None) -> list[str]:
    """The ``n`` UTC days ending with the day of ``now`` (default: today), oldest first."""
    if n < 1:
        raise ValueError(f"a window of days must hold at least one day, got {n}")
    today = parse_day(day_key(now or utcnow()))
    return [day_key(today - timedelta(days=i)) for i in range(n - 1, -1, -1)]
