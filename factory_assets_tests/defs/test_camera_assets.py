from datetime import datetime, timezone

import dagster as dg

from factory_assets.defs.camera.assets import raw_frames
from factory_assets.defs.resources import MongoResource
from factory_assets.ingest.service import Ingestor
from factory_assets_tests.helpers import jpeg_bytes


def test_raw_frames_reports_the_days_frames_cameras_bytes_quarantine_and_a_preview(fdb, mongo_uri, database_name):
    ing = Ingestor(fdb)
    day = datetime(2026, 11, 23, tzinfo=timezone.utc)
    for i, cam in enumerate(["cam-1", "cam-1", "cam-2"]):
        ing.add_image(jpeg_bytes(seed=i), ts=day.replace(hour=8 + i), source={"kind": "test"}, camera_id=cam)
    ing.add_image(jpeg_bytes(seed=9), ts=datetime(2026, 11, 24, 1, tzinfo=timezone.utc), source={"kind": "test"})
    ing.flush()
    # an original-format document of the same day, ts as ISO string, counts too
    fdb.frames.insert_one({"ts": "2026-11-23T12:00:00.000Z", "data": "data:image/jpeg;base64,AAAA"})
    result = dg.materialize([raw_frames], partition_key="2026-11-23",
                            resources={"mongo": MongoResource(uri=mongo_uri, database=database_name)})
    assert result.success
    md = result.asset_materializations_for_node("raw_frames")[0].metadata
    assert md["frames"].value == 4
    assert md["cameras"].value == 3  # cam-1, cam-2 and the original's unnamed camera
    assert datetime.fromtimestamp(md["latest_frame_ts"].value, timezone.utc).date().isoformat() == "2026-11-23"
    assert {r.data["camera"]: r.data["frames"] for r in md["per_camera"].value.records}["cam-1"] == 2
    assert "data:image/png;base64," in md["latest_frame"].value
    assert mongo_uri not in str(md)  # no connection string (credentials) in metadata


def test_raw_frames_of_an_empty_day_succeeds_with_zero_frames(fdb, mongo_uri, database_name):
    result = dg.materialize([raw_frames], partition_key="2026-11-20",
                            resources={"mongo": MongoResource(uri=mongo_uri, database=database_name)})
    md = result.asset_materializations_for_node("raw_frames")[0].metadata
    assert md["frames"].value == 0 and "latest_frame" not in md
