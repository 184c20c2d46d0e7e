"""The batch path's inference of a list of frames, with poison frames set aside.

A *poison* frame fails inference every time while the endpoint is healthy: the
server rejects it (``BadInput``) or answers it with an error it answers no other
frame with. Each failed attempt is counted in ``inference_attempts`` (one document
per frame and model version); after ``max_attempts`` the frame is quarantined in
``error_handling`` with its reason and counted as *given up*, so the batch path and
the sensor's cursor move past it instead of retrying it forever. An endpoint that is
down (its ``/ping`` fails too) is not the frame's fault: that error propagates so the
run fails and is retried, and no attempt is counted.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pymongo import ASCENDING, ReturnDocument

from factory_assets.vocabulary.clock import utcnow
from factory_assets.storage.quarantine import quarantine

logger = logging.getLogger(__name__)

ATTEMPTS_COLLECTION = "inference_attempts"
DEFAULT_MAX_ATTEMPTS = 3
GIVEN_UP_REASON = "inference_failed_repeatedly"
_indexed: set = set()


def _attempts(fdb):
    coll = fdb.db[ATTEMPTS_COLLECTION]
    key = (id(fdb.db.client), fdb.db.name)
    if key not in _indexed:  # idempotent; once per process and database
        coll.create_index([("frame_id", ASCENDING), ("model_version", ASCENDING)], unique=True,
                          name="frame_model")
        _indexed.add(key)
    return coll


def record_failed_attempt(fdb, frame: dict, model_version: str, *, reason: str, error: str,
                          max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> dict:
    """Count one failed inference of ``frame``; quarantine it once it reached ``max_attempts``.
    Returns the attempts document (``attempts``, ``given_up``)."""
    coll = _attempts(fdb)
    now = utcnow()
    doc = coll.find_one_and_update(
        {"frame_id": frame["_id"], "model_version": model_version},
        {"$inc": {"attempts": 1},
         "$set": {"reason": reason, "error": error[:500], "last_attempt_at": now, "frame_seq": frame.get("seq")},
         "$setOnInsert": {"first_attempt_at": now, "given_up": False}},
        upsert=True, return_document=ReturnDocument.AFTER)
    if doc["attempts"] >= max_attempts and not doc.get("given_up"):
        quarantine(fdb, reason=GIVEN_UP_REASON,
                   message=f"{reason} on {doc['attempts']} attempts with model {model_version}: {error[:300]}",
                   source={"kind": "frame", "frame_id": str(frame["_id"]), "path": str(frame["_id"]),
                           "model_version": model_version, "seq": frame.get("seq")})
        doc = coll.find_one_and_update({"_id": doc["_id"]}, {"$set": {"given_up": True, "given_up_at": now}},
                                       return_document=ReturnDocument.AFTER)
        logger.warning("frame %s given up after %d failed inferences (%s)", frame["_id"], doc["attempts"], reason)
    return doc


def given_up_frame_ids(fdb, frame_ids, model_version: str | None = None) -> set:
    """Frames among ``frame_ids`` that ``model_version`` failed on too often: quarantined, not retried.
    ``frame_ids`` may map each frame to its own model's version (frames of several factories)."""
    if not frame_ids:
        return set()
    wanted = frame_ids if isinstance(frame_ids, dict) else {i: model_version for i in frame_ids}
    # by frame_id alone (index prefix), the rest checked here: SecantusDB plans no index for $in plus other fields
    return {d["frame_id"] for d in _attempts(fdb).find(
        {"frame_id": {"$in": list(wanted)}}, {"frame_id": 1, "model_version": 1, "given_up": 1})
        if d.get("model_version") == wanted.get(d["frame_id"]) and d.get("given_up") is True}


def failed_attempts(fdb, frame_id, model_version: str) -> int:
    doc = _attempts(fdb).find_one({"frame_id": frame_id, "model_version": model_version}, {"attempts": 1})
    return int(doc["attempts"]) if doc else 0


@dataclass
class BatchOutcome:
    inferred: int = 0
    failed: int = 0              # attempts that failed this time (frame kept for another attempt)
    given_up: list = field(default_factory=list)  # frame ids quarantined this time


def _endpoint_healthy(predictor) -> bool:
    ping = getattr(predictor, "ping", None)
    if ping is None:
        return False  # cannot tell the frame's fault from an outage: treat as an outage
    try:
        ok, _ = ping()
    except Exception:  # noqa: BLE001 - any failure to ping is an outage
        return False
    return bool(ok)


def infer_frames(fdb, predictor, frames, *, model_version: str, source: str = "batch",
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, rules=None, target_model: str | None = None,
                 router=None) -> BatchOutcome:
    """Infer ``frames`` (documents with their image) in order, storing each inference and
    updating the twin; by the model named ``target_model`` (the frames' factory's, on a
    multi-model endpoint) when given, else the endpoint's own model, which ``router`` must allow
    for each frame's factory (``twin.live.ForeignModel`` otherwise). Raises
    ``EndpointUnavailable`` when the endpoint is down (``UnknownModel`` when it cannot find the
    named model); every stored inference is complete, so a retry resumes where this stopped."""
    from factory_assets.serving.predictor import EndpointUnavailable, UnknownModel
    from factory_assets.twin.live import infer_frame

    outcome = BatchOutcome()
    cache: dict = {}
    for frame in frames:
        try:
            doc = infer_frame(fdb, predictor, frame, source=source, thresholds_cache=cache, rules=rules,
                              target_model=target_model, router=router)
            reason, error = "inference_rejected", "the endpoint rejected the frame as bad input"
        except UnknownModel:
            raise  # the factory's model, not the frame: no attempt is counted
        except EndpointUnavailable as exc:
            if not _endpoint_healthy(predictor):
                raise
            doc, reason, error = None, "endpoint_error", str(exc)
        if doc is not None:
            outcome.inferred += 1
            continue
        attempt = record_failed_attempt(fdb, frame, model_version, reason=reason, error=error,
                                        max_attempts=max_attempts)
        if attempt.get("given_up"):
            outcome.given_up.append(frame["_id"])
        else:
            outcome.failed += 1
    return outcome


def sync_twin(fdb, predictor, model_version: str | None = None, *, reinfer_latest: bool = True,
              rules=None, router=None) -> dict | None:
    """Heal the twins: for each factory, infer its newest frame when its model (``router``: the
    deployment of that frame's factory and camera, or the endpoint's own model before the fleet
    has any deployment; without a router, ``model_version`` on the endpoint's own model) has not
    seen it, apply that model's newest inference and the newest stock report (both guarded, never
    regressing), and the stations', order's and clock's latest states. Returns the twin document
    of the default factory."""
    from factory_assets.storage.frames import latest_frame
    from factory_assets.storage.inferences import inferred_frame_ids, latest_inference
    from factory_assets.twin.live import (apply_controller_states, apply_latest_stock, frame_owner, infer_frame,
                                          known_factories)
    from factory_assets.twin.state import Observation
    from factory_assets.twin.store import apply_observation, get_twin

    factories = known_factories(fdb) if router is not None else [None]
    for factory_id in factories:
        latest = latest_frame(fdb, factory_id=factory_id)  # a bounded seq window, not every frame sorted by ts
        target, version = None, model_version
        if router is not None:
            if latest is None:
                continue
            choice = router.choice(*frame_owner(latest))
            if choice is None:  # no model for this factory yet
                continue
            target, version = choice.target_model, choice.version
        if version is None:
            continue
        if reinfer_latest and latest is not None and predictor is not None \
                and not inferred_frame_ids(fdb, [latest["_id"]], version):
            infer_frame(fdb, predictor, latest, source="schedule", thresholds_cache={}, rules=rules,
                        target_model=target, router=router)
        newest = latest_inference(fdb, version)
        if newest is not None:
            apply_observation(fdb, Observation.from_inference(newest, "batch"), rules)
    apply_latest_stock(fdb, rules=rules)
    apply_controller_states(fdb)
    return get_twin(fdb)


RECENT_TWINS = 50  # the twins a materialization's metadata shows: the most recently updated


def recent_twins(fdb, limit: int = RECENT_TWINS) -> list[dict]:
    """The ``limit`` most recently updated twins, newest first, as rows: ``factory``, ``version``,
    ``updated`` (ISO-8601), ``in_stock`` (the colours the camera sees, else the controller reports:
    ``blue+red``, ``empty``; None before either), ``model`` (the model behind the camera view). One
    range of the ``updated_at`` index over the twin documents (one small document per factory),
    projected to these fields."""
    from factory_assets.twin.state import COLOURS

    rows = []
    projection = {"version": 1, "updated_at": 1, "observed.model_version": 1, "reported.present": 1,
                  **{f"observed.{c}.present": 1 for c in COLOURS}}
    for doc in fdb.twin.find({"updated_at": {"$exists": True}}, projection).sort("updated_at", -1).limit(limit):
        observed, reported = doc.get("observed") or {}, (doc.get("reported") or {}).get("present") or {}
        seen = {c: (observed.get(c) or {}).get("present") for c in COLOURS if isinstance(observed.get(c), dict)}
        present = seen or {c: reported.get(c) for c in COLOURS if c in reported}
        updated = doc.get("updated_at")
        rows.append({"factory": str(doc["_id"]), "version": int(doc.get("version") or 0),
                     "updated": updated.isoformat().replace("+00:00", "Z") if hasattr(updated, "isoformat") else None,
                     "in_stock": ("+".join(c for c in COLOURS if present.get(c)) or "empty") if present else None,
                     "model": observed.get("model_version")})
    return rows
