"""Aggregations over frames and inferences that report on a time window, as pandas
DataFrames (one row per camera or per inference path). Every pipeline starts with a
``$match`` on an indexed time field and projects no image bytes."""
from __future__ import annotations

import logging
from datetime import datetime

logger = logging.getLogger(__name__)

LOW_CONFIDENCE_MARGIN = 0.15  # a probability this close to 0.5 is a low-confidence decision


def frames_per_camera(fdb, start: datetime, end: datetime):
    """Frames and bytes per camera captured in [start, end)."""
    import pandas as pd

    from factory_assets.storage.frames import day_query

    rows = list(fdb.frames.aggregate([
        {"$match": day_query(start, end)},
        {"$group": {"_id": {"$ifNull": ["$camera_id", "unknown"]}, "frames": {"$sum": 1},
                    "bytes": {"$sum": {"$ifNull": ["$size", 0]}}}},
        {"$sort": {"_id": 1}},
    ]))
    return pd.DataFrame({"camera": [str(r["_id"]) for r in rows], "frames": [int(r["frames"]) for r in rows],
                         "bytes": [int(r["bytes"]) for r in rows]})


def inferences_per_path(fdb, start: datetime, end: datetime, model_version: str):
    """Per inference path (live, batch, schedule): inferences of frames captured in
    [start, end) by ``model_version``, their mean latency and how many had a
    low-confidence decision."""
    import pandas as pd

    rows = list(fdb.inferences.aggregate([
        {"$match": {"frame_ts": {"$gte": start, "$lt": end}, "model_version": model_version}},
        {"$project": {"latency_ms": 1, "source": 1, "low": {"$anyElementTrue": [{"$map": {
            "input": {"$objectToArray": "$probabilities"}, "as": "p",
            "in": {"$lt": [{"$abs": {"$subtract": ["$$p.v", 0.5]}}, LOW_CONFIDENCE_MARGIN]}}}]}}},
        {"$group": {"_id": "$source", "inferences": {"$sum": 1}, "mean_latency_ms": {"$avg": "$latency_ms"},
                    "low_confidence": {"$sum": {"$cond": ["$low", 1, 0]}}}},
        {"$sort": {"_id": 1}},
    ]))
    return pd.DataFrame({"path": [str(r["_id"]) for r in rows],
                         "inferences": [int(r["inferences"]) for r in rows],
                         "mean_latency_ms": [round(float(r["mean_latency_ms"] or 0.0), 3) for r in rows],
                         "low_confidence": [int(r["low_confidence"]) for r in rows]})
