"""Every run the platform requests names the factory whose data it works on: the tag the run
queue's per-factory limit counts (docs/scaling-out.md)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest

from factory_assets.defs.models.resources import EndpointResource
from factory_assets.defs.pools import FACTORY_TAG, FLEET, factory_tags
from factory_assets.defs.resources import MongoResource
from factory_assets.defs.twin.jobs import retrain_job, stock_inference_job, twin_refresh_job
from factory_assets.defs.twin.sensors import new_frames_sensor
from factory_assets.storage.frames import build_frame, insert_frames
from factory_assets.storage.models import register_model, report_served, set_checks, set_endpoint_version
from factory_assets_tests.helpers import jpeg_bytes

DAY = datetime(2026, 11, 20, 9, 0, tzinfo=timezone.utc)


def _frame(ts: datetime, factory_id: str, seed: int) -> dict:
    return build_frame(jpeg_bytes(seed=seed), ts=ts, camera_id="cam-1", factory_id=factory_id,
                       content_type="image/jpeg", width=320, height=240, source={"kind": "test"}, received_at=ts)


def test_one_factory_is_its_own_tag_and_several_are_the_fleet():
    assert factory_tags(["factory-2", "factory-2"]) == {FACTORY_TAG: "factory-2"}
    assert factory_tags(["factory-1", "factory-3"]) == {FACTORY_TAG: FLEET}
    assert factory_tags([]) == {FACTORY_TAG: FLEET}


def test_the_platforms_jobs_run_as_the_fleet_unless_a_sensor_names_the_factory():
    for job in (stock_inference_job, twin_refresh_job, retrain_job):
        assert job.run_tags[FACTORY_TAG] == FLEET, job.name


@pytest.mark.slow
def test_an_inference_run_is_one_factorys_day_and_tagged_with_that_factory(fdb, mongo_uri, database_name,
                                                                           model_server, trained_models):
    model = trained_models[0].model
    register_model(fdb, model, dataset_version="d", code_version="c")
    set_checks(fdb, model.version, True, {})
    set_endpoint_version(fdb, "factory-stock", model.version)
    report_served(fdb, "factory-stock", model.version)
    insert_frames(fdb, [_frame(DAY + timedelta(minutes=i), "factory-2", i) for i in range(2)]
                  + [_frame(DAY + timedelta(days=1, minutes=i), f, 10 + i) for i, f in enumerate(("factory-1", "factory-3"))])
    resources = {"mongo": MongoResource(uri=mongo_uri, database=database_name),
                 "endpoint": EndpointResource(url=model_server.url)}
    with dg.build_sensor_context(resources=resources, instance=dg.DagsterInstance.ephemeral()) as ctx:
        result = new_frames_sensor(ctx)
    tags = {r.partition_key: r.tags[FACTORY_TAG] for r in result.run_requests}
    assert tags == {"2026-11-20|factory-2": "factory-2", "2026-11-21|factory-1": "factory-1",
                    "2026-11-21|factory-3": "factory-3"}
