"""The fleet's remaining hot paths cost per factory what arrived, not the fleet or the history:
factory discovery reads the ``factories`` collection, a factory's first-model readiness and its
labels are read factory first (explained on the real server), ``twin show`` names the factory's
own deployment and ``twin_state`` shows the fleet as a bounded table."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest

from factory_assets.defs.models.resources import EndpointResource
from factory_assets.defs.resources import MongoResource
from factory_assets.storage.indexes import ensure_indexes
from factory_assets.storage.mongo import FactoryDB
from factory_assets_tests.defs.fleet import instance_with
from factory_assets_tests.storage.test_hot_paths import (assert_fleet_ready, explained,  # noqa: F401 (recorded_fdb: a fixture)
                                                         recorded_fdb, simulated_fleet)

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=timezone.utc)
FLEET = ["factory-1", "factory-2", "factory-3"]


def reads(fdb, recorder, call):
    """``call()``'s result and the documents its reads examined, by collection (every read checked
    to lead with factory_id on an index starting with it, or to be a fleet-wide read on purpose)."""
    recorder.clear()
    recorder.recording.set()
    result = call()
    recorder.recording.clear()
    assert_fleet_ready(fdb, recorder.commands)
    out: dict = {}
    for c in recorder.commands:
        coll, _, ex = explained(fdb, c, "executionStats")
        out[coll] = out.get(coll, 0) + ex["executionStats"]["totalDocsExamined"]
    return result, out


def fleet_behind_others(client, name: str, others: int, start: datetime = T0) -> FactoryDB:
    """A database with ``others`` other factories' older frames and stock reports (a fleet with a
    history), then the three simulated factories' last minutes, all stored by the ingester."""
    from factory_assets.ingest.service import Ingestor
    from factory_assets_tests.storage.test_factories import camera_message, stock_message

    fdb = FactoryDB(client[name])
    ensure_indexes(fdb)
    ingestor = Ingestor(fdb)
    for k in range(others):
        for i in range(20):
            received = start - timedelta(hours=2) + timedelta(seconds=i)
            ingestor.handle_mqtt("i/cam", camera_message(i), {"kind": "test"}, received_at=received,
                                 factory_id=f"other-{k}")
            ingestor.handle_mqtt("f/i/stock", stock_message(i), {"kind": "test"}, received_at=received,
                                 factory_id=f"other-{k}")
    ingestor.flush()
    simulated_fleet(fdb, n=3, seconds=30, start=start)
    return fdb


def test_factory_discovery_reads_the_factories_collection_on_its_first_tick_not_the_frames(recorded_fdb, mongo_uri,
                                                                                          database_name):
    from factory_assets.defs.fleet import factory_discovery_sensor

    fdb, recorder = recorded_fdb
    simulated_fleet(fdb, n=3, seconds=2)
    resources = {"mongo": MongoResource(uri=mongo_uri, database=database_name)}
    result = factory_discovery_sensor(dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(),
                                                              resources=resources))
    assert [r.partition_keys for r in result.dynamic_partitions_requests] == [FLEET]
    from factory_assets.defs.fleet import factories_in_database

    ids, examined = reads(fdb, recorder, lambda: factories_in_database(fdb))
    assert ids == set(FLEET)
    # one small document per factory (and, once per process, whether the collection must be built)
    assert examined["factories"] == 3 and set(examined) <= {"factories", "counters"}


def test_a_factorys_readiness_for_its_first_model_reads_the_same_whatever_the_rest_of_the_fleet(recorded_fdb):
    """executionStats: factory-2's readiness examines the same documents with 0 or 12 other
    factories (and their history) in the database, each read factory first."""
    from factory_assets.twin.drift import bootstrap_readiness

    base, recorder = recorded_fdb
    client = base.db.client
    costs, found = [], []
    for others in (0, 12):
        name = f"{base.db.name}_{others}"
        fdb = fleet_behind_others(client, name, others)
        try:
            readiness, examined = reads(fdb, recorder, lambda: bootstrap_readiness(fdb, factory_id="factory-2"))
            found.append(readiness)
            costs.append(examined)
        finally:
            client.drop_database(name)
    assert costs[0] == costs[1] and found[0] == found[1]  # its own messages and frames, not the fleet's


def test_the_bootstrap_sensor_asks_each_factory_that_sent_frames_for_itself(fdb, mongo_uri, database_name):
    from factory_assets.defs.twin.sensors import RetrainWindow
    from factory_assets.defs.twin.sensors import bootstrap_model_sensor

    simulated_fleet(fdb, n=3, seconds=4)
    resources = {"mongo": MongoResource(uri=mongo_uri, database=database_name),
                 "endpoint": EndpointResource(url="http://127.0.0.1:9"), "retrain_window": RetrainWindow()}
    with dg.build_sensor_context(resources=resources, instance=instance_with(*FLEET)) as ctx:
        result = bootstrap_model_sensor(ctx)
    assert not result.run_requests
    assert [f"{f}: waiting for data" in result.skip_reason.skip_message for f in FLEET] == [True] * 3


def test_labels_carry_their_frames_factory_and_camera_and_a_factorys_labels_are_its_own_index_range(recorded_fdb):
    from factory_assets.datasets.autolabel import auto_label
    from factory_assets.datasets.labels import effective_labels

    base, recorder = recorded_fdb
    client = base.db.client
    costs, labelled = [], []
    for others in (0, 12):
        name = f"{base.db.name}_labels_{others}"
        fdb = fleet_behind_others(client, name, others, start=T0 + timedelta(hours=3))
        try:
            if others:  # the other factories' labels, in the same day
                auto_label(fdb, T0, T0 + timedelta(days=1), settle_s=0.5, margin_s=0.25)
            for fid in FLEET:
                auto_label(fdb, T0, T0 + timedelta(days=1), settle_s=0.5, margin_s=0.25, factory_id=fid)
            docs = list(fdb.labels.find({}, {"factory_id": 1, "camera_id": 1, "frame_id": 1}))
            frames = {f["_id"]: f for f in fdb.frames.find({}, {"factory_id": 1, "camera_id": 1})}
            assert docs and all((d["factory_id"], d["camera_id"]) == (frames[d["frame_id"]]["factory_id"],
                                                                      frames[d["frame_id"]]["camera_id"])
                                for d in docs)
            mine, examined = reads(fdb, recorder, lambda: effective_labels(
                fdb, T0, T0 + timedelta(days=1), factory_id="factory-2", camera_id="txt-cam"))
            labelled.append(sorted(str(d["frame_id"]) for d in mine))
            assert mine and {frames[d["frame_id"]]["factory_id"] for d in mine} == {"factory-2"}
            costs.append(examined)
        finally:
            client.drop_database(name)
    assert costs[0] == costs[1] == {"labels": len(labelled[0])}  # the factory's labels, not the fleet's


def test_labels_stored_before_they_carried_a_factory_are_given_it_once_through_their_frames(fdb):
    from factory_assets.datasets.autolabel import auto_label
    from factory_assets.datasets.labels import effective_labels

    simulated_fleet(fdb, n=2, seconds=30, start=T0)
    auto_label(fdb, T0, T0 + timedelta(days=1), settle_s=0.5, margin_s=0.25)
    total = fdb.labels.count_documents({"factory_id": "factory-2"})
    fdb.labels.update_many({}, {"$unset": {"factory_id": "", "camera_id": ""}})  # as an older version wrote them
    mine = effective_labels(fdb, T0, T0 + timedelta(days=1), factory_id="factory-2")
    assert len(mine) == total > 0 and {d["factory_id"] for d in mine} == {"factory-2"}
    assert fdb.labels.count_documents({"factory_id": "factory-2", "camera_id": "txt-cam"}) == total
    # every label of the range was given its factory (factory-1's too): the next read is an index range
    assert fdb.labels.count_documents({"factory_id": None}) == 0
    assert fdb.labels.count_documents({"factory_id": "factory-1"}) == fdb.labels.count_documents({}) - total


def test_twin_show_names_the_factorys_own_deployment_else_the_endpoints_model(fdb, mongo_uri, database_name,
                                                                              capsys):
    from factory_assets.cli import main
    from factory_assets.storage.models import deploy_model, register_external_model, set_checks, set_endpoint_version

    fdb.twin.insert_one({"_id": "factory-2", "version": 3})
    register_external_model(fdb, "v-fleet", dataset_version="d", code_version="c", trainer="test")
    set_checks(fdb, "v-fleet", True, {})
    set_endpoint_version(fdb, "factory-stock", "v-fleet")
    assert main(["twin", "show", "--factory", "factory-2"]) == 0
    assert json.loads(capsys.readouterr().out)["models"] == {"factory-stock": {"model_version": "v-fleet",
                                                                               "status": "Updating"}}
    register_external_model(fdb, "v-2", dataset_version="d", code_version="c", trainer="test",
                            fields={"factory_id": "factory-2", "camera_id": "cam-1"})
    set_checks(fdb, "v-2", True, {})
    deploy_model(fdb, "factory-2", "cam-1", "v-2", endpoint="factory-stock")
    assert main(["twin", "show", "--factory", "factory-2"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["_id"] == "factory-2" and list(shown["models"]) == ["factory-stock/factory-2/cam-1"]
    assert shown["models"]["factory-stock/factory-2/cam-1"]["model_version"] == "v-2"


def test_twin_live_follows_the_deployments_of_the_endpoint_it_is_given():
    import argparse

    from factory_assets.cli import twin

    parser = argparse.ArgumentParser()
    twin.register(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["twin", "live"]).endpoint == "factory-stock"
    assert parser.parse_args(["twin", "live", "--endpoint", "line-b"]).endpoint == "line-b"


@pytest.fixture
def fleet_server(mongo_uri, database_name):
    from factory_assets.serving.server import build_server

    srv = build_server("127.0.0.1", 0, uri=mongo_uri, database=database_name, registry=True).start()
    yield srv
    srv.stop()


def test_twin_state_shows_the_fifty_most_recently_updated_factories_as_a_table(fdb, mongo_uri, database_name,
                                                                               fleet_server):
    from factory_assets.defs.twin.assets import twin_state

    now = datetime.now(timezone.utc)
    fdb.twin.insert_many([{"_id": f"factory-{k}", "version": k, "updated_at": now - timedelta(minutes=k),
                           "observed": {"model_version": f"m{k}", "blue": {"present": True},
                                        "red": {"present": k % 2 == 0}, "white": {"present": False}},
                           "reported": {"present": {"blue": True, "red": False, "white": False}}}
                          for k in range(2, 62)])
    resources = {"mongo": MongoResource(uri=mongo_uri, database=database_name),
                 "endpoint": EndpointResource(url=fleet_server.url)}
    md = dg.materialize([twin_state], resources=resources).asset_materializations_for_node("twin_state")[0].metadata
    rows = [r.data for r in md["factories"].value.records]
    assert [r["factory"] for r in rows] == [f"factory-{k}" for k in range(2, 52)]  # newest first, 50 of 60
    assert rows[0] == {"factory": "factory-2", "version": 2, "in_stock": "blue+red", "model": "m2",
                       "updated": rows[0]["updated"]} and rows[1]["in_stock"] == "blue"
    assert md["factories_total"].value == 60
