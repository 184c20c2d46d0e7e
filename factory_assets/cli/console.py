"""What `factory-assets up` shows a person: one compact, refreshing status.

Each service writes its own log file (``.factory/logs/<service>.log``); the
terminal shows the services (up/down), frames per second, frames stored,
quarantined inputs, the deployed model, the last twin update and where to
point a browser. ``--verbose`` streams every service's output instead.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from factory_assets.vocabulary import DEFAULT_ENDPOINT, DEFAULT_FACTORY_ID

logger = logging.getLogger(__name__)


@dataclass
class FactoryStatus:
    """A snapshot of the loop's health, read from MongoDB with cheap, indexed reads."""

    reachable: bool = False
    frames: int | None = None
    frames_per_second: float | None = None
    quarantined: int | None = None
    model_version: str | None = None
    endpoint_status: str | None = None
    twin_version: int | None = None
    twin_updated_at: datetime | None = None
    twin_present: dict = field(default_factory=dict)


class StatusProbe:
    """Reads ``FactoryStatus`` every call; frames/s from the change of the frame counter."""

    def __init__(self, uri: str, database: str, endpoint: str = DEFAULT_ENDPOINT, factory_id: str = DEFAULT_FACTORY_ID):
        self.uri = uri
        self.database = database
        self.endpoint = endpoint
        self.factory_id = factory_id
        self._client = None
        self._last: tuple[float, int] | None = None

    def _db(self):
        if self._client is None:
            from pymongo import MongoClient

            self._client = MongoClient(self.uri, serverSelectionTimeoutMS=500, connectTimeoutMS=500,
                                       socketTimeoutMS=2000, tz_aware=True, appname="factory_assets-up")
        from factory_assets.storage.mongo import CollectionNames, FactoryDB

        return FactoryDB(self._client[self.database], CollectionNames.from_env())

    def read(self, now: float) -> FactoryStatus:
        status = FactoryStatus()
        try:
            fdb = self._db()
            counter = fdb.counters.find_one({"_id": f"seq:{fdb.names.frames}"}, {"next": 1}) or {}
            allocated = int(counter.get("next", 0))
            status.frames = fdb.frames.estimated_document_count()
            status.quarantined = fdb.quarantine.estimated_document_count()
            if self._last is not None and now > self._last[0]:
                status.frames_per_second = max(0.0, (allocated - self._last[1]) / (now - self._last[0]))
            self._last = (now, allocated)
            # the factory's own deployment (a fleet: <endpoint>/<factory>/<camera>), else the endpoint's own model
            shown = {"model_version": 1, "served_version": 1, "status": 1}
            prefix = f"{self.endpoint}/{self.factory_id}/"
            endpoint = (fdb.endpoints.find_one({"name": {"$gte": prefix, "$lt": prefix + "\uffff"}}, shown)
                        or fdb.endpoints.find_one({"name": self.endpoint}, shown) or {})
            status.model_version = endpoint.get("served_version") or endpoint.get("model_version")
            status.endpoint_status = endpoint.get("status")
            twin = fdb.twin.find_one({"_id": self.factory_id},
                                     {"version": 1, "updated_at": 1, "observed.present": 1}) or {}
            status.twin_version = twin.get("version")
            status.twin_updated_at = twin.get("updated_at")
            status.twin_present = (twin.get("observed") or {}).get("present") or {}
            status.reachable = True
        except Exception as exc:  # the database may be starting or down: say so, keep going
            logger.debug("status probe failed: %r", exc)
            self._last = None
        return status

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> "StatusProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ago(moment: datetime | None, now: datetime | None = None) -> str:
    if moment is None:
        return "never"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    seconds = max(0.0, ((now or datetime.now(timezone.utc)) - moment).total_seconds())
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def render(services, status: FactoryStatus, links: dict[str, str], log_dir) -> "object":
    """A rich renderable: services on the left, the loop's health on the right."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    svc = Table(title="services", title_justify="left", expand=False, box=None, padding=(0, 2))
    svc.add_column("service")
    svc.add_column("state")
    svc.add_column("pid", justify="right")
    for s in services:
        running = s.proc is not None and s.proc.poll() is None
        state = Text("up", style="green") if running else Text(
            "starting" if s.proc is None else f"exited {s.proc.returncode}", style="yellow" if s.proc is None else "red")
        if getattr(s, "restarts", 0):
            state.append(f" (restarted {s.restarts}×)", style="yellow")
        svc.add_row(s.name, state, str(s.proc.pid) if s.proc else "")

    health = Table(title="factory", title_justify="left", box=None, padding=(0, 2))
    health.add_column("what")
    health.add_column("value")
    if not status.reachable:
        health.add_row("MongoDB", Text("unreachable", style="red"))
    else:
        fps = "-" if status.frames_per_second is None else f"{status.frames_per_second:.1f}"
        health.add_row("frames/s", fps)
        health.add_row("frames stored", f"{status.frames:,}")
        health.add_row("quarantined", Text(f"{status.quarantined:,}", style="yellow" if status.quarantined else ""))
        model = status.model_version[:12] if status.model_version else "none yet (bootstrapping)"
        health.add_row("model", f"{model} {status.endpoint_status or ''}".strip())
        seen = ", ".join(c for c, v in sorted(status.twin_present.items()) if v) or "nothing"
        health.add_row("twin", f"v{status.twin_version} · updated {_ago(status.twin_updated_at)} · sees {seen}"
                       if status.twin_version else "no update yet")
    where = Table(title="open", title_justify="left", box=None, padding=(0, 2))
    where.add_column("what")
    where.add_column("where")
    for name, url in links.items():
        where.add_row(name, url)
    where.add_row("logs", str(log_dir))
    grid = Table.grid(padding=(0, 4))
    grid.add_row(svc, health)
    return Group(grid, where, Text("Ctrl-C stops everything · --verbose streams every log", style="dim"))


def plain_line(services, status: FactoryStatus, now: datetime | None = None) -> str:
    """One line for output that is not a terminal (CI, pipes, log collectors): the time (UTC),
    the services up, frames stored and frames/s, quarantined inputs, the deployed model and
    the twin's version with its last update, the same facts as the live panel."""
    now = now or datetime.now(timezone.utc)
    up_count = sum(1 for s in services if s.proc is not None and s.proc.poll() is None)
    parts = [f"services {up_count}/{len(services)} up"]
    if status.reachable:
        fps = "-" if status.frames_per_second is None else f"{status.frames_per_second:.1f}"
        twin = (f"twin v{status.twin_version} updated {_ago(status.twin_updated_at, now)}" if status.twin_version
                else "twin: no update yet")
        parts += [f"frames {status.frames}", f"frames/s {fps}", f"quarantined {status.quarantined}",
                  f"model {status.model_version[:12] if status.model_version else 'none'}", twin]
    else:
        parts.append("MongoDB unreachable")
    return f"[up] {now.astimezone(timezone.utc):%Y-%m-%dT%H:%M:%SZ} " + " · ".join(parts)


def first_frame_day(uri: str, database: str, today: datetime | None = None) -> str:
    """The UTC day of the first frame stored (``YYYY-MM-DD``), for ``FACTORY_PARTITIONS_START``
    (``up`` passes it to Dagster, defs/partitions.py): the earliest capture time among the
    first stored frames (a bounded read of the lowest ``seq`` numbers, whatever the history),
    never later than today; today when the database holds no frame yet or cannot be read."""
    from factory_assets.vocabulary.clock import day_key

    today = today or datetime.now(timezone.utc)
    from pymongo import MongoClient

    client = MongoClient(uri, serverSelectionTimeoutMS=2000, connectTimeoutMS=2000, socketTimeoutMS=10000,
                         tz_aware=True, appname="factory_assets-up")
    try:
        from factory_assets.storage.frames import frame_ts, read_frames_after
        from factory_assets.storage.mongo import CollectionNames, FactoryDB

        fdb = FactoryDB(client[database], CollectionNames.from_env())
        page = read_frames_after(fdb, 0, limit=64, projection={"ts": 1, "seq": 1})
        frames = page.frames or [f for f in [fdb.frames.find_one({"seq": {"$exists": True}}, {"ts": 1},
                                                                  sort=[("seq", 1)])] if f]
        times = []
        for f in frames:
            try:
                times.append(frame_ts(f))
            except (KeyError, TypeError, ValueError):  # a document without a readable time: passed over
                continue
        return day_key(min([*times, today]))
    except Exception as exc:  # noqa: BLE001 - the database may be starting: today is a safe start
        logger.warning("could not read the first stored frame (%s); Dagster's days start today",
                       exc.__class__.__name__)
        return day_key(today)
    finally:
        client.close()
