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
