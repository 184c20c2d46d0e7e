"""Folder and video/RTSP ingestion."""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from factory_assets.ingest.service import Ingestor
from factory_assets.storage.mongo import redact_uri

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


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
               duration: float | None = None, log=print) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    seen: dict[Path, tuple[float, int]] = {}
    deadline = time.monotonic() + duration if duration else None
    try:
        while True:
            for path in scan(root):
                stat = path.stat()
                key = (stat.st_mtime, stat.st_size)
                if seen.get(path) == key:
                    continue
                seen[path] = key
                ingest_file(ingestor, path)
            ingestor.flush()
            log(ingestor.stats.line())
            if not watch or (deadline and time.monotonic() >= deadline):
                break
            time.sleep(poll_seconds)
    except KeyboardInterrupt:
        ingestor.flush()
    return ingestor.stats.summary()


def ingest_video(ingestor: Ingestor, url: str, *, fps: float = 1.0, max_frames: int | None = None,
                 start: datetime | None = None, log=print) -> dict:
    """Sample a video file or RTSP stream at ``fps`` and store the frames as JPEG."""
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
    index = taken = 0
    try:
        while max_frames is None or taken < max_frames:
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
            index += 1
    except KeyboardInterrupt:
        pass
    finally:
        cap.release()
        ingestor.flush()
    log(ingestor.stats.line())
    return ingestor.stats.summary()
