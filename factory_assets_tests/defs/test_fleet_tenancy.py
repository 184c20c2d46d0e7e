"""Every factory its own tenant in Dagster, with real MongoDB, a real inference server hosting the
registry's models by name and real Dagster instances: factories discovered as dynamic partitions,
runs requested per factory with its tag, and a sensor tick whose reads follow what arrived,
not the number of factories (counted at 50)."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest
from pymongo import monitoring

from factory_assets.defs.fleet import factory_discovery_sensor
from factory_assets.defs.models.resources import EndpointResource
from factory_assets.defs.resources import MongoResource
from factory_assets.storage.frames import build_frame, insert_frames
from factory_assets.storage.inferences import build_inference, record_inference
from factory_assets.storage.models import deploy_model, register_external_model, set_checks
from factory_assets_tests.defs.fleet import instance_with
from factory_assets_tests.helpers import jpeg_bytes

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=timezone.utc)
EP = "factory-stock"


def frames(factory_id: str, n: int, start: datetime, camera_id: str = "cam-1", seed: int = 0) -> list[dict]:
    return [build_frame(jpeg_bytes(seed=seed + i, size=(32, 24)), ts=start + timedelta(seconds=i), camera_id=camera_id,
                        factory_id=factory_id, content_type="image/jpeg", width=32, height=24,
                        source={"kind": "test"}, received_at=start + timedelta(seconds=i)) for i in range(n)]


def apply(instance, result) -> None:
    """What the daemon does with a tick's dynamic partition requests."""
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))


def discover(resources, instance, cursor=None):
    context = dg.build_sensor_context(cursor=cursor, instance=instance, resources=resources)
    return factory_discovery_sensor(context)


def test_a_new_factory_appearing_in_mongodb_is_registered_as_a_partition_by_the_sensor(fdb, mongo_uri,
                                                                                         database_name, capsys):
    resources = {"mongo": MongoResource(uri=mongo_uri, database=database_name)}
    instance = dg.DagsterInstance.ephemeral()
    insert_frames(fdb, frames("factory-1", 3, T0))
    first = discover(resources, instance)
    assert [r.partition_keys for r in first.dynamic_partitions_requests] == [["factory-1"]]
    apply(instance, first)
    idle = discover(resources, instance, first.cursor)
    assert not idle.dynamic_partitions_requests and "No new factory" in idle.skip_reason.skip_message
    # mid-run, a second factory's first frames (and a factory id no partition or model name can hold)
    insert_frames(fdb, frames("factory-1", 2, T0 + timedelta(minutes=1)) + frames("factory-2", 2, T0, seed=50)
                  + frames("bad--id", 1, T0, seed=90))
    second = discover(resources, instance, idle.cursor)
    assert [r.partition_keys for r in second.dynamic_partitions_requests] == [["factory-2"]]
    assert "not registered" in capsys.readouterr().err.split("'bad--id'")[0]  # the tick's log says which and why
    apply(instance, second)
    assert instance.get_dynamic_partitions("factory") == ["factory-1", "factory-2"]
    # a fresh cursor (a new deployment of the sensor) finds both, and registers nothing twice
    assert not discover(resources, instance).dynamic_partitions_requests


def _own(fdb, factory_id: str, version: str, camera_id: str = "cam-1") -> str:
    register_external_model(fdb, version, dataset_version="d", code_version="c", trainer="test",
                            fields={"factory_id": factory_id, "camera_id": camera_id})
    set_checks(fdb, version, True, {})
    deploy_model(fdb, factory_id, camera_id, version, endpoint=EP)
    return version


def _inferred(fdb, docs: list[dict], version: str) -> None:
    for f in fdb.frames.find({"_id": {"$in": [d["_id"] for d in docs]}}):
        record_inference(fdb, build_inference(f, probabilities={"blue": 0.9, "red": 0.1, "white": 0.1},
                                              thresholds={"blue": 0.5, "red": 0.5, "white": 0.5},
                                              model_version=version, latency_ms=1.0, source="live"))


def test_new_frames_are_inferred_per_factory_with_its_tag_and_a_factory_without_a_model_waits_for_its_own(
        fdb, mongo_uri, database_name):
    from factory_assets.defs.twin.sensors import load_frames_cursor, new_frames_sensor

    _own(fdb, "factory-1", "v1")
    _own(fdb, "factory-2", "v2")
    insert_frames(fdb, frames("factory-1", 2, T0) + frames("factory-3", 2, T0, seed=30)
                  + frames("factory-2", 2, T0 + timedelta(days=1), seed=20))
    resources = {"mongo": MongoResource(uri=mongo_uri, database=database_name),
                 "endpoint": EndpointResource(url="http://127.0.0.1:9")}  # the sensor only names models
    instance = instance_with("factory-1", "factory-2", "factory-3")

    def tick(cursor=None):
        with dg.build_sensor_context(cursor=cursor, resources=resources, instance=instance) as ctx:
            return new_frames_sensor(ctx)

    first = tick()
    requests = [(r.partition_key, r.run_key, r.tags["factory"]) for r in first.run_requests]
    assert requests == [("2026-11-20|factory-1", "infer:factory-1:v1:2026-11-20:1", "factory-1"),
                        ("2026-11-21|factory-2", "infer:factory-2:v2:2026-11-21:5", "factory-2")]
    assert [(r.partition_key, r.run_key) for r in tick().run_requests] == [(k, rk) for k, rk, _ in requests]
    # factory-3's frames are neither inferred by another factory's model nor hold the others back
    assert load_frames_cursor(first.cursor)["owed"] == {"factory-3|cam-1": "2026-11-20"}
    _inferred(fdb, list(fdb.frames.find({"factory_id": {"$ne": "factory-3"}})), "unused")
    _inferred(fdb, list(fdb.frames.find({"factory_id": "factory-1"})), "v1")
    _inferred(fdb, list(fdb.frames.find({"factory_id": "factory-2"})), "v2")
    settled = tick(first.cursor)
    assert load_frames_cursor(settled.cursor)["seq"] == 6 and not settled.run_requests
    # once factory-3's camera has its own model, its days since the first frame it passed are requested
    _own(fdb, "factory-3", "v3")
    owed = tick(settled.cursor)
    from factory_assets.vocabulary.clock import day_key, utcnow

    assert owed.run_requests[0].run_key == "infer-owed:factory-3:cam-1:v3:2026-11-20"
    assert {r.tags["factory"] for r in owed.run_requests} == {"factory-3"}
    assert owed.run_requests[-1].partition_key == f"{day_key(utcnow())}|factory-3"
    assert load_frames_cursor(owed.cursor)["owed"] == {}


def test_a_finished_retraining_run_requests_the_model_run_of_each_factory_it_built(tmp_path):
    from factory_assets.defs.partitions import factory_days, factory_partitions
    from factory_assets.defs.twin.sensors import retrained_model_sensor

    # a stand-in with retrain_job's name and partitions: the sensor reads only the finished run's tags
    @dg.asset(name="labeled_images", partitions_def=factory_days, backfill_policy=dg.BackfillPolicy.single_run())
    def days_of_factory(context) -> None:
        return None

    @dg.asset(name="stock_model", partitions_def=factory_partitions)
    def model_of_factory(context) -> None:
        return None

    job = dg.define_asset_job("retrain_job", selection=["labeled_images"])
    defs = dg.Definitions(assets=[days_of_factory, model_of_factory], jobs=[job])
    instance = instance_with("factory-1", "factory-7")
    result = defs.resolve_job_def("retrain_job").execute_in_process(instance=instance, tags={
        "dagster/asset_partition_range_start": "2026-11-20|factory-7",
        "dagster/asset_partition_range_end": "2026-11-26|factory-7"})
    context = dg.build_run_status_sensor_context(sensor_name="retrained_model_sensor", dagster_instance=instance,
                                                 dagster_run=result.dagster_run,
                                                 dagster_event=result.get_run_success_event())
    [request] = retrained_model_sensor(context)
    assert request.partition_key == "factory-7" and request.tags["factory"] == "factory-7"
    assert request.run_key == f"model:factory-7:{result.run_id}"
    assert "2026-11-20..2026-11-26" in request.tags["factory/reason"]


def test_dagster_runs_a_single_run_backfill_over_factories_and_days_as_documented_in_docs_dagster():
    """Pins what Dagster (1.13) does with a backfill of a single_run factory x day asset: ranges
    grouped by the dimension with fewer selected keys (docs/dagster.md, "Backfills")."""
    from dagster._core.definitions.assets.graph.asset_graph import AssetGraph
    from dagster._core.definitions.automation_tick_evaluation_context import \
        build_run_requests_with_backfill_policies
    from dagster._core.definitions.events import AssetKeyPartitionKey
    from dagster._core.definitions.partitions.context import partition_loading_context

    from factory_assets.defs.datasets.assets import labeled_images
    from factory_assets.defs.partitions import factory_day_key

    instance = instance_with(*[f"factory-{k}" for k in range(1, 8)])
    graph = AssetGraph.from_assets([labeled_images])

    def runs(factories, days):
        keys = [AssetKeyPartitionKey(labeled_images.key, factory_day_key(f, d)) for f in factories for d in days]
        with partition_loading_context(dynamic_partitions_store=instance):
            requests = build_run_requests_with_backfill_policies(keys, graph, instance)
        return sorted((r.tags["dagster/asset_partition_range_start"], r.tags["dagster/asset_partition_range_end"])
                      for r in requests)

    week = [f"2026-11-{d:02d}" for d in range(20, 27)]
    # "retrain factory-7 on the last 7 days": one run
    assert runs(["factory-7"], week) == [("2026-11-20|factory-7", "2026-11-26|factory-7")]
    # 3 factories x 7 days: one run per factory
    assert len(runs(["factory-1", "factory-2", "factory-3"], week)) == 3
    # 5 factories x 2 days: grouped by day, each run spanning the factories (the assets handle it)
    assert runs([f"factory-{k}" for k in range(1, 6)], week[:2]) == [
        ("2026-11-20|factory-1", "2026-11-20|factory-5"), ("2026-11-21|factory-1", "2026-11-21|factory-5")]


# --- one tick's cost: what arrived, not the number of factories (nor the history) --------------------------

class ReadCounter(monitoring.CommandListener):
    """The commands the counting thread sends while counting, and the documents their replies carry."""

    def __init__(self):
        self.thread: int | None = None
        self.commands: list[str] = []
        self.documents = 0

    def started(self, event):
        if threading.get_ident() == self.thread:
            self.commands.append(event.command_name)

    def succeeded(self, event):
        if threading.get_ident() != self.thread:
            return
        reply = event.reply
        cursor = reply.get("cursor") or {}
        self.documents += len(cursor.get("firstBatch") or cursor.get("nextBatch") or ())
        self.documents += len(reply.get("values") or ())  # distinct

    def failed(self, event):
        pass

    def count(self, fn):
        self.commands, self.documents, self.thread = [], 0, threading.get_ident()
        try:
            fn()
        finally:
            self.thread = None
        return {"commands": sorted(self.commands), "documents": self.documents}


COUNTER = ReadCounter()
monitoring.register(COUNTER)  # applies to clients made from here on: the test's own URI below makes one


def _sensor_reads(mongo_uri: str, database: str, fdb, n_factories: int) -> dict:
    """A world of ``n_factories`` factories, each with history, a deployed model and a partition;
    then the same arrivals (70 frames of factory-1, inferred live) and one tick of each sensor,
    counted."""
    from factory_assets.defs.camera.arrival import raw_frames_sensor
    from factory_assets.defs.twin.sensors import (RetrainWindow, bootstrap_model_sensor, new_frames_sensor,
                                                  twin_live_sensor)

    factories = [f"factory-{k}" for k in range(1, n_factories + 1)]
    for k, factory_id in enumerate(factories):
        history = frames(factory_id, 3, T0 - timedelta(days=3), seed=100 * k)
        insert_frames(fdb, history)
        _inferred(fdb, history, _own(fdb, factory_id, f"v{k + 1}"))
        # each factory's twin, its changes of a day ago (reported by the first tick)
        fdb.twin.insert_one({"_id": factory_id, "version": 1, "updated_at": T0 - timedelta(days=1)})
        fdb.twin_history.insert_one({"factory_id": factory_id, "version": 1, "at": T0 - timedelta(days=1),
                                     "kind": "reported", "changed": ["A1"]})
    instance = instance_with(*factories)
    # the counting client: its own URI, so a client made after the listener was registered
    uri = mongo_uri + ("&" if "?" in mongo_uri else "?") + "connectTimeoutMS=20001"
    resources = {"mongo": MongoResource(uri=uri, database=database),
                 "endpoint": EndpointResource(url="http://127.0.0.1:9"), "retrain_window": RetrainWindow()}
    sensors = {"discovery": factory_discovery_sensor, "raw_frames": raw_frames_sensor,
               "new_frames": new_frames_sensor, "bootstrap": bootstrap_model_sensor, "twin_live": twin_live_sensor}
    cursors: dict = {}

    def tick(name):
        with dg.build_sensor_context(cursor=cursors.get(name), instance=instance, resources=resources) as ctx:
            result = sensors[name](ctx)
        cursors[name] = getattr(result, "cursor", None) or cursors.get(name)
        return result

    for name in sensors:  # the first ticks (their cursors start here), not counted
        tick(name)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    arrivals = frames("factory-1", 70, now - timedelta(minutes=5), seed=7)
    insert_frames(fdb, arrivals)
    _inferred(fdb, arrivals, "v1")
    fdb.twin.update_one({"_id": "factory-1"}, {"$set": {"version": 2, "updated_at": now}})  # factory-1's twin moved
    fdb.twin_history.insert_one({"factory_id": "factory-1", "version": 2, "at": now - timedelta(hours=1),
                                 "kind": "reported", "changed": ["A2"]})
    return {name: COUNTER.count(lambda n=name: tick(n)) for name in sensors}


def test_one_sensor_tick_reads_the_same_at_50_registered_factories_as_at_1(fdb, mongo_uri, database_name):
    from factory_assets.storage.mongo import connect, get_client

    one = _sensor_reads(mongo_uri, database_name, fdb, 1)
    other = f"{database_name}_fleet"
    try:
        fleet = _sensor_reads(mongo_uri, other, connect(mongo_uri, other), 50)
    finally:
        get_client(mongo_uri).drop_database(other)
    assert fleet == one, (one, fleet)
    # and it is what arrived that is read: the 70 frames once per sensor that reads frames, not the history
    assert one["new_frames"]["documents"] < 3 * 70 + 20 and one["discovery"]["documents"] <= 3
    assert sum(len(v["commands"]) for v in one.values()) < 40
