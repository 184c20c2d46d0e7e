from datetime import datetime, timezone

import dagster as dg

from factory_assets.defs.camera.assets import raw_frames
from factory_assets.defs.resources import MongoResource
from factory_assets.ingest.service import Ingestor
from factory_assets_tests.defs.fleet import instance_with, key
from factory_assets_tests.helpers import jpeg_bytes


def test_raw_frames_reports_the_factorys_days_frames_cameras_bytes_quarantine_and_a_preview(
        fdb, mongo_uri, database_name):
    from factory_assets.storage.frames import build_frame, insert_frames

    ing = Ingestor(fdb)  # the default factory, factory-1
    day = datetime(2026, 11, 23, tzinfo=timezone.utc)
    for i, cam in enumerate(["cam-1", "cam-1", "cam-2"]):
        ing.add_image(jpeg_bytes(seed=i), ts=day.replace(hour=8 + i), source={"kind": "test"}, camera_id=cam)
    ing.add_image(jpeg_bytes(seed=9), ts=datetime(2026, 11, 24, 1, tzinfo=timezone.utc), source={"kind": "test"})
    ing.flush()
    # an original-format document of the same day (no factory: the default one's), ts as ISO string, counts too
    fdb.frames.insert_one({"ts": "2026-11-23T12:00:00.000Z", "data": "data:image/jpeg;base64,AAAA"})
    # another factory's frame of that day is not factory-1's
    insert_frames(fdb, [build_frame(jpeg_bytes(seed=5), ts=day.replace(hour=9), camera_id="cam-1",
                                    factory_id="factory-2", content_type="image/jpeg", width=320, height=240,
                                    source={"kind": "test"})])
    result = dg.materialize([raw_frames], partition_key=key("factory-1", "2026-11-23"),
                            instance=instance_with("factory-1", "factory-2"),
                            resources={"mongo": MongoResource(uri=mongo_uri, database=database_name)})
    assert result.success
    md = result.asset_materializations_for_node("raw_frames")[0].metadata
    assert md["frames"].value == 4 and md["factory_id"].value == "factory-1"
    assert md["cameras"].value == 3  # cam-1, cam-2 and the original's unnamed camera
    assert datetime.fromtimestamp(md["latest_frame_ts"].value, timezone.utc).date().isoformat() == "2026-11-23"
    assert {r.data["camera"]: r.data["frames"] for r in md["per_camera"].value.records}["cam-1"] == 2
    assert "data:image/png;base64," in md["latest_frame"].value
    assert mongo_uri not in str(md)  # no connection string (credentials) in metadata


def test_raw_frames_of_an_empty_day_succeeds_with_zero_frames(fdb, mongo_uri, database_name):
    result = dg.materialize([raw_frames], partition_key=key("factory-1", "2026-11-20"),
                            instance=instance_with("factory-1"),
                            resources={"mongo": MongoResource(uri=mongo_uri, database=database_name)})
    md = result.asset_materializations_for_node("raw_frames")[0].metadata
    assert md["frames"].value == 0 and "latest_frame" not in md


def _tick(mongo_uri, database_name, cursor=None, instance=None):
    from factory_assets.defs.camera.arrival import raw_frames_sensor

    context = dg.build_sensor_context(cursor=cursor, instance=instance or dg.DagsterInstance.ephemeral(),
                                      resources={"mongo": MongoResource(uri=mongo_uri, database=database_name)})
    return raw_frames_sensor(context)


def _store(fdb, times, received_at=None, factory_id="f"):
    from factory_assets.storage.frames import build_frame, insert_frames

    insert_frames(fdb, [build_frame(jpeg_bytes(seed=i, size=(32, 24)), ts=t, camera_id="cam-1", factory_id=factory_id,
                                    content_type="image/jpeg", width=32, height=24, source={"kind": "test"},
                                    received_at=received_at) for i, t in enumerate(times)])


def test_the_sensor_reports_each_factorys_day_that_received_frames_as_a_materialization_with_its_rate(
        fdb, mongo_uri, database_name):
    from datetime import timedelta

    day = datetime(2026, 11, 23, 8, tzinfo=timezone.utc)
    _store(fdb, [day + timedelta(seconds=s) for s in (0, 0.5, 1, 1.5, 2)])  # 2 frames/s, stored just now
    instance = dg.DagsterInstance.ephemeral()
    first = _tick(mongo_uri, database_name, instance=instance)
    [materialization] = [e for e in first.asset_events if isinstance(e, dg.AssetMaterialization)]
    assert materialization.partition == "2026-11-23|f"
    # the factory it reports on becomes a partition in the same tick
    assert [r.partition_keys for r in first.dynamic_partitions_requests] == [["f"]]
    md = materialization.metadata
    assert (md["frames"].value, md["new_frames"].value, md["frames_per_second"].value) == (5, 5, 2.0)
    assert md["newest_frame_ts"].value == (day + timedelta(seconds=2)).timestamp()
    [check] = [e for e in first.asset_events if isinstance(e, dg.AssetCheckEvaluation)]
    assert check.check_name == "frames_are_arriving" and check.passed
    # frames of the next day and more of this one, and another factory's: one event per factory's day,
    # the day's count carried on
    instance.add_dynamic_partitions("factory", ["f"])  # as the daemon does with the request
    _store(fdb, [day + timedelta(seconds=2.5 + s / 2) for s in range(4)] + [day + timedelta(days=1)])
    _store(fdb, [day + timedelta(seconds=3)], factory_id="g")
    second = _tick(mongo_uri, database_name, cursor=first.cursor, instance=instance)
    by_day = {e.partition: e.metadata for e in second.asset_events}
    assert set(by_day) == {"2026-11-23|f", "2026-11-24|f", "2026-11-23|g"}  # no check event: it still passes
    assert (by_day["2026-11-23|f"]["frames"].value, by_day["2026-11-23|f"]["new_frames"].value) == (9, 4)
    assert by_day["2026-11-23|f"]["frames_per_second"].value == 2.0  # 4 frames in the 2 s after the last newest
    assert by_day["2026-11-23|g"]["frames"].value == 1
    assert [r.partition_keys for r in second.dynamic_partitions_requests] == [["g"]]
    idle = _tick(mongo_uri, database_name, cursor=second.cursor, instance=instance)
    assert not idle.asset_events and "No new frame" in idle.skip_reason.skip_message
    # reported to an instance (as the daemon does), the days are materialized partitions:
    # a launch downstream of those days finds its upstream there
    instance.add_dynamic_partitions("factory", ["g"])
    for event in first.asset_events + second.asset_events:
        instance.report_runless_asset_event(event)
    assert instance.get_materialized_partitions(raw_frames.key) == {"2026-11-23|f", "2026-11-24|f", "2026-11-23|g"}


def test_frames_are_arriving_fails_while_no_frame_is_stored_and_passes_again_when_one_is(
        fdb, mongo_uri, database_name):
    empty = _tick(mongo_uri, database_name)
    [check] = empty.asset_events
    assert not check.passed and "No frame stored yet" in check.description
    _store(fdb, [datetime(2026, 11, 20, 9, tzinfo=timezone.utc)], received_at=datetime(2026, 11, 20, 9, 0, 1,
                                                                                        tzinfo=timezone.utc))
    stale = _tick(mongo_uri, database_name, cursor=empty.cursor)
    assert [e.passed for e in stale.asset_events if isinstance(e, dg.AssetCheckEvaluation)] == []  # still failing
    assert "No frame stored for" in _tick(mongo_uri, database_name).asset_events[-1].description
    _store(fdb, [datetime.now(timezone.utc)])  # the camera is back
    back = _tick(mongo_uri, database_name, cursor=stale.cursor)
    assert [e.passed for e in back.asset_events if isinstance(e, dg.AssetCheckEvaluation)] == [True]
    # the same check, executed from the UI with the day's stock-taking
    from factory_assets.defs.camera.arrival import frames_are_arriving

    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    result = dg.materialize([raw_frames, frames_are_arriving], partition_key=key("f", today), instance=instance_with("f"),
                            resources={"mongo": MongoResource(uri=mongo_uri, database=database_name)})
    assert [e.passed for e in result.get_asset_check_evaluations()] == [True]
