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
from factory_assets.twin.batch import given_up_frame_ids
from factory_assets.vocabulary import utcnow


@dataclass
class FramePlan:
    cursor: int                      # new cursor: every frame up to here is inferred
    inferred: list = field(default_factory=list)   # frames newly found inferred (live path)
    pending: list = field(default_factory=list)    # frames the batch path must infer
    waiting: int = 0                 # young uninferred frames left to the live path this time
    # frames of a factory or camera with no model yet: they do not hold the cursor (no other factory
    # waits for them); the caller keeps them owed until that model is deployed
    unmodelled: list = field(default_factory=list)

    def pending_by_day(self) -> dict[str, list[dict]]:
        days: dict[str, list[dict]] = {}
        for f in self.pending:
            days.setdefault(frame_ts(f).strftime("%Y-%m-%d"), []).append(f)
        return days

    def pending_by_factory_day(self) -> dict[tuple[str, str], list[dict]]:
        """(factory_id, day) -> its pending frames (frames without a factory: the default one's)."""
        from factory_assets.vocabulary import DEFAULT_FACTORY_ID

        out: dict[tuple[str, str], list[dict]] = {}
        for f in self.pending:
            key = (f.get("factory_id") or DEFAULT_FACTORY_ID, frame_ts(f).strftime("%Y-%m-%d"))
            out.setdefault(key, []).append(f)
        return out


def plan_frames(fdb, cursor: int, model_version, *, limit: int = 1000,
                live_grace_seconds: float = 10.0, now: datetime | None = None, prepare=None) -> FramePlan:
    """``model_version``: the deployed version, or a function frame -> the version of that frame's
    factory and camera (None: no model for it yet, the frame goes to ``unmodelled``); ``prepare``
    is called with the page's frames first (to read their factories' deployments at once)."""
    assign_missing_seqs(fdb)
    page = read_frames_after(fdb, cursor, limit=limit,
                             projection={"_id": 1, "seq": 1, "ts": 1, "received_at": 1, "camera_id": 1,
                                         "factory_id": 1})
    if not page.frames:
        return FramePlan(cursor=page.cursor)
    now = now or utcnow()
    if prepare is not None:
        prepare(page.frames)
    version_of = model_version if callable(model_version) else (lambda f: model_version)
    versions = {f["_id"]: version_of(f) for f in page.frames}
    modelled = {i: v for i, v in versions.items() if v is not None}
    # one query by frame id each (whatever the number of versions: one per factory and camera), the
    # version checked here; a poison frame given up after repeated failures (twin/batch.py) is
    # settled too: never stalls the cursor
    done = {d["frame_id"] for d in fdb.inferences.find({"frame_id": {"$in": list(modelled)}},
                                                       {"frame_id": 1, "model_version": 1})
            if d.get("model_version") == modelled.get(d["frame_id"])} if modelled else set()
    done |= given_up_frame_ids(fdb, modelled)
    plan = FramePlan(cursor=cursor)
    blocked = False
    for f in page.frames:
        if versions[f["_id"]] is None:
            plan.unmodelled.append(f)
            if not blocked:
                plan.cursor = f["seq"]
            continue
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
