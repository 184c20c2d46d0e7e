"""Folder and video/RTSP ingestion, resuming where a crashed run stopped.

Progress lives in MongoDB (``ingest_progress``), written only after the frames it
covers are stored: one document per ingested file (folder), one per video file
(the last stored frame index). A run after a crash skips what is recorded and
redoes at most the one batch that was in flight, which the frame identity index
makes a counted duplicate, never a second document. ``rescan=True`` ignores it.
RTSP streams are live: there is nothing to resume.
"""
from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from factory_assets.ingest.service import Ingestor
from factory_assets.storage.mongo import redact_uri

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
PROGRESS_COLLECTION = "ingest_progress"

logger = logging.getLogger(__name__)


def _progress(ingestor: Ingestor):
    """The progress collection, written with the ingestor's (journaled) write concern."""
    coll = ingestor.fdb.db[PROGRESS_COLLECTION]
    coll.create_index([("source", 1), ("item", 1)], unique=True, name="source_item")  # idempotent
    return coll


def _record(coll, source: str, items: dict[str, dict]) -> None:
    from pymongo import UpdateOne

    if items:
        coll.bulk_write([UpdateOne({"source": source, "item": item}, {"$set": fields}, upsert=True)
                         for item, fields in items.items()], ordered=False)


def _file_ts(path: Path) -> datetime:
    # The file's modification time is the best capture time a folder gives us,
    # and it is stable, so re-ingesting a folder stores nothing twice.
    return datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc)


def ingest_file(ingestor: Ingestor, path: Path) -> bool:
    source = {"kind": "dir", "path": str(path)}
    try:
        data = path.read_bytes()
    except OSError as exc:
        ingestor.reject("unreadable_file", f"cannot read {path}: {exc}", source, None)
        return False
    return ingestor.add_image(data, ts=_file_ts(path), source=source, raw=data)


def scan(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def ingest_dir(ingestor: Ingestor, root: Path, *, watch: bool = False, poll_seconds: float = 1.0,
               duration: float | None = None, rescan: bool = False) -> dict:
    """Ingest the images under ``root``; files recorded as ingested (same mtime and size) are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    ingestor.auto_flush = False  # we flush, then record the progress of exactly what was stored
    progress = _progress(ingestor)
    source = f"dir:{root.resolve()}"
    seen: dict[str, tuple[float, int]] = {}
    if not rescan:
        for doc in progress.find({"source": source}, {"item": 1, "mtime": 1, "size": 1}):
            seen[doc["item"]] = (doc.get("mtime"), doc.get("size"))
    skipped = 0
    batch: dict[str, dict] = {}

    def store() -> None:
        ingestor.flush()
        _record(progress, source, batch)
        batch.clear()

    deadline = time.monotonic() + duration if duration else None
    try:
        while True:
            for path in scan(root):
                stat = path.stat()
                key = (stat.st_mtime, stat.st_size)
                rel = path.relative_to(root).as_posix()
                if seen.get(rel) == key:
                    skipped += 1
                    continue
                seen[rel] = key
                ingest_file(ingestor, path)
                batch[rel] = {"mtime": stat.st_mtime, "size": stat.st_size}
                if len(batch) >= ingestor.batch_size:
                    store()
            store()
            logger.info("%s", ingestor.stats.line())
            if not watch or (deadline and time.monotonic() >= deadline):
                break
            time.sleep(poll_seconds)
    except KeyboardInterrupt:
        store()
    return {**ingestor.stats.summary(), "skipped_files": skipped}


def ingest_video(ingestor: Ingestor, url: str, *, fps: float = 1.0, max_frames: int | None = None,
                 start: datetime | None = None, rescan: bool = False) -> dict:
    """Sample a video file or RTSP stream at ``fps`` and store the frames as JPEG.

    A video file resumes after the last frame index recorded as stored (same file, same fps)."""
    import cv2

    cap = cv2.VideoCapture(url)
    if not cap.isOpened():
        raise OSError(f"cannot open video {url}")
    is_file = Path(url).exists()
    if start is None:
        # A file's frames get deterministic timestamps (mtime + position) so a re-run is idempotent.
        start = _file_ts(Path(url)) if is_file else datetime.now(timezone.utc)
    source_fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    step = max(int(round(source_fps / fps)), 1) if source_fps > 0 else 1
    ingestor.auto_flush = False
    progress = source = item = None
    resume_after = -1
    if is_file:
        progress = _progress(ingestor)
        stat = Path(url).stat()
        source, item = f"video:{Path(url).resolve()}", f"{stat.st_mtime}:{stat.st_size}:{step}"
        if not rescan:
            done = progress.find_one({"source": source, "item": item}, {"frame_index": 1})
            resume_after = done["frame_index"] if done else -1
    index = taken = 0
    last_taken = -1

    def store() -> None:
        ingestor.flush()
        if progress is not None and last_taken > resume_after:
            _record(progress, source, {item: {"frame_index": last_taken}})

    try:
        while max_frames is None or taken < max_frames:
            if index <= resume_after:  # stored by an earlier run: skip without decoding
                if not cap.grab():
                    break
                index += 1
                continue
            ok, frame = cap.read()
            if not ok:
                break
            if index % step == 0:
                pos_ms = cap.get(cv2.CAP_PROP_POS_MSEC) if is_file else None
                ts = start + timedelta(milliseconds=pos_ms) if pos_ms is not None else datetime.now(timezone.utc)
                ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
                if ok:
                    ingestor.add_image(buf.tobytes(), ts=ts, source={"kind": "video", "url": redact_uri(url), "frame_index": index})
                    taken += 1
                    last_taken = index
                    if ingestor.pending >= ingestor.batch_size:
                        store()
            index += 1
    except KeyboardInterrupt:
        pass
    finally:
        cap.release()
        store()
    logger.info("%s", ingestor.stats.line())
    return {**ingestor.stats.summary(), "resumed_after_frame": resume_after}
