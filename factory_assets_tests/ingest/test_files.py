import os
import shutil
import subprocess
import sys

import cv2
import numpy as np

from factory_assets.ingest.files import ingest_dir, ingest_video
from factory_assets.ingest.service import Ingestor
from factory_assets_tests.helpers import jpeg_bytes, png_bytes


def test_a_folder_is_ingested_recursively_and_a_second_run_adds_nothing(fdb, tmp_path):
    (tmp_path / "day1").mkdir()
    (tmp_path / "a.jpeg").write_bytes(jpeg_bytes(seed=1))
    (tmp_path / "day1" / "b.png").write_bytes(png_bytes())
    (tmp_path / "day1" / "broken.jpg").write_bytes(jpeg_bytes(seed=2)[:500])
    (tmp_path / "notes.txt").write_text("not an image")
    first = ingest_dir(Ingestor(fdb, camera_id="folder"), tmp_path, log=lambda *_: None)
    second = ingest_dir(Ingestor(fdb, camera_id="folder"), tmp_path, log=lambda *_: None)
    assert (first["frames"], first["quarantined"]) == (2, 1)
    assert (second["frames"], second["duplicates"]) == (0, 2)
    assert fdb.frames.count_documents({}) == 2
    q = fdb.quarantine.find_one()
    assert q["reason"] == "truncated_image" and q["source"]["path"].endswith("broken.jpg")


def test_watch_mode_picks_up_files_added_later(fdb, tmp_path):
    import threading

    (tmp_path / "first.jpg").write_bytes(jpeg_bytes(seed=1))
    timer = threading.Timer(0.6, lambda: (tmp_path / "later.jpg").write_bytes(jpeg_bytes(seed=3)))
    timer.start()
    summary = ingest_dir(Ingestor(fdb), tmp_path, watch=True, poll_seconds=0.2, duration=2.0, log=lambda *_: None)
    assert summary["frames"] == 2


def test_a_video_file_is_sampled_at_the_requested_fps_idempotently(fdb, tmp_path):
    path = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (320, 240))
    for i in range(30):  # 3 s at 10 fps
        writer.write(np.full((240, 320, 3), (i * 8) % 255, np.uint8))
    writer.release()
    summary = ingest_video(Ingestor(fdb, camera_id="video"), path, fps=2.0, log=lambda *_: None)
    again = ingest_video(Ingestor(fdb, camera_id="video"), path, fps=2.0, log=lambda *_: None)
    assert summary["frames"] == 6
    assert again["frames"] == 0 and again["duplicates"] == 6
    doc = fdb.frames.find_one(sort=[("seq", 1)])
    assert doc["source"]["kind"] == "video" and (doc["width"], doc["height"]) == (320, 240)


def test_the_cli_ingests_a_folder_and_prints_a_summary(fdb, tmp_path):
    (tmp_path / "x.jpg").write_bytes(jpeg_bytes(seed=5))
    out = subprocess.run([sys.executable, "-m", "factory_assets.cli", "ingest", "dir", str(tmp_path)],
                         capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert out.returncode == 0, out.stderr
    assert '"frames": 1' in out.stdout
    assert fdb.frames.count_documents({"camera_id": "folder"}) == 1
