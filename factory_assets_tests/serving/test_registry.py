from factory_assets.serving.models import load_model
from factory_assets.storage.models import (get_endpoint, latest_model, register_model,
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
