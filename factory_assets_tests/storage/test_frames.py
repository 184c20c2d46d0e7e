import random
import threading
from datetime import datetime, timedelta, timezone

from factory_assets.storage.frames import (
    FrameSequence,
    assign_missing_seqs,
    build_frame,
    frame_image_bytes,
    frame_ts,
    insert_frames,
    parse_ts,
    read_frames_after,
)
from factory_assets_tests.helpers import jpeg_bytes

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc)


def frame(i: int, camera: str = "cam-1") -> dict:
    image = jpeg_bytes(seed=i, size=(32, 24))
    return build_frame(image, ts=T0 + timedelta(milliseconds=i), camera_id=camera, factory_id="f",
                       content_type="image/jpeg", width=32, height=24, source={"kind": "test"})


def drain(fdb, cursor: int, sequence=None) -> tuple[list[dict], int]:
    got = []
    while True:
        page = read_frames_after(fdb, cursor, limit=7, sequence=sequence)
        got += page.frames
        cursor = page.cursor
        if not page.has_more:
            return got, cursor


def test_duplicate_delivery_of_the_same_frame_stores_one_document(fdb):
    first = insert_frames(fdb, [frame(1)])
    again = insert_frames(fdb, [frame(1), frame(2)])
    assert (first.inserted, again.inserted, again.duplicates) == (1, 1, 1)
    assert fdb.frames.count_documents({}) == 2


def test_cursor_does_not_pass_a_block_allocated_earlier_but_inserted_later(fdb):
    # The race the seq protocol exists for: A allocates first, B commits first.
    slow, fast = FrameSequence(fdb), FrameSequence(fdb)
    slow_alloc = slow.allocate(1)
    insert_frames(fdb, [frame(2)], fast)  # gets seq 2, visible before seq 1
    page = read_frames_after(fdb, 0)
    assert page.frames == [] and page.cursor == 0  # seq 2 is held back, not skipped past 1
    doc = frame(1)
    doc["seq"] = slow_alloc.lo
    fdb.frames.insert_one(doc)
    assert slow.release(slow_alloc)
    got, cursor = drain(fdb, page.cursor)
    assert [d["seq"] for d in got] == [1, 2] and cursor == 2


def test_a_block_whose_writer_died_is_reaped_after_its_lease_and_late_frames_are_resequenced(fdb):
    stuck = FrameSequence(fdb, lease_seconds=0.0)
    alloc = stuck.allocate(1)
    insert_frames(fdb, [frame(5)])
    assert read_frames_after(fdb, 0).frames == []  # within the lease: held back
    reaper = FrameSequence(fdb, lease_seconds=0.0)
    got, cursor = drain(fdb, 0, reaper)  # lease over: the stuck block is reaped, seq 2 is read
    assert [d["seq"] for d in got] == [2]
    # The "dead" writer was only slow: its frame must still reach the reader.
    doc = frame(7)
    doc["seq"] = alloc.lo
    fdb.frames.insert_one(doc)
    assert stuck.release(alloc) is False  # the lease was reaped meanwhile
    from factory_assets.storage.frames import resequence

    resequence(fdb, [doc["_id"]], stuck)
    late, _ = drain(fdb, cursor)
    assert [d["_id"] for d in late] == [doc["_id"]]


def test_two_concurrent_ingesters_and_a_cursor_reader_miss_nothing_and_read_nothing_twice(fdb):
    n_per_writer = 150
    stop = threading.Event()
    seen: list = []

    class SlowToInsert(FrameSequence):
        """Pauses between allocating a block and inserting it: widens the window a reader must not pass."""

        def __init__(self, rnd):
            super().__init__(fdb)
            self.rnd = rnd

        def allocate(self, n):
            alloc = super().allocate(n)
            if self.rnd.random() < 0.3:
                threading.Event().wait(self.rnd.random() * 0.01)
            return alloc

    def writer(camera: str, seed: int):
        rnd = random.Random(seed)
        seq = SlowToInsert(rnd)
        i = 0
        while i < n_per_writer:
            batch = [frame(i + k, camera) for k in range(min(rnd.randint(1, 6), n_per_writer - i))]
            insert_frames(fdb, batch, seq)
            i += len(batch)

    def reader():
        cursor = 0
        while True:
            done = stop.is_set()
            page = read_frames_after(fdb, cursor, limit=rnd_limit.randint(1, 20))
            seen.extend(d["_id"] for d in page.frames)
            cursor = page.cursor
            if done and not page.has_more:
                return

    rnd_limit = random.Random(7)
    writers = [threading.Thread(target=writer, args=(f"cam-{k}", k)) for k in range(2)]
    r = threading.Thread(target=reader)
    r.start()
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    r.join(timeout=60)
    stored = {d["_id"] for d in fdb.frames.find({}, {"_id": 1})}
    assert len(stored) == 2 * n_per_writer
    assert len(seen) == len(set(seen)), "a frame was read twice"
    assert set(seen) == stored, f"{len(stored - set(seen))} frames were skipped"


def test_concurrent_ingester_processes_with_a_reader_miss_nothing(fdb, mongo_uri, database_name, tmp_path):
    # Separate processes mint their own ObjectIds and allocate concurrently.
    import subprocess
    import sys

    script = tmp_path / "writer.py"
    script.write_text(
        "import sys\n"
        "from datetime import datetime, timedelta, timezone\n"
        "from factory_assets.storage.mongo import connect\n"
        "from factory_assets.storage.frames import build_frame, insert_frames, FrameSequence\n"
        "fdb = connect()\nseq = FrameSequence(fdb)\ncam = sys.argv[1]\n"
        "t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)\n"
        "for i in range(0, 200, 4):\n"
        "    docs = [build_frame(bytes([k % 256]) * 10 + cam.encode() + str(i + k).encode(), ts=t0 + timedelta(milliseconds=i + k),"
        " camera_id=cam, factory_id='f', content_type='image/jpeg', width=1, height=1, source={}) for k in range(4)]\n"
        "    insert_frames(fdb, docs, seq)\n")
    procs = [subprocess.Popen([sys.executable, str(script), f"cam-{k}"]) for k in range(2)]
    seen, cursor = [], 0
    while any(p.poll() is None for p in procs):
        page = read_frames_after(fdb, cursor, limit=13)
        seen += [d["_id"] for d in page.frames]
        cursor = page.cursor
    assert all(p.wait() == 0 for p in procs)
    rest, _ = drain(fdb, cursor)
    seen += [d["_id"] for d in rest]
    assert len(seen) == len(set(seen)) == 400
    assert set(seen) == {d["_id"] for d in fdb.frames.find({}, {"_id": 1})}


def test_original_project_documents_are_read_and_sequenced(fdb):
    # The original stored base64 data URLs and ts as an ISO string.
    import base64

    image = jpeg_bytes(seed=3, size=(32, 24))
    fdb.frames.insert_one({"ts": "2026-11-20T08:00:00.000Z",
                           "data": "data:image/jpeg;base64," + base64.b64encode(image).decode()})
    assert assign_missing_seqs(fdb) == 1
    assert assign_missing_seqs(fdb) == 0
    got, _ = drain(fdb, 0)
    assert len(got) == 1
    assert frame_image_bytes(got[0]) == image
    assert frame_ts(got[0]) == datetime(2026, 11, 20, 8, tzinfo=timezone.utc)


def test_parse_ts_accepts_iso_strings_dates_and_epoch_numbers():
    expected = datetime(2026, 11, 23, 10, 0, 0, 123000, tzinfo=timezone.utc)
    assert parse_ts("2026-11-23T10:00:00.123Z") == expected
    assert parse_ts("2026-11-23T11:00:00.123+01:00") == expected
    assert parse_ts(expected.timestamp() * 1000) == expected
    assert parse_ts(expected.replace(tzinfo=None)) == expected
