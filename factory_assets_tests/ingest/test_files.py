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


def write_clip(path, frames: int = 30) -> str:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (320, 240))
    for i in range(frames):
        writer.write(np.full((240, 320, 3), (i * 8) % 255, np.uint8))
    writer.release()
    return str(path)


def test_an_rtsp_url_that_cannot_be_opened_is_reported_without_its_credentials(fdb):
    import pytest

    with pytest.raises(OSError) as err:  # port 1: connection refused at once
        ingest_video(Ingestor(fdb), "rtsp://admin:s3cret@127.0.0.1:1/live", fps=1.0)
    assert "s3cret" not in str(err.value) and "rtsp://***@127.0.0.1:1/live" in str(err.value)


def test_a_video_file_whose_name_holds_an_at_sign_is_ingested(fdb, tmp_path):
    # the credential redaction used to split any '@' as if the path were a URL, and raised
    path = write_clip(tmp_path / "line@2.avi", frames=10)
    assert ingest_video(Ingestor(fdb, camera_id="video"), path, fps=2.0)["frames"] == 2
    assert fdb.frames.find_one()["source"]["url"] == path


def test_a_file_whose_name_is_not_utf8_is_stored_under_an_escaped_path(fdb, tmp_path):
    # Linux names are bytes; Python shows undecodable ones as lone surrogates, which BSON cannot hold
    name = os.fsencode(tmp_path) + b"/caf\xe9.jpg"
    with open(name, "wb") as f:
        f.write(jpeg_bytes(seed=7))
    (tmp_path / "plain.jpg").write_bytes(jpeg_bytes(seed=8))
    summary = ingest_dir(Ingestor(fdb, camera_id="folder"), tmp_path)
    again = ingest_dir(Ingestor(fdb, camera_id="folder"), tmp_path)
    assert (summary["frames"], summary["quarantined"]) == (2, 0)
    assert again["skipped_files"] == 2  # its progress was recorded too
    assert fdb.frames.count_documents({"source.path": {"$regex": r"caf\\udce9\.jpg$"}}) == 1


def test_a_file_deleted_between_the_scan_and_its_reading_is_skipped(fdb, tmp_path):
    for i in range(3):
        (tmp_path / f"img{i}.jpg").write_bytes(jpeg_bytes(seed=i))
    deleted = []

    def delete_the_next_file(stored):
        # runs while the first file's batch is stored: the folder was scanned, img1 not yet looked at
        if not deleted:
            (tmp_path / "img1.jpg").unlink()
            deleted.append("img1.jpg")

    summary = ingest_dir(Ingestor(fdb, batch_size=1, on_stored=delete_the_next_file), tmp_path)
    assert deleted and summary["frames"] == 2 and summary["quarantined"] == 0
    (tmp_path / "img1.jpg").write_bytes(jpeg_bytes(seed=1))  # back again: read by the next run
    assert ingest_dir(Ingestor(fdb), tmp_path)["frames"] == 1


def test_the_folder_watcher_survives_a_mongodb_outage_and_stores_every_file(tmp_path):
    import threading
    import uuid

    from factory_assets.storage.frames import wait_until
    from factory_assets.storage.mongo import connect
    from factory_assets_tests.ingest.test_no_frame_lost import KillableMongo

    mongo = KillableMongo(tmp_path / "mongo").start()
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        (folder / f"a{i}.jpg").write_bytes(jpeg_bytes(size=(64, 48), seed=i))
    try:
        fdb = connect(mongo.uri, f"test_{uuid.uuid4().hex[:12]}")
        ingestor, stop, outcome = Ingestor(fdb, batch_size=2), threading.Event(), {}

        def watch():
            try:
                outcome["summary"] = ingest_dir(ingestor, folder, watch=True, poll_seconds=0.1, stop=stop)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                outcome["error"] = exc

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        # killed once the ingestor counted the first files stored: a kill between a batch's insert and its
        # release would make its retry find those frames as duplicates (stored once, counted as duplicates)
        assert wait_until(lambda: ingestor.stats.frames == 3 and fdb.frames.count_documents({}) == 3, 60)
        mongo.kill()
        for i in range(3, 6):  # arrive while MongoDB is down
            (folder / f"b{i}.jpg").write_bytes(jpeg_bytes(size=(64, 48), seed=i))
        assert wait_until(lambda: "error" in outcome or ingestor.stats.store_failures >= 1, 60)
        assert "error" not in outcome, repr(outcome.get("error"))
        mongo.start()  # same data, same port
        assert wait_until(lambda: fdb.frames.count_documents({}) == 6, 60)
        stop.set()
        watcher.join(60)
        assert not watcher.is_alive() and "error" not in outcome, repr(outcome.get("error"))
        assert outcome["summary"]["frames"] == 6 and outcome["summary"]["store_failures"] >= 1
    finally:
        stop.set()
        mongo.stop()


class ClipServer:
    """A real HTTP server handing out a video clip: a live stream that ends after each clip, so the
    ingester must reconnect (as to a camera that dropped); it counts the connections."""

    def __init__(self, clip_dir):
        import functools
        import http.server
        import threading

        self.requests = 0
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(Handler, directory=str(clip_dir)))
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/clip.avi"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_live_stream_that_drops_is_reopened_and_a_video_file_that_ends_just_ends(fdb, tmp_path):
    clip = write_clip(tmp_path / "clip.avi", frames=10)  # 1 s at 10 fps: 5 frames at 5 fps per pass
    server = ClipServer(tmp_path)
    try:
        # the clip declares its frame count, so only live=True makes it a camera that drops
        summary = ingest_video(Ingestor(fdb, camera_id="live", batch_size=4), server.url, fps=5.0, max_frames=12,
                               live=True)
        assert summary["frames"] == 12 and summary["reconnects"] >= 2 and server.requests >= 3
        assert fdb.frames.count_documents({"camera_id": "live"}) == 12
        assert all(d["source"]["url"] == server.url for d in fdb.frames.find({"camera_id": "live"}, {"source": 1}))
        # a clip served over HTTP is a file that ends, not a stream to reopen for ever
        served = ingest_video(Ingestor(fdb, camera_id="served"), server.url, fps=5.0, max_frames=12)
        assert served["frames"] == 5 and served["reconnects"] == 0
    finally:
        server.close()
    ended = ingest_video(Ingestor(fdb, camera_id="file"), clip, fps=5.0, max_frames=12)
    assert ended["frames"] == 5 and ended["reconnects"] == 0
