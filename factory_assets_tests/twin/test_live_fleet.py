"""The live updater of a fleet: one reader follows every factory and infers each frame with its own
factory's model, by name, through the fleet's one inference server (real server hosting the
registry's models, real MongoDB)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from factory_assets.serving.models import model_name
from factory_assets.storage.frames import FrameSequence, build_frame, insert_frames
from factory_assets.storage.models import deploy_model, register_external_model, register_model, set_checks
from factory_assets.twin.live import LiveTwinUpdater, load_cursor
from factory_assets_tests.helpers import jpeg_bytes

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=timezone.utc)
EP = "factory-stock"


@pytest.fixture
def fleet_server(mongo_uri, database_name):
    """The fleet's inference server: every registered model by name, no model of its own."""
    from factory_assets.serving.server import build_server

    srv = build_server("127.0.0.1", 0, uri=mongo_uri, database=database_name, registry=True).start()
    yield srv
    srv.stop()


def store(fdb, factories: list[str], n: int, start: datetime = T0) -> None:
    """``n`` frames of each factory, interleaved as a shared broker delivers them."""
    insert_frames(fdb, [build_frame(jpeg_bytes(seed=i * 10 + k), ts=start + timedelta(seconds=i), camera_id="cam-1",
                                    factory_id=f, content_type="image/jpeg", width=320, height=240,
                                    source={"kind": "test"}, received_at=start + timedelta(seconds=i))
                        for i in range(n) for k, f in enumerate(factories)])


def own(fdb, model, factory_id: str, deploy: bool = True) -> str:
    register_model(fdb, model, dataset_version="d", code_version="c", factory_id=factory_id, camera_id="cam-1")
    set_checks(fdb, model.version, True, {})
    if deploy:
        deploy_model(fdb, factory_id, "cam-1", model.version, endpoint=EP)
    return model.version


def run_until_idle(updater: LiveTwinUpdater) -> None:
    for _ in range(100):  # bounded: each step reads one page
        if not updater.step():
            return
    raise AssertionError("the updater never caught up")


def models_by_factory(fdb) -> dict:
    out: dict = {}
    for inf in fdb.inferences.find({}, {"factory_id": 1, "model_version": 1}):
        out.setdefault(inf["factory_id"], set()).add(inf["model_version"])
    return out


def test_one_reader_infers_each_factorys_frames_with_that_factorys_model_by_name(fdb, fleet_server, trained_models):
    from factory_assets.serving.predictor import HttpEndpointPredictor
    from factory_assets.twin.store import get_twin

    a = own(fdb, trained_models[0].model, "factory-1")
    b = own(fdb, trained_models[1].model, "factory-2")
    store(fdb, ["factory-1", "factory-2", "factory-3"], n=3)  # factory-3 has no model yet
    with HttpEndpointPredictor(fleet_server.url) as predictor:
        updater = LiveTwinUpdater(fdb, predictor, change_stream=False)
        run_until_idle(updater)
    assert models_by_factory(fdb) == {"factory-1": {a}, "factory-2": {b}}
    assert updater.stats.inferred == 6 and updater.stats.no_model == 3
    # one cursor for the whole fleet, past every frame (factory-3's are the batch path's once it has a model)
    assert load_cursor(fdb, "twin-live") == FrameSequence(fdb).horizon() == 9
    assert sorted(fleet_server.models.names()) == [model_name("factory-1", "cam-1", a),
                                                   model_name("factory-2", "cam-1", b)]
    assert get_twin(fdb, "factory-1")["observed"]["model_version"] == a
    assert get_twin(fdb, "factory-2")["observed"]["model_version"] == b
    assert get_twin(fdb, "factory-3") is None or not get_twin(fdb, "factory-3").get("observed")


def test_a_factory_whose_model_the_server_cannot_find_holds_back_no_other_factory(fdb, fleet_server, trained_models):
    from factory_assets.serving.predictor import HttpEndpointPredictor

    a = own(fdb, trained_models[0].model, "factory-1")
    # deployed for factory-2, but no artifact anywhere the server looks
    register_external_model(fdb, "0123456789abcdef", dataset_version="d", code_version="c", trainer="test",
                            fields={"factory_id": "factory-2", "camera_id": "cam-1"})
    set_checks(fdb, "0123456789abcdef", True, {})
    deploy_model(fdb, "factory-2", "cam-1", "0123456789abcdef", endpoint=EP)
    store(fdb, ["factory-2", "factory-1"], n=2)
    with HttpEndpointPredictor(fleet_server.url) as predictor:
        updater = LiveTwinUpdater(fdb, predictor, change_stream=False)
        run_until_idle(updater)
    assert models_by_factory(fdb) == {"factory-1": {a}}
    assert updater.stats.unknown_model == 2 and updater.stats.inferred == 2


def test_before_any_deployment_the_endpoints_own_model_never_infers_another_factorys_frames(fdb, trained_models):
    from factory_assets.serving.predictor import InProcessPredictor

    a = own(fdb, trained_models[0].model, "factory-1", deploy=False)  # factory-1's, on the endpoint alone
    store(fdb, ["factory-1", "factory-2"], n=2)
    updater = LiveTwinUpdater(fdb, InProcessPredictor(trained_models[0].model), change_stream=False)
    run_until_idle(updater)
    assert models_by_factory(fdb) == {"factory-1": {a}}
    assert updater.stats.foreign_model == 2
    # a model registered for no factory (trained before the fleet) still serves every factory then
    fdb.inferences.delete_many({})
    fdb.counters.delete_one({"_id": "cursor:twin-live"})
    fdb.models.update_one({"_id": a}, {"$unset": {"factory_id": "", "camera_id": ""}})
    again = LiveTwinUpdater(fdb, InProcessPredictor(trained_models[0].model), change_stream=False)
    run_until_idle(again)
    assert models_by_factory(fdb) == {"factory-1": {a}, "factory-2": {a}}


def test_the_updater_reads_the_deployments_of_the_factories_it_reads_frames_of(fdb, trained_models):
    """Its reads follow what arrived: with 50 deployed factories, a page of one factory's frames
    reads that factory's deployments only."""
    from factory_assets.twin.live import ModelRouter

    for k in range(1, 51):
        register_external_model(fdb, f"v{k:02d}", dataset_version="d", code_version="c", trainer="test",
                                fields={"factory_id": f"factory-{k}", "camera_id": "cam-1"})
        set_checks(fdb, f"v{k:02d}", True, {})
        deploy_model(fdb, f"factory-{k}", "cam-1", f"v{k:02d}", endpoint=EP)
    router = ModelRouter(fdb, EP)
    router.prepare(["factory-7"])
    assert router.cameras("factory-7") == {"cam-1": "v07"} and list(router._versions) == ["factory-7"]
    assert router.choice("factory-7", "cam-1").target_model == "factory-7--cam-1--v07"
    assert router.choice("factory-7", "cam-2") is None  # the fleet is served per factory: no fallback
