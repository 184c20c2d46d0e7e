"""What the batch path still has to infer (used by ``new_frames_sensor``).

The sensor's cursor is a frame ``seq`` (see storage/frames.py). It moves only over
frames already inferred by the deployed model — by the live updater or by an
earlier run — so a frame that was never inferred is never passed: it stays
pending until a run infers it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from factory_assets.storage.frames import assign_missing_seqs, frame_ts, read_frames_after
from factory_assets.storage.inferences import inferred_frame_ids
from factory_assets.twin.batch import given_up_frame_ids
from factory_assets.vocabulary import utcnow


@dataclass
class FramePlan:
    cursor: int                      # new cursor: every frame up to here is inferred
    inferred: list = field(default_factory=list)   # frames newly found inferred (live path)
    pending: list = field(default_factory=list)    # frames the batch path must infer
    waiting: int = 0                 # young uninferred frames left to the live path this time

    def pending_by_day(self) -> dict[str, list[dict]]:
        days: dict[str, list[dict]] = {}
        for f in self.pending:
            days.setdefault(frame_ts(f).strftime("%Y-%m-%d"), []).append(f)
        return days


def plan_frames(fdb, cursor: int, model_version: str, *, limit: int = 1000,
                live_grace_seconds: float = 10.0, now: datetime | None = None) -> FramePlan:
    assign_missing_seqs(fdb)
    page = read_frames_after(fdb, cursor, limit=limit,
                             projection={"_id": 1, "seq": 1, "ts": 1, "received_at": 1, "camera_id": 1})
    if not page.frames:
        return FramePlan(cursor=page.cursor)
    now = now or utcnow()
    ids = [f["_id"] for f in page.frames]
    # a poison frame given up after repeated failures (twin/batch.py) is settled too: never stalls the cursor
    done = inferred_frame_ids(fdb, ids, model_version) | given_up_frame_ids(fdb, ids, model_version)
    plan = FramePlan(cursor=cursor)
    blocked = False
    for f in page.frames:
        if f["_id"] in done:
            plan.inferred.append(f)
            if not blocked:
                plan.cursor = f["seq"]
            continue
        blocked = True
        received = f.get("received_at")
        if received is not None and received.tzinfo is None:
            received = received.replace(tzinfo=timezone.utc)
        if received is not None and now - received < timedelta(seconds=live_grace_seconds):
            plan.waiting += 1  # the live updater normally infers it within milliseconds
        else:
            plan.pending.append(f)
    if not blocked and len(page.frames) < limit:
        plan.cursor = max(plan.cursor, page.cursor)
    return plan
