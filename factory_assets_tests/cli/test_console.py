"""The status `factory-assets up` shows, read from a real MongoDB."""
from datetime import datetime, timedelta, timezone

from factory_assets.ingest.service import Ingestor
from factory_assets.cli.console import StatusProbe, plain_line, render
from factory_assets_tests.helpers import jpeg_bytes

T0 = datetime(2026, 11, 25, 8, 0, tzinfo=timezone.utc)


def store(fdb, n: int, start: int = 0) -> None:
    ing = Ingestor(fdb)
    for i in range(start, start + n):
        ing.add_image(jpeg_bytes(seed=i, size=(32, 24)), ts=T0 + timedelta(seconds=i), source={"kind": "test"})
    ing.flush()


def test_the_probe_reports_frames_their_rate_quarantine_and_the_deployed_model(fdb, mongo_uri, database_name):
    probe = StatusProbe(mongo_uri, database_name)
    store(fdb, 3)
    first = probe.read(now=100.0)
    assert first.reachable and first.frames == 3 and first.frames_per_second is None  # no rate from one reading
    store(fdb, 10, start=3)
    fdb.quarantine.insert_one({"reason": "malformed_json"})
    fdb.endpoints.insert_one({"name": "factory-stock", "model_version": "abc123", "served_version": "abc123",
                              "status": "InService"})
    second = probe.read(now=105.0)
    assert second.frames == 13 and second.frames_per_second == 2.0 and second.quarantined == 1
    assert (second.model_version, second.endpoint_status) == ("abc123", "InService")
    probe.close()


def test_an_unreachable_database_is_reported_not_raised():
    with StatusProbe("mongodb://127.0.0.1:1/?directConnection=true", "nothing") as probe:
        status = probe.read(now=1.0)
    assert not status.reachable
    assert "MongoDB unreachable" in plain_line([], status)


def test_the_panel_renders_services_health_and_links(fdb, mongo_uri, database_name):
    from rich.console import Console

    store(fdb, 2)
    with StatusProbe(mongo_uri, database_name) as probe:
        status = probe.read(now=1.0)
    console = Console(record=True, width=140)
    console.print(render([], status, {"twin page & API (/docs)": "http://127.0.0.1:8000"}, "/tmp/logs"))
    text = console.export_text()
    assert "frames stored" in text and "http://127.0.0.1:8000" in text and "none yet" in text


def test_the_plain_status_line_shows_the_time_frames_per_second_and_the_last_twin_update(
        fdb, mongo_uri, database_name):
    # what `factory-assets up` prints every 30 s when its output is not a terminal
    store(fdb, 2)
    fdb.twin.insert_one({"_id": "factory-1", "version": 7, "updated_at": T0 - timedelta(seconds=40),
                         "observed": {"present": {"blue": True}}})
    with StatusProbe(mongo_uri, database_name, factory_id="factory-1") as probe:
        probe.read(now=10.0)
        store(fdb, 6, start=2)
        status = probe.read(now=13.0)
    line = plain_line([], status, now=T0)
    assert line.startswith("[up] 2026-11-25T08:00:00Z ")
    assert "frames 8" in line and "frames/s 2.0" in line and "twin v7 updated 40 s ago" in line


def test_up_starts_dagsters_days_at_the_first_stored_frame_or_today(fdb, mongo_uri, database_name):
    from factory_assets.cli.console import first_frame_day

    assert first_frame_day(mongo_uri, database_name, today=T0) == "2026-11-25"  # nothing stored yet
    ing = Ingestor(fdb)
    for day in (3, 1, 2):
        ing.add_image(jpeg_bytes(seed=day, size=(32, 24)), ts=T0 - timedelta(days=day), source={"kind": "test"})
    ing.flush()
    assert first_frame_day(mongo_uri, database_name, today=T0) == "2026-11-22"
    # a database that cannot be reached: today, with a warning, never an exception
    assert first_frame_day("mongodb://127.0.0.1:1/?directConnection=true&serverSelectionTimeoutMS=200",
                           database_name, today=T0) == "2026-11-25"
