"""``labels``: what a frame shows, one document per frame and label source.

Sources, each with its provenance, in priority order: ``manual`` (a person said
so) beats ``import`` (an existing ``.lst`` dataset) beats ``auto`` (the
controller's own ``f/i/stock`` reports). A frame's *effective* label is the one
of its highest-priority source. Presence of a colour means any slot holds a
workpiece of that type; the per-slot stock (A1..C3) is kept when known.
"""
from __future__ import annotations

import csv
from datetime import datetime
from pathlib import Path

from bson import ObjectId
from pymongo import UpdateOne

from factory_assets.vocabulary import CLASSES, DEFAULT_FACTORY_ID
from factory_assets.vocabulary import utcnow

PRIORITY = {"manual": 3, "import": 2, "auto": 1}


class LabelError(ValueError):
    """A label that cannot be stored (unknown frame, bad colour, bad CSV line)."""


def combination(present: dict) -> str:
    """``'blue+white'``, or ``'empty'``: the label combination used for stratifying."""
    names = [c for c in CLASSES if present.get(c)]
    return "+".join(names) if names else "empty"


def label_doc(frame: dict, present: dict, source: str, *, provenance: dict, slots: dict | None = None,
              split: str | None = None) -> dict:
    if source not in PRIORITY:
        raise LabelError(f"unknown label source {source!r} (one of {', '.join(PRIORITY)})")
    from factory_assets.storage.frames import frame_ts

    # the frame's factory and camera: a factory's (camera's) labels are an index range of their own
    doc = {"frame_id": frame["_id"], "frame_ts": frame_ts(frame), "frame_sha256": frame.get("sha256"),
           "factory_id": frame.get("factory_id") or DEFAULT_FACTORY_ID, "camera_id": frame.get("camera_id"),
           "source": source, "priority": PRIORITY[source],
           "present": {c: bool(present.get(c, False)) for c in CLASSES},
           "provenance": provenance}
    if slots is not None:
        doc["slots"] = slots
    if split is not None:
        doc["split"] = split
    return doc


def upsert_labels(fdb, docs: list[dict]) -> dict:
    """Store labels idempotently (one per frame and source). Returns counts."""
    if not docs:
        return {"new": 0, "changed": 0, "unchanged": 0}
    now = utcnow()
    ops = [UpdateOne({"frame_id": d["frame_id"], "source": d["source"]},
                     {"$set": {**d, "updated_at": now}, "$setOnInsert": {"created_at": now}}, upsert=True)
           for d in docs]
    result = fdb.labels.bulk_write(ops, ordered=False)
    return {"new": result.upserted_count, "changed": result.modified_count,
            "unchanged": len(docs) - result.upserted_count - result.modified_count}


def effective_labels(fdb, start: datetime | None = None, end: datetime | None = None, *,
                     factory_id: str | None = None, camera_id: str | None = None) -> list[dict]:
    """One label per frame, its highest-priority source, ordered by frame time; with
    ``factory_id`` (and ``camera_id``), only that factory's (camera's) frames: an index range of
    that factory (``factory_frame_ts``), not the fleet's labels. Labels stored before they carried
    their frame's factory are looked up once through their frames and given it."""
    query: dict = {}
    if start is not None or end is not None:
        query["frame_ts"] = {k: v for k, v in (("$gte", start), ("$lt", end)) if v is not None}
    if factory_id is None:  # the fleet's (camera_id alone: see datasets.manifests.labels_of)
        docs = list(fdb.labels.find(query))
    else:
        docs = [d for d in fdb.labels.find({"factory_id": factory_id, **query})
                if camera_id is None or d.get("camera_id") == camera_id]
        docs += [d for d in _adopt_legacy(fdb, query)
                 if d["factory_id"] == factory_id and (camera_id is None or d.get("camera_id") == camera_id)]
    best: dict = {}
    imported_split: dict = {}
    for doc in docs:
        if doc.get("split") in ("train", "valid"):
            imported_split[doc["frame_id"]] = doc["split"]
        cur = best.get(doc["frame_id"])
        if cur is None or doc["priority"] > cur["priority"]:
            best[doc["frame_id"]] = doc
    for frame_id, split in imported_split.items():
        # a person corrected an imported frame's label: the frame stays on its imported side
        best[frame_id].setdefault("split", split)
    return sorted(best.values(), key=lambda d: (d["frame_ts"], str(d["frame_id"])))


LEGACY_BATCH = 2000


def _adopt_legacy(fdb, query: dict) -> list[dict]:
    """Labels of ``query``'s range stored without a ``factory_id`` (before labels carried it; the
    null keys of ``factory_frame_ts``): each given its frame's factory and camera, read by frame id,
    and written back, so the next read finds them in their factory's range. A label whose frame is
    gone is left as it is (and not returned)."""
    legacy = list(fdb.labels.find({"factory_id": None, **query}))
    out = []
    for lo in range(0, len(legacy), LEGACY_BATCH):
        batch = legacy[lo:lo + LEGACY_BATCH]
        frames = {f["_id"]: f for f in fdb.frames.find({"_id": {"$in": list({d["frame_id"] for d in batch})}},
                                                      {"factory_id": 1, "camera_id": 1})}
        ops = []
        for doc in batch:
            frame = frames.get(doc["frame_id"])
            if frame is None:
                continue
            owner = {"factory_id": frame.get("factory_id") or DEFAULT_FACTORY_ID, "camera_id": frame.get("camera_id")}
            doc.update(owner)
            out.append(doc)
            ops.append(UpdateOne({"_id": doc["_id"]}, {"$set": owner}))
        if ops:
            fdb.labels.bulk_write(ops, ordered=False)
    return out


# ---------------------------------------------------------------------------
# manual labels


def parse_present(text: str | None, empty: bool = False) -> dict:
    if empty:
        if text:
            raise LabelError("--empty and --present exclude each other")
        return {c: False for c in CLASSES}
    if not text:
        raise LabelError("say which colours are present (--present blue,red) or --empty")
    names = [t.strip().lower() for t in text.replace(";", ",").split(",") if t.strip()]
    unknown = [n for n in names if n not in CLASSES]
    if unknown:
        raise LabelError(f"unknown colour(s) {', '.join(unknown)}; classes are {', '.join(CLASSES)}")
    return {c: c in names for c in CLASSES}


def _find_frame(fdb, frame_id: str) -> dict:
    try:
        oid = ObjectId(frame_id)
    except Exception:
        raise LabelError(f"{frame_id!r} is not a frame id (24 hex characters)") from None
    frame = fdb.frames.find_one({"_id": oid}, {"image": 0, "data": 0})
    if frame is None:
        raise LabelError(f"no frame with id {frame_id}")
    return frame


SLOT_NAMES = tuple(f"{row}{col}" for row in "ABC" for col in "123")
SLOT_TYPES = ("BLUE", "RED", "WHITE")


def parse_slots(text: str | dict | None) -> dict | None:
    """``'A1=BLUE,B2=RED'`` (or a dict) -> slot -> type for all nine slots (unnamed slots are
    empty); None stays None. A per-slot label also decides presence."""
    if text is None:
        return None
    items = text.items() if isinstance(text, dict) else (
        (part.split("=", 1) + [""])[:2] for part in str(text).replace(";", ",").split(",") if part.strip())
    slots: dict = {s: None for s in SLOT_NAMES}
    for slot, kind in items:
        slot, kind = str(slot).strip().upper(), (str(kind).strip().upper() if kind else "")
        if slot not in slots:
            raise LabelError(f"unknown slot {slot!r}; slots are {', '.join(SLOT_NAMES)}")
        if kind not in SLOT_TYPES + ("", "-", "NONE", "EMPTY"):
            raise LabelError(f"slot {slot}: unknown workpiece type {kind!r} (BLUE, RED, WHITE or empty)")
        slots[slot] = kind if kind in SLOT_TYPES else None
    return slots


def presence_of_slots(slots: dict) -> dict:
    return {c: any(t == c.upper() for t in slots.values()) for c in CLASSES}


def label_manually(fdb, frame_id: str, present: dict | None, *, user: str | None = None, note: str | None = None,
                   slots: str | dict | None = None) -> dict:
    """A person's label; with ``slots`` (``'A1=BLUE,B2=RED'``, the others empty) it is a
    per-slot label, and presence follows from it (a ``present`` that contradicts it is refused)."""
    frame = _find_frame(fdb, frame_id)
    slots = parse_slots(slots)
    if slots is not None:
        from_slots = presence_of_slots(slots)
        if present is not None and {c: bool(present.get(c)) for c in CLASSES} != from_slots:
            raise LabelError(f"the slots say {from_slots}, the presence given says otherwise")
        present = from_slots
    if present is None:
        raise LabelError("give the colours present or the slots")
    doc = label_doc(frame, present, "manual", slots=slots,
                    provenance={"user": user or "cli", "note": note, "at": utcnow()})
    upsert_labels(fdb, [doc])
    return doc


def label_from_csv(fdb, path: Path, *, user: str | None = None) -> int:
    """``frame_id,blue,red,white`` (0/1) or ``frame_id,present`` (``blue;red``, empty = none).
    Every line is checked before anything is written; errors name the file and line."""
    path = Path(path)
    docs = []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
        if "frame_id" not in fields or not (set(CLASSES) <= set(fields) or "present" in fields):
            raise LabelError(f"{path}:1: header must be frame_id,{','.join(CLASSES)} or frame_id,present")
        for lineno, raw in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k}
            where = f"{path}:{lineno}"
            try:
                if set(CLASSES) <= set(row):
                    bad = [c for c in CLASSES if row[c] not in ("0", "1")]
                    if bad:
                        raise LabelError(f"{', '.join(bad)} must be 0 or 1")
                    present = {c: row[c] == "1" for c in CLASSES}
                else:
                    present = parse_present(row["present"], empty=not row["present"])
                frame = _find_frame(fdb, row["frame_id"])
            except LabelError as exc:
                raise LabelError(f"{where}: {exc}") from None
            docs.append(label_doc(frame, present, "manual",
                                  provenance={"user": user or "cli", "file": str(path), "line": lineno, "at": utcnow()}))
    upsert_labels(fdb, docs)
    return len(docs)
