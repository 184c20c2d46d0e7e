from factory_assets.serving.models import load_model
from factory_assets.storage.models import (get_endpoint, latest_model, register_external_model, register_model,
                                           rollback_endpoint, set_checks, set_endpoint_version)


def test_a_registered_model_loads_back_byte_identical_from_gridfs(fdb, trained_models):
    model = trained_models[0].model
    register_model(fdb, model, dataset_version="d1", code_version="c1", metrics={"x": 1})
    loaded = load_model(fdb, model.version)
    assert loaded.version == model.version
    assert loaded.to_bytes() == model.to_bytes()


def test_registering_the_same_model_twice_stores_one_artifact(fdb, trained_models):
    model = trained_models[0].model
    register_model(fdb, model, dataset_version="d1", code_version="c1")
    register_model(fdb, model, dataset_version="d1", code_version="c1", metrics={"again": True})
    assert fdb.models.count_documents({}) == 1
    assert fdb.db["model_artifacts.files"].count_documents({}) == 1
    assert fdb.models.find_one()["metrics"] == {"again": True}


def test_latest_model_only_returns_models_that_passed_their_checks(fdb, trained_models):
    a, b = (r.model for r in trained_models)
    register_model(fdb, a, dataset_version="d1", code_version="c")
    set_checks(fdb, a.version, True, {"acc": True})
    register_model(fdb, b, dataset_version="d1", code_version="c")
    set_checks(fdb, b.version, False, {"acc": False})
    assert latest_model(fdb)["version"] == a.version
    assert latest_model(fdb, passed_checks=None)["version"] == b.version


def test_a_model_that_failed_its_checks_is_refused_by_the_endpoint(fdb, trained_models):
    import pytest

    b = trained_models[1].model
    register_model(fdb, b, dataset_version="d1", code_version="c")
    set_checks(fdb, b.version, False, {"acc": False})
    with pytest.raises(ValueError, match="failed its checks"):
        set_endpoint_version(fdb, "ep", b.version)
    assert get_endpoint(fdb, "ep") is None


def test_rollback_returns_to_the_previous_version(fdb, trained_models):
    a, b = (r.model for r in trained_models)
    for m in (a, b):
        register_model(fdb, m, dataset_version="d1", code_version="c")
        set_checks(fdb, m.version, True, {})
    set_endpoint_version(fdb, "ep", a.version)
    set_endpoint_version(fdb, "ep", b.version)
    assert get_endpoint(fdb, "ep")["previous_versions"] == [a.version]
    doc = rollback_endpoint(fdb, "ep")
    assert doc["model_version"] == a.version and doc["rolled_back_from"] == b.version
    assert doc["previous_versions"] == []


def _registered(fdb, versions):
    from factory_assets.storage.models import register_external_model

    for v in versions:
        register_external_model(fdb, v, dataset_version="d", code_version="c", trainer="test")
        set_checks(fdb, v, True, {})


def test_racing_deploys_each_leave_their_version_in_the_rollback_history(fdb):
    # two deploys read the same current version; both used to push it and one version vanished
    import threading

    _registered(fdb, ["v0"] + [f"v{i}" for i in range(1, 7)])
    set_endpoint_version(fdb, "ep", "v0")
    barrier = threading.Barrier(6)

    def deploy(v):
        barrier.wait()
        set_endpoint_version(fdb, "ep", v)

    threads = [threading.Thread(target=deploy, args=(f"v{i}",)) for i in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    doc = get_endpoint(fdb, "ep")
    history = doc["previous_versions"] + [doc["model_version"]]
    assert history[0] == "v0"
    assert sorted(history) == [f"v{i}" for i in range(7)]  # every version once, none twice


def test_a_deploy_that_finishes_after_a_newer_one_does_not_mark_the_endpoint_in_service(fdb):
    from factory_assets.storage.models import mark_in_service, report_served

    _registered(fdb, ["old", "new"])
    set_endpoint_version(fdb, "ep", "old")
    set_endpoint_version(fdb, "ep", "new")  # a newer deploy re-points the endpoint
    doc = mark_in_service(fdb, "ep", "old")  # the slow deploy of "old" finishes late
    assert doc["model_version"] == "new" and doc["status"] == "Updating"
    report_served(fdb, "ep", "old")  # the server still serves the old one
    assert get_endpoint(fdb, "ep")["status"] == "Updating"
    report_served(fdb, "ep", "new")
    assert get_endpoint(fdb, "ep")["status"] == "InService"
    assert get_endpoint(fdb, "ep")["served_version"] == "new"


# --- a fleet: models keyed by factory and camera, a deployment per factory's camera (docs/fleet.md) ---

def _owned(fdb, versions_by_owner: dict) -> None:
    for (factory_id, camera_id), versions in versions_by_owner.items():
        for v in versions:
            register_external_model(fdb, v, dataset_version="d", code_version="c", trainer="test",
                                    fields={"factory_id": factory_id, "camera_id": camera_id})
            set_checks(fdb, v, True, {})


def test_a_model_keeps_the_factory_and_camera_it_was_registered_for(fdb, trained_models):
    import pytest

    from factory_assets.storage.models import WrongOwner, assign_model

    model = trained_models[0].model
    doc = register_model(fdb, model, dataset_version="d", code_version="c", factory_id="factory-1", camera_id="cam-a")
    assert (doc["factory_id"], doc["camera_id"]) == ("factory-1", "cam-a")
    register_model(fdb, model, dataset_version="d", code_version="c", factory_id="factory-1", camera_id="cam-a")
    with pytest.raises(WrongOwner, match="registered for factory 'factory-1'"):
        register_model(fdb, model, dataset_version="d", code_version="c", factory_id="factory-2", camera_id="cam-a")
    with pytest.raises(WrongOwner):
        assign_model(fdb, model.version, "factory-1", "cam-b")
    with pytest.raises(ValueError, match="both factory_id and camera_id"):
        register_model(fdb, model, dataset_version="d", code_version="c", factory_id="factory-1")
    assert fdb.models.find_one({"_id": model.version})["factory_id"] == "factory-1"


def test_the_newest_passing_model_is_chosen_per_factory_and_camera(fdb):
    from factory_assets.storage.models import latest_model, model_cameras

    _owned(fdb, {("factory-1", "cam-a"): ["a1", "a2"], ("factory-1", "cam-b"): ["b1"], ("factory-2", "cam-a"): ["c1"]})
    set_checks(fdb, "a2", False, {})
    assert latest_model(fdb, factory_id="factory-1", camera_id="cam-a")["_id"] == "a1"
    assert latest_model(fdb, factory_id="factory-2", camera_id="cam-a")["_id"] == "c1"
    assert latest_model(fdb, factory_id="factory-3") is None
    assert model_cameras(fdb, "factory-1") == ["cam-a", "cam-b"]


def test_a_model_is_deployed_only_for_its_own_factory_and_camera(fdb):
    import pytest

    from factory_assets.storage.models import WrongOwner, deploy_model, get_deployment

    _owned(fdb, {("factory-1", "cam-a"): ["a1"], ("factory-2", "cam-a"): ["c1"]})
    register_external_model(fdb, "legacy", dataset_version="d", code_version="c", trainer="test")
    with pytest.raises(WrongOwner, match="cannot be deployed for 'factory-2'"):
        deploy_model(fdb, "factory-2", "cam-a", "a1", endpoint="ep")
    with pytest.raises(WrongOwner):  # a model whose factory is unknown belongs to no factory
        deploy_model(fdb, "factory-1", "cam-a", "legacy", endpoint="ep")
    assert get_deployment(fdb, "factory-2", "cam-a", endpoint="ep") is None


def test_deploying_and_rolling_back_one_factory_leaves_every_other_deployment_as_it_was(fdb):
    from factory_assets.storage.models import (deploy_model, deployments, get_deployment, has_deployments,
                                               rollback_deployment)

    _owned(fdb, {("factory-1", "cam-a"): ["a1", "a2"], ("factory-2", "cam-a"): ["c1", "c2"]})
    assert not has_deployments(fdb, endpoint="ep")
    deploy_model(fdb, "factory-1", "cam-a", "a1", endpoint="ep")
    deploy_model(fdb, "factory-2", "cam-a", "c1", endpoint="ep")
    deploy_model(fdb, "factory-2", "cam-a", "c2", endpoint="ep")
    other = get_deployment(fdb, "factory-2", "cam-a", endpoint="ep")
    assert has_deployments(fdb, endpoint="ep") and not has_deployments(fdb, endpoint="ep2")
    deploy_model(fdb, "factory-1", "cam-a", "a2", endpoint="ep")
    assert get_deployment(fdb, "factory-1", "cam-a", endpoint="ep")["previous_versions"] == ["a1"]
    doc = rollback_deployment(fdb, "factory-1", "cam-a", endpoint="ep")
    assert doc["model_version"] == "a1" and doc["rolled_back_from"] == "a2"
    assert get_deployment(fdb, "factory-2", "cam-a", endpoint="ep") == other  # not a field touched
    assert {(d["factory_id"], d["model_version"]) for d in deployments(fdb, endpoint="ep")} == {
        ("factory-1", "a1"), ("factory-2", "c2")}
    assert [d["model_version"] for d in deployments(fdb, endpoint="ep", factory_ids=["factory-2"])] == ["c2"]
