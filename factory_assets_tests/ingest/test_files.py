import json
import os
import subprocess
import sys

import cv2
import numpy as np

from factory_assets.ingest.files import ingest_dir, ingest_video
from factory_assets.ingest.service import Ingestor
from factory_assets_tests.helpers import jpeg_bytes, png_bytes


def test_a_folder_is_ingested_recursively_and_a_second_run_reads_nothing_again(fdb, tmp_path):
    (tmp_path / "day1").mkdir()
    (tmp_path / "a.jpeg").write_bytes(jpeg_bytes(seed=1))
    (tmp_path / "day1" / "b.png").write_bytes(png_bytes())
    (tmp_path / "day1" / "broken.jpg").write_bytes(jpeg_bytes(seed=2)[:500])
    (tmp_path / "notes.txt").write_text("not an image")
    first = ingest_dir(Ingestor(fdb, camera_id="folder"), tmp_path)
    second = ingest_dir(Ingestor(fdb, camera_id="folder"), tmp_path)
    assert (first["frames"], first["quarantined"]) == (2, 1)
    assert (second["frames"], second["duplicates"], second["skipped_files"]) == (0, 0, 3)
    rescan = ingest_dir(Ingestor(fdb, camera_id="folder"), tmp_path, rescan=True)
    assert (rescan["frames"], rescan["duplicates"]) == (0, 2)  # re-read, still stored once
    assert fdb.frames.count_documents({}) == 2
    q = fdb.quarantine.find_one()
    assert q["reason"] == "truncated_image" and q["source"]["path"].endswith("broken.jpg")


def test_watch_mode_picks_up_files_added_later(fdb, tmp_path):
    import threading

    (tmp_path / "first.jpg").write_bytes(jpeg_bytes(seed=1))
    timer = threading.Timer(0.6, lambda: (tmp_path / "later.jpg").write_bytes(jpeg_bytes(seed=3)))
    timer.start()
    summary = ingest_dir(Ingestor(fdb), tmp_path, watch=True, poll_seconds=0.2, duration=2.0)
    assert summary["frames"] == 2


def test_a_video_file_is_sampled_at_the_requested_fps_idempotently(fdb, tmp_path):
    path = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (320, 240))
    for i in range(30):  # 3 s at 10 fps
        writer.write(np.full((240, 320, 3), (i * 8) % 255, np.uint8))
    writer.release()
    summary = ingest_video(Ingestor(fdb, camera_id="video"), path, fps=2.0)
    again = ingest_video(Ingestor(fdb, camera_id="video"), path, fps=2.0)
    rescan = ingest_video(Ingestor(fdb, camera_id="video"), path, fps=2.0, rescan=True)
    assert summary["frames"] == 6
    assert again["frames"] == 0 and again["duplicates"] == 0  # resumed after the last stored frame
    assert rescan["frames"] == 0 and rescan["duplicates"] == 6
    doc = fdb.frames.find_one(sort=[("seq", 1)])
    assert doc["source"]["kind"] == "video" and (doc["width"], doc["height"]) == (320, 240)


def test_the_cli_ingests_a_folder_and_prints_a_summary(fdb, tmp_path):
    (tmp_path / "x.jpg").write_bytes(jpeg_bytes(seed=5))
    out = subprocess.run([sys.executable, "-m", "factory_assets.cli", "ingest", "dir", str(tmp_path)],
                         capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert out.returncode == 0, out.stderr
    assert '"frames": 1' in out.stdout
    assert fdb.frames.count_documents({"camera_id": "folder"}) == 1


def test_a_video_file_stopped_part_way_resumes_after_the_last_stored_frame(fdb, tmp_path):
    path = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (320, 240))
    for i in range(30):
        writer.write(np.full((240, 320, 3), (i * 8) % 255, np.uint8))
    writer.release()
    first = ingest_video(Ingestor(fdb, camera_id="video", batch_size=2), path, fps=2.0, max_frames=4)
    rest = ingest_video(Ingestor(fdb, camera_id="video", batch_size=2), path, fps=2.0)
    assert first["frames"] == 4 and rest["frames"] == 2 and rest["duplicates"] == 0
    assert sorted(d["source"]["frame_index"] for d in fdb.frames.find()) == [0, 5, 10, 15, 20, 25]


def test_a_folder_ingest_killed_mid_run_resumes_and_stores_every_file_once(fdb, tmp_path):
    import signal

    from factory_assets.storage.frames import wait_until
    from factory_assets.vocabulary import utcnow

    n = 300
    for i in range(n):
        (tmp_path / f"img{i:04d}.jpg").write_bytes(jpeg_bytes(size=(32, 24), seed=i))
    cmd = [sys.executable, "-m", "factory_assets.cli", "ingest", "dir", str(tmp_path), "--batch-size", "8"]
    # --watch keeps the first run alive until it is killed, however fast it reads the folder
    proc = subprocess.Popen(cmd + ["--watch"], env=dict(os.environ), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: fdb.frames.count_documents({}) >= 24, 60)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    resumed_at = utcnow()
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.split("summary: ", 1)[1])
    assert fdb.frames.count_documents({}) == n
    assert len(fdb.frames.distinct("sha256")) == n
    # counted afterwards: an insert the killed run had already sent may commit after its death
    stored_before = fdb.frames.count_documents({"received_at": {"$lt": resumed_at}})
    assert summary["frames"] == n - stored_before
    assert summary["skipped_files"] >= stored_before - 8  # at most the batch in flight is read again
