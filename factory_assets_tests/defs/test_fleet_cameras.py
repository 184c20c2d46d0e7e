"""A factory with two cameras on its rack at two poses, end to end through the platform's own
sensors and jobs (real MongoDB, a Dagster instance, the fleet's inference server, the live
reader): the controller's camera sends ``i/cam`` as the TXT does (no camera id: the ingester's
``txt-cam``), the second names itself (``"camera_id": "cam-2"``, docs/fleet.md "Several cameras in
one factory"). The factory's one bootstrap gives each camera a dataset and a model of its own, and
each camera's frames are inferred with its own camera's model. A camera added to a factory that
already has its model is bootstrapped by itself, leaving the first camera's model and deployment
as they were."""
from __future__ import annotations

from datetime import timedelta

import pytest

from factory_assets_tests.defs.simulated_fleet import (EP, TXT_CAM, Daemon, SimulatedFactory, bootstrap,  # noqa: F401
                                                       bootstrap_camera, fleet_server, platform_definitions,
                                                       platform_resources, run_fleet, slot_accuracy, twin_follows)

SEED = 4  # factory-1's second camera: shifted, zoomed and turned from the controller's (simulation.fleet)
FRAME_EVERY_S = 2


def test_a_factory_with_two_cameras_at_different_poses_gets_a_model_per_camera_each_inferring_its_own_cameras_frames(
        fdb, mongo_uri, database_name, fleet_server, tmp_path, monkeypatch):  # noqa: F811
    from factory_assets.serving.models import model_name
    from factory_assets.serving.predictor import HttpEndpointPredictor, UnknownModel
    from factory_assets.simulation.fleet import fleet_plan
    from factory_assets.storage.models import WrongOwner, deploy_model
    from factory_assets.twin.live import LiveTwinUpdater
    from factory_assets.vocabulary.clock import utcnow

    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    [member] = fleet_plan(1, seed=SEED, cameras=2)
    [second_camera] = member.extra_cameras
    assert second_camera.camera_id == "cam-2" and second_camera.pose != member.pose
    factory = SimulatedFactory(fdb, member, utcnow().replace(microsecond=0) - timedelta(hours=2), FRAME_EVERY_S)
    resources = platform_resources(mongo_uri, database_name, fleet_server.url, tmp_path)
    daemon = Daemon(platform_definitions(resources), resources)

    # one bootstrap of the factory: a dataset and a model per camera, each learnt from that camera's frames
    versions = bootstrap(daemon, [factory], {"factory-1"})["factory-1"]
    assert versions.keys() == {TXT_CAM, "cam-2"} and len(set(versions.values())) == 2
    assert sorted(fdb.frames.distinct("camera_id", {"factory_id": "factory-1"})) == ["cam-2", TXT_CAM]
    for camera_id, version in versions.items():
        model = fdb.models.find_one({"_id": version})
        assert (model["factory_id"], model["camera_id"]) == ("factory-1", camera_id)
        dataset = fdb.datasets.find_one({"_id": model["dataset_version"]})
        assert (dataset["factory_id"], dataset["camera_id"]) == ("factory-1", camera_id)
    # one camera's model is never used for the other: refused by the registry and by the server
    predictor = HttpEndpointPredictor(fleet_server.url)
    for camera_id, other in ((TXT_CAM, "cam-2"), ("cam-2", TXT_CAM)):
        with pytest.raises(WrongOwner):
            deploy_model(fdb, "factory-1", other, versions[camera_id], endpoint=EP)
        image = fdb.frames.find_one({"factory_id": "factory-1", "camera_id": other})["image"]
        with pytest.raises(UnknownModel):
            predictor.predict(bytes(image), target_model=model_name("factory-1", other, versions[camera_id]))

    # the live reader, from here on: each camera's frames by its own camera's model, and the twin follows the rack
    fdb.counters.update_one({"_id": "cursor:twin-live"}, {"$set": {"seq": fdb.frames.count_documents({})}},
                            upsert=True)
    updater = LiveTwinUpdater(fdb, predictor, change_stream=False)
    live_since = factory.start + timedelta(seconds=factory.t)
    run_fleet([factory], 60, updater)
    for camera_id, version in versions.items():
        accuracy, used = slot_accuracy(fdb, factory, live_since, camera_id)
        assert used == {version} and accuracy >= 0.97, (camera_id, accuracy, used)
    live_frames = fdb.frames.count_documents({"factory_id": "factory-1", "ts": {"$gt": live_since}})
    assert fdb.inferences.count_documents({"factory_id": "factory-1", "frame_ts": {"$gt": live_since}}) \
        == live_frames == 2 * 29  # every frame of both cameras after the first, once
    twin_follows(fdb, factory, versions.values())
    predictor.close()


def test_a_camera_added_to_a_factory_that_has_its_model_gets_its_own_first_model_leaving_the_first_cameras_as_it_was(
        fdb, mongo_uri, database_name, fleet_server, tmp_path, monkeypatch):  # noqa: F811
    from factory_assets.serving.predictor import HttpEndpointPredictor
    from factory_assets.simulation.fleet import fleet_plan
    from factory_assets.storage.factories import factories
    from factory_assets.storage.models import get_deployment
    from factory_assets.twin.drift import controller_disagreement
    from factory_assets.twin.live import LiveTwinUpdater
    from factory_assets.vocabulary.clock import utcnow

    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    [member] = fleet_plan(1, seed=SEED, cameras=2)
    factory = SimulatedFactory(fdb, member, utcnow().replace(microsecond=0) - timedelta(hours=2), FRAME_EVERY_S)
    factory.sending = 1  # the controller's camera only, until the factory has its model
    resources = platform_resources(mongo_uri, database_name, fleet_server.url, tmp_path)
    daemon = Daemon(platform_definitions(resources), resources)
    first = bootstrap(daemon, [factory], {"factory-1"})["factory-1"]
    assert first.keys() == {TXT_CAM}
    as_deployed = get_deployment(fdb, "factory-1", TXT_CAM, endpoint=EP)
    txt_models = [m["_id"] for m in fdb.models.find({"factory_id": "factory-1", "camera_id": TXT_CAM})]
    txt_datasets = [d["_id"] for d in fdb.datasets.find({"factory_id": "factory-1", "camera_id": TXT_CAM})]

    # a second camera at another pose starts sending: no restart, the same sensors register and bootstrap it
    factory.sending = 2
    request, rows, waited = bootstrap_camera(daemon, [factory], "factory-1", "cam-2")
    assert sorted(factories(fdb).find_one({"_id": "factory-1"})["cameras"]) == ["cam-2", TXT_CAM]
    assert waited and all("factory-1: waiting for data of camera cam-2" in w for w in waited)  # its own frames
    assert request.run_key.startswith("bootstrap:factory-1:cam-2:")  # not deduplicated against txt-cam's
    [row] = rows  # the run trained and deployed cam-2's model only
    second = row["model_version"]
    assert (row["camera_id"], row["previous_version"]) == ("cam-2", None) and second != first[TXT_CAM]
    model = fdb.models.find_one({"_id": second})
    assert (model["factory_id"], model["camera_id"]) == ("factory-1", "cam-2")
    assert fdb.datasets.find_one({"_id": model["dataset_version"]})["camera_id"] == "cam-2"
    assert get_deployment(fdb, "factory-1", "cam-2", endpoint=EP)["model_version"] == second
    # the first camera: no dataset built, no model trained, its deployment document as it was, to the byte
    assert get_deployment(fdb, "factory-1", TXT_CAM, endpoint=EP) == as_deployed
    assert [m["_id"] for m in fdb.models.find({"factory_id": "factory-1", "camera_id": TXT_CAM})] == txt_models
    assert [d["_id"] for d in fdb.datasets.find({"factory_id": "factory-1", "camera_id": TXT_CAM})] == txt_datasets

    # live: each camera's frames by its own model, the new camera's included; drift looks at each camera's own
    fdb.counters.update_one({"_id": "cursor:twin-live"}, {"$set": {"seq": fdb.frames.count_documents({})}},
                            upsert=True)
    predictor = HttpEndpointPredictor(fleet_server.url)
    live_since = factory.start + timedelta(seconds=factory.t)
    run_fleet([factory], 30, LiveTwinUpdater(fdb, predictor, change_stream=False))
    for camera_id, version in ((TXT_CAM, first[TXT_CAM]), ("cam-2", second)):
        accuracy, used = slot_accuracy(fdb, factory, live_since, camera_id)
        assert used == {version} and accuracy >= 0.97, (camera_id, accuracy, used)
        drift = controller_disagreement(fdb, version, factory_id="factory-1")
        assert drift.compared > 0 and drift.share < 0.05, (camera_id, drift)
    twin_follows(fdb, factory, (first[TXT_CAM], second))
    predictor.close()
