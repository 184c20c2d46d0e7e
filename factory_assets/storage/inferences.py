"""``inferences``: one document per frame and model version.

Written by the live twin updater and by the ``stock_inferences`` batch asset;
the unique (frame_id, model_version) key makes both idempotent and lets them
share work: a frame the live path inferred is not inferred again by a run.
Its indexes are created with the others in ``storage/indexes.py``.
"""
from __future__ import annotations

from factory_assets.vocabulary import utcnow


def build_inference(frame: dict, *, probabilities: dict, thresholds: dict, model_version: str,
                    latency_ms: float, source: str, slots: dict | None = None,
                    model_kind: str | None = None) -> dict:
    """One inference document. ``slots`` (a per-slot model's slot -> state) and ``model_kind``
    are stored only when given, so a presence model's documents keep their shape."""
    from factory_assets.storage.frames import frame_ts

    present = {c: bool(p >= thresholds.get(c, 0.5)) for c, p in probabilities.items()}
    doc = {"frame_id": frame["_id"], "frame_seq": frame.get("seq"), "frame_ts": frame_ts(frame),
            "camera_id": frame.get("camera_id"), "factory_id": frame.get("factory_id", "factory-1"),
            "model_version": model_version, "probabilities": probabilities, "present": present,
            "thresholds": thresholds, "latency_ms": round(float(latency_ms), 3), "source": source,
            "created_at": utcnow()}
    if slots:
        doc["slots"] = slots
    if model_kind:
        doc["model_kind"] = model_kind
    return doc


def record_inference(fdb, doc: dict) -> bool:
    """Store one inference; False when that frame was already inferred by that model."""
    result = fdb.inferences.update_one({"frame_id": doc["frame_id"], "model_version": doc["model_version"]},
                                       {"$setOnInsert": doc}, upsert=True)
    return result.upserted_id is not None


def inferred_frame_ids(fdb, frame_ids: list, model_version: str) -> set:
    # By frame_id alone (the leading field of the frame_model index) and the model picked here:
    # SecantusDB plans no index for ``$in`` combined with a second field and scanned every inference.
    if not frame_ids:
        return set()
    return {d["frame_id"] for d in fdb.inferences.find({"frame_id": {"$in": list(frame_ids)}},
                                                        {"frame_id": 1, "model_version": 1})
            if d.get("model_version") == model_version}


def latest_inference(fdb, model_version: str, window: int = 256) -> dict | None:
    """The newest inference (by frame time) of ``model_version`` among the frames of the last
    ``window`` seqs: an index range on ``frame_seq`` whatever the history. Falls back to the
    unbounded newest-first query only when that model inferred none of them."""
    from factory_assets.storage.frames import FrameSequence

    horizon = FrameSequence(fdb).horizon()
    recent = [d for d in fdb.inferences.find({"frame_seq": {"$gt": max(0, horizon - window), "$lte": horizon}})
              if d.get("model_version") == model_version]
    if recent:
        return max(recent, key=lambda d: d["frame_ts"])
    return fdb.inferences.find_one({"model_version": model_version}, sort=[("frame_ts", -1)])
