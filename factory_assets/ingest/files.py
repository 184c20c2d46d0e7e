"""Folder and video/RTSP ingestion, resuming where a crashed run stopped.

Progress lives in MongoDB (``ingest_progress``), written only after the frames it
covers are stored: one document per ingested file (folder), one per video file
(the last stored frame index). A run after a crash skips what is recorded and
redoes at most the one batch that was in flight, which the frame identity index
makes a counted duplicate, never a second document. ``rescan=True`` ignores it.
RTSP streams are live: there is nothing to resume.

A MongoDB outage does not end a run: each batch (and its progress) is retried with
backoff until it is stored (transient errors only, as the MQTT ingester does). A live
stream (``rtsp://``, ``http(s)://``) that drops is reopened with backoff; a video file
that ends ends the run. URLs are shown without their credentials (``redact_url``).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from factory_assets.ingest.service import Ingestor, retry_store, storable_text
from factory_assets.vocabulary.messages import redact_url

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
PROGRESS_COLLECTION = "ingest_progress"
LIVE_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://")
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0

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


def _store_retrying(ingestor: Ingestor, store, stop: threading.Event | None, what: str) -> bool:
    """Run ``store`` until it succeeds, retrying while MongoDB is down; False when stopped first."""
    def failed(exc):
        ingestor.stats.store_failures += 1

    return retry_store(store, stop=stop, on_failure=failed, pending=lambda: ingestor.pending, what=what)


def _file_ts(path: Path, mtime: float | None = None) -> datetime:
    # The file's modification time is the best capture time a folder gives us,
    # and it is stable, so re-ingesting a folder stores nothing twice.
    return datetime.fromtimestamp(path.stat().st_mtime if mtime is None else mtime, tz=timezone.utc)


def ingest_file(ingestor: Ingestor, path: Path, mtime: float | None = None) -> bool:
    """Queue one image file; False when it is bad (quarantined) or gone (deleted since the scan)."""
    source = {"kind": "dir", "path": storable_text(str(path))}  # a name that is not UTF-8 is escaped
    try:
        data = path.read_bytes()
        ts = _file_ts(path, mtime)
    except FileNotFoundError:
        logger.info("skipped %s: deleted since the folder was scanned", source["path"])
        return False
    except OSError as exc:
        ingestor.reject("unreadable_file", f"cannot read {path}: {exc}", source, None)
        return False
    return ingestor.add_image(data, ts=ts, source=source, raw=data)


def scan(root: Path) -> list[Path]:
    """The image files under ``root``, sorted. A folder deleted while it is walked is skipped
    (``os.walk`` ignores the error); ``rglob`` raised FileNotFoundError."""
    found = []
    for folder, _, names in os.walk(root):
        found.extend(Path(folder) / name for name in names if Path(name).suffix.lower() in IMAGE_SUFFIXES)
    return sorted(p for p in found if p.is_file())


def ingest_dir(ingestor: Ingestor, root: Path, *, watch: bool = False, poll_seconds: float = 1.0,
               duration: float | None = None, rescan: bool = False,
               stop: threading.Event | None = None) -> dict:
    """Ingest the images under ``root``; files recorded as ingested (same mtime and size) are skipped.

    ``watch`` polls for new files until ``duration`` passed or ``stop`` is set."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    stop = stop or threading.Event()
    ingestor.auto_flush = False  # we flush, then record the progress of exactly what was stored
    progress = _progress(ingestor)
    source = f"dir:{storable_text(str(root.resolve()))}"
    seen: dict[str, tuple[float, int]] = {}
    if not rescan:
        for doc in progress.find({"source": source}, {"item": 1, "mtime": 1, "size": 1}):
            seen[doc["item"]] = (doc.get("mtime"), doc.get("size"))
    skipped = 0
    batch: dict[str, dict] = {}

    def write() -> None:
        ingestor.flush()
        _record(progress, source, batch)
        batch.clear()

    def store() -> bool:
        return _store_retrying(ingestor, write, stop, "store")

    deadline = time.monotonic() + duration if duration else None
    try:
        while not stop.is_set():
            for path in scan(root):
                if stop.is_set():
                    break
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    logger.info("skipped %s: deleted since the folder was scanned", storable_text(str(path)))
                    continue
                key = (stat.st_mtime, stat.st_size)
                rel = storable_text(path.relative_to(root).as_posix())
                if seen.get(rel) == key:
                    skipped += 1
                    continue
                if not ingest_file(ingestor, path, stat.st_mtime) and not path.exists():
                    continue  # gone before it was read: not recorded, read if it comes back
                seen[rel] = key
                batch[rel] = {"mtime": stat.st_mtime, "size": stat.st_size}
                if len(batch) >= ingestor.batch_size and not store():
                    break
            if not store():
                break
            logger.info("%s", ingestor.stats.line())
            if not watch or (deadline and time.monotonic() >= deadline):
                break
            stop.wait(poll_seconds)
    except KeyboardInterrupt:
        _store_once(ingestor, write)
    return {**ingestor.stats.summary(), "skipped_files": skipped}


def _store_once(ingestor: Ingestor, write) -> None:
    """Interrupted: one last attempt; what is not stored is not recorded either, so it is read again."""
    try:
        write()
    except Exception as exc:  # noqa: BLE001 - stopping anyway
        logger.warning("interrupted with %d records not stored (%s: %s)", ingestor.pending, type(exc).__name__,
                       str(exc)[:200])


def is_live(url: str, frame_count: float | None = None) -> bool:
    """A stream that has no end (a camera), as opposed to a video file: RTSP always; HTTP(S)
    when the stream declares no frame count (an MJPEG camera), not a clip served over HTTP."""
    lowered = url.lower()
    if lowered.startswith(("rtsp://", "rtsps://")):
        return True
    return lowered.startswith(LIVE_SCHEMES) and (frame_count is None or frame_count <= 0)


def ingest_video(ingestor: Ingestor, url: str, *, fps: float = 1.0, max_frames: int | None = None,
                 start: datetime | None = None, rescan: bool = False, stop: threading.Event | None = None,
                 reconnect_min_s: float = RECONNECT_MIN_S, reconnect_max_s: float = RECONNECT_MAX_S,
                 live: bool | None = None) -> dict:
    """Sample a video file or RTSP stream at ``fps`` and store the frames as JPEG.

    A video file resumes after the last frame index recorded as stored (same file, same fps).
    A live stream (``is_live``, or ``live=True``) that stops delivering frames is reopened, waiting
    ``reconnect_min_s`` doubling to ``reconnect_max_s`` between attempts, until ``max_frames``
    were taken or ``stop`` is set."""
    import cv2

    shown = redact_url(url)
    cap = cv2.VideoCapture(url)
    if not cap.isOpened():
        raise OSError(f"cannot open video {shown}")
    stop = stop or threading.Event()
    if live is None:
        live = is_live(url, cap.get(cv2.CAP_PROP_FRAME_COUNT))
    is_file = not live and Path(url).exists()
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
        source, item = f"video:{storable_text(str(Path(url).resolve()))}", f"{stat.st_mtime}:{stat.st_size}:{step}"
        if not rescan:
            done = progress.find_one({"source": source, "item": item}, {"frame_index": 1})
            resume_after = done["frame_index"] if done else -1
    index = taken = 0
    last_taken = -1
    reconnects = 0

    def write() -> None:
        ingestor.flush()
        if progress is not None and last_taken > resume_after:
            _record(progress, source, {item: {"frame_index": last_taken}})

    def store() -> bool:
        return _store_retrying(ingestor, write, stop, "store")

    def reopen():
        """The live stream dropped: store what we have, then reopen it with backoff (None when stopped)."""
        nonlocal reconnects
        cap.release()
        store()
        attempt = 0
        while not stop.is_set():
            delay = min(reconnect_min_s * 2 ** attempt, reconnect_max_s)
            logger.warning("live stream %s dropped; reopening in %.1f s", shown, delay)
            if stop.wait(delay):
                return None
            again = cv2.VideoCapture(url)
            if again.isOpened():
                reconnects += 1
                logger.info("live stream %s reopened", shown)
                return again
            again.release()
            attempt += 1
        return None

    try:
        while (max_frames is None or taken < max_frames) and not stop.is_set():
            if index <= resume_after:  # stored by an earlier run: skip without decoding
                if not cap.grab():
                    break
                index += 1
                continue
            ok, frame = cap.read()
            if not ok:
                if not live:
                    break  # the end of a video file
                cap = reopen()
                if cap is None:
                    break
                continue
            if index % step == 0:
                pos_ms = cap.get(cv2.CAP_PROP_POS_MSEC) if is_file else None
                ts = start + timedelta(milliseconds=pos_ms) if pos_ms is not None else datetime.now(timezone.utc)
                ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
                if ok:
                    ingestor.add_image(buf.tobytes(), ts=ts,
                                       source={"kind": "video", "url": storable_text(shown), "frame_index": index})
                    taken += 1
                    last_taken = index
                    if ingestor.pending >= ingestor.batch_size and not store():
                        break
            index += 1
    except KeyboardInterrupt:
        _store_once(ingestor, write)
    except Exception:
        _store_once(ingestor, write)  # keep what was read before the failure, then report it
        raise
    else:
        store()
    finally:
        if cap is not None:
            cap.release()
    logger.info("%s", ingestor.stats.line())
    return {**ingestor.stats.summary(), "resumed_after_frame": resume_after, "reconnects": reconnects}
