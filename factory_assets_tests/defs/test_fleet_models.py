"""Three simulated factories whose cameras look at their racks from different poses, end to end
through the platform's own sensors and jobs (real MongoDB, one Dagster instance and one set of
definitions, the fleet's one inference server hosting the registry's models by name, one live
reader): each is discovered, bootstrapped and gets a model of its own, the third while the others
are already live, with nothing restarted; the live reader infers each factory's frames with its own
model and each twin follows its own rack; deploying, retraining or rolling back one factory leaves
the others exactly as they were."""
from __future__ import annotations

from datetime import timedelta

import pytest

from factory_assets_tests.defs.simulated_fleet import (EP, TXT_CAM, Daemon, SimulatedFactory, bootstrap,  # noqa: F401
                                                       fleet_server, platform_definitions, platform_resources,
                                                       run_fleet, slot_accuracy, twin_follows)

SEED = 4  # factory-2 and factory-3 see their racks shifted, zoomed and turned (simulation.fleet); every rack varies
FRAME_EVERY_S = 2  # each camera's period: enough frames to learn a rack from, half the cost of one a second


def deployments(fdb, factory_ids) -> dict:
    from factory_assets.storage.models import get_deployment

    return {f: get_deployment(fdb, f, TXT_CAM, endpoint=EP) for f in factory_ids}


def test_three_factories_with_different_camera_poses_each_get_their_own_model_and_a_correct_twin_the_third_arriving_mid_run(  # noqa: E501
        fdb, mongo_uri, database_name, fleet_server, tmp_path, monkeypatch):  # noqa: F811
    from factory_assets.serving.models import load_model, model_name
    from factory_assets.serving.predictor import HttpEndpointPredictor, UnknownModel
    from factory_assets.simulation.fleet import fleet_plan
    from factory_assets.storage.models import WrongOwner, deploy_model, get_deployment, rollback_deployment
    from factory_assets.twin.live import LiveTwinUpdater
    from factory_assets.twin.state import SLOTS
    from factory_assets.vocabulary.clock import utcnow

    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    start = utcnow().replace(microsecond=0) - timedelta(hours=2)  # inside the retraining window (the last 7 days)
    plan = fleet_plan(3, seed=SEED)
    assert plan[0].pose.is_reference and len({m.pose for m in plan}) == 3
    first, second = (SimulatedFactory(fdb, m, start, FRAME_EVERY_S) for m in plan[:2])
    resources = platform_resources(mongo_uri, database_name, fleet_server.url, tmp_path)
    defs = platform_definitions(resources)
    daemon = Daemon(defs, resources)  # one instance, one set of definitions, for the whole test

    # factory-1 and factory-2: discovered, then each bootstrapped by its own runs, tagged with its factory
    versions = {f: cams[TXT_CAM] for f, cams in bootstrap(daemon, [first, second], {"factory-1", "factory-2"}).items()}
    assert daemon.instance.get_dynamic_partitions("factory") == ["factory-1", "factory-2"]

    # the one live reader, from here on (it has followed the frames up to now)
    fdb.counters.update_one({"_id": "cursor:twin-live"}, {"$set": {"seq": fdb.frames.count_documents({})}},
                            upsert=True)
    predictor = HttpEndpointPredictor(fleet_server.url)
    updater = LiveTwinUpdater(fdb, predictor, change_stream=False)
    updater.router.refresh_s = 0.0  # deployments read on every page: the test need not wait out their refresh
    live_since = first.start + timedelta(seconds=first.t)
    run_fleet([first, second], 30, updater)

    # mid-run, factory-3 starts sending frames: the live reader passes them (no model of its own yet, and no
    # other factory's model infers them) while the others stay live
    third = SimulatedFactory(fdb, plan[2], start + timedelta(seconds=first.t), FRAME_EVERY_S)
    before_third = deployments(fdb, ["factory-1", "factory-2"])
    run_fleet([first, second, third], 30, updater)
    assert fdb.inferences.count_documents({"factory_id": "factory-3"}) == 0 and updater.stats.no_model > 0
    # the same sensors' next ticks register and bootstrap factory-3 alone (the others' cameras are off
    # meanwhile: fewer frames to simulate); its deployment leaves theirs as they were
    arrived = third.t
    versions["factory-3"] = bootstrap(daemon, [third], {"factory-3"}, updater)["factory-3"][TXT_CAM]
    for f in (first, second):
        f.idle(third.t - arrived)
    assert daemon.instance.get_dynamic_partitions("factory") == ["factory-1", "factory-2", "factory-3"]
    assert deployments(fdb, ["factory-1", "factory-2"]) == before_third
    third_live_since = third.start + timedelta(seconds=third.t)
    run_fleet([first, second, third], 60, updater)

    assert len(set(versions.values())) == 3
    for factory_id, version in versions.items():  # each model learnt its own factory's frames only
        model = fdb.models.find_one({"_id": version})
        assert (model["factory_id"], model["camera_id"]) == (factory_id, TXT_CAM)
        assert fdb.datasets.find_one({"_id": model["dataset_version"]})["factory_id"] == factory_id
    # a model of one factory is never used for another: refused by the registry and by the server
    factories = {f.factory_id: f for f in (first, second, third)}
    for owner, version in versions.items():
        for other in sorted(factories.keys() - {owner}):
            with pytest.raises(WrongOwner):
                deploy_model(fdb, other, TXT_CAM, version, endpoint=EP)
            image = fdb.frames.find_one({"factory_id": other})["image"]
            with pytest.raises(UnknownModel):
                predictor.predict(bytes(image), target_model=model_name(other, TXT_CAM, version))
    # the one live reader inferred each factory's frames with its own model; each twin follows its own rack
    for f in factories.values():
        accuracy, used = slot_accuracy(fdb, f, third_live_since if f is third else live_since)
        assert used == {versions[f.factory_id]} and accuracy >= 0.97, (f.factory_id, accuracy, used)
        twin_follows(fdb, f, [versions[f.factory_id]])
    # why a camera needs its own model: factory-1's model reads factory-2's picture worse than factory-2's own
    own_model, other_model = load_model(fdb, versions["factory-2"]), load_model(fdb, versions["factory-1"])
    hits = {"own": 0, "other": 0}
    for frame in fdb.frames.find({"factory_id": "factory-2", "ts": {"$gt": third_live_since}}):
        shown = second.truth[frame["ts"]]
        for key, model in (("own", own_model), ("other", other_model)):
            seen = {s: v.get("type") for s, v in (model.predict_details(bytes(frame["image"]))["slots"] or {}).items()}
            hits[key] += sum(seen.get(s) == shown.get(s) for s in SLOTS)
    assert hits["other"] < hits["own"], hits

    # retraining and deploying factory-1 again, then rolling it back, leaves factory-2 and factory-3 as they were
    others = deployments(fdb, ["factory-2", "factory-3"])
    retrained = defs.resolve_job_def("model_job").execute_in_process(
        instance=daemon.instance, partition_key="factory-1", tags={"factory": "factory-1"}, run_config={
            "ops": {"stock_model": {"config": {"retrain_same_dataset": True}}},
            "resources": {"model_policy": {"config": {"min_per_label_accuracy": 0.8, "seed": 1}}}})
    again = retrained.asset_materializations_for_node("model_endpoint")[0].metadata["model_version"].value
    assert again != versions["factory-1"]
    assert get_deployment(fdb, "factory-1", TXT_CAM, endpoint=EP)["previous_versions"] == [versions["factory-1"]]
    assert deployments(fdb, ["factory-2", "factory-3"]) == others
    rollback_deployment(fdb, "factory-1", TXT_CAM, endpoint=EP)
    assert get_deployment(fdb, "factory-1", TXT_CAM, endpoint=EP)["model_version"] == versions["factory-1"]
    assert deployments(fdb, ["factory-2", "factory-3"]) == others
    for other in ("factory-2", "factory-3"):
        assert {d.get("model_version") for d in fdb.endpoints.find({"factory_id": other})} == {versions[other]}
    rolled_since = first.start + timedelta(seconds=first.t)
    run_fleet(list(factories.values()), 10, updater)
    for f in factories.values():
        assert slot_accuracy(fdb, f, rolled_since)[1] == {versions[f.factory_id]}
        twin_follows(fdb, f, [versions[f.factory_id]])
    predictor.close()
