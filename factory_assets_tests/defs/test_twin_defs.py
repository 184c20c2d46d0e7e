"""The twin domain's Dagster layer, per factory, with real MongoDB, a real inference server
hosting the registry's models by name, and real Dagster instances: sensors through
build_sensor_context, assets through materialize."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest

from factory_assets.defs.models.resources import EndpointResource
from factory_assets.defs.resources import MongoResource
from factory_assets.defs.twin.assets import StockInferencesConfig, stock_inferences, twin_state
from factory_assets.defs.twin.sensors import RetrainWindow, load_frames_cursor, new_frames_sensor, twin_live_sensor
from factory_assets.storage.frames import build_frame, insert_frames
from factory_assets.storage.inferences import build_inference, record_inference
from factory_assets.storage.models import deploy_model, register_model, set_checks
from factory_assets_tests.defs.fleet import instance_with, key, range_tags
from factory_assets_tests.helpers import jpeg_bytes

OLD = datetime(2026, 11, 20, 9, 0, tzinfo=timezone.utc)
F1 = "factory-1"


def frame(ts: datetime, seed: int = 0, received_at: datetime | None = None) -> dict:
    return build_frame(jpeg_bytes(seed=seed), ts=ts, camera_id="cam-1", factory_id="factory-1",
                       content_type="image/jpeg", width=320, height=240, source={"kind": "test"},
                       received_at=received_at or ts)


def deploy(fdb, model, factory_id: str = F1, camera_id: str = "cam-1") -> str:
    """Register ``model`` for the factory's camera and deploy it there (model_endpoint's write)."""
    register_model(fdb, model, dataset_version="d", code_version="c", factory_id=factory_id, camera_id=camera_id)
    set_checks(fdb, model.version, True, {})
    deploy_model(fdb, factory_id, camera_id, model.version, endpoint="factory-stock")
    return model.version


@pytest.fixture
def fleet_server(mongo_uri, database_name):
    """The fleet's inference server: every registered model by name, no model of its own."""
    from factory_assets.serving.server import build_server

    srv = build_server("127.0.0.1", 0, uri=mongo_uri, database=database_name, registry=True).start()
    yield srv
    srv.stop()


@pytest.fixture
def resources(mongo_uri, database_name, fleet_server):
    return {"mongo": MongoResource(uri=mongo_uri, database=database_name),
            "endpoint": EndpointResource(url=fleet_server.url)}


def tick(resources, cursor=None, instance=None):
    # a context manager: EndpointResource nests a resource, which Dagster opens and closes
    with dg.build_sensor_context(cursor=cursor, resources=resources,
                                 instance=instance or instance_with(F1)) as ctx:
        return new_frames_sensor(ctx)


def mark_inferred(fdb, frames, version):
    for f in frames:
        record_inference(fdb, build_inference(f, probabilities={"blue": 0.9, "red": 0.1, "white": 0.1},
                                              thresholds={"blue": 0.5, "red": 0.5, "white": 0.5},
                                              model_version=version, latency_ms=1.0, source="test"))


def test_the_sensor_skips_while_no_model_is_deployed(fdb, resources):
    insert_frames(fdb, [frame(OLD)])
    result = tick(resources)
    assert isinstance(result, dg.SkipReason) and "No model deployed" in result.skip_message


def test_uninferred_frames_get_one_run_per_factorys_day_with_a_deterministic_run_key(fdb, resources, trained_models):
    version = deploy(fdb, trained_models[0].model)
    insert_frames(fdb, [frame(OLD + timedelta(minutes=i), seed=i) for i in range(3)]
                  + [frame(OLD + timedelta(days=1, minutes=i), seed=10 + i) for i in range(2)])
    first, second = tick(resources), tick(resources)
    keys = [(r.partition_key, r.run_key, r.tags["factory"]) for r in first.run_requests]
    assert keys == [("2026-11-20|factory-1", f"infer:factory-1:{version}:2026-11-20:1", F1),
                    ("2026-11-21|factory-1", f"infer:factory-1:{version}:2026-11-21:4", F1)]
    keys = [(k, rk) for k, rk, _ in keys]
    assert keys == [(r.partition_key, r.run_key) for r in second.run_requests]  # same frames, same keys
    assert load_frames_cursor(first.cursor)["seq"] == 0  # nothing inferred yet: the cursor does not pass a single frame


def test_frames_the_live_path_inferred_become_asset_events_and_move_the_cursor(fdb, resources, trained_models):
    version = deploy(fdb, trained_models[0].model)
    insert_frames(fdb, [frame(OLD + timedelta(minutes=i), seed=i) for i in range(4)])
    mark_inferred(fdb, list(fdb.frames.find()), version)
    result = tick(resources)
    assert result.run_requests == [] and load_frames_cursor(result.cursor)["seq"] == 4
    [event] = result.asset_events
    assert event.asset_key == dg.AssetKey("stock_inferences") and event.partition == "2026-11-20|factory-1"
    assert event.metadata["frames"].value == 4


def test_fresh_frames_are_left_to_the_live_updater_for_a_few_seconds(fdb, resources, trained_models):
    deploy(fdb, trained_models[0].model)
    now = datetime.now(timezone.utc)
    insert_frames(fdb, [frame(now, received_at=now)])
    result = tick(resources)
    assert result.run_requests == [] and "left to the live updater" in result.skip_reason.skip_message
    assert load_frames_cursor(result.cursor)["seq"] == 0


def test_a_burst_from_two_concurrent_ingesters_is_covered_without_skipping_a_frame(fdb, resources, trained_models):
    # The sensor ticks while two writers insert; runs are simulated by inferring what they requested.
    version = deploy(fdb, trained_models[0].model)
    stop = threading.Event()

    def writer(offset):
        i = 0
        while not stop.is_set() and i < 150:
            insert_frames(fdb, [frame(OLD + timedelta(seconds=offset + 2 * i), seed=offset + 2 * i)])
            i += 1

    threads = [threading.Thread(target=writer, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    cursor = None
    instance = instance_with(F1)
    while True:
        writers_done = not any(t.is_alive() for t in threads)
        result = tick(resources, cursor, instance)
        requests = getattr(result, "run_requests", None) or []
        for request in requests:
            start = datetime.fromisoformat(request.partition_key.split("|")[0]).replace(tzinfo=timezone.utc)
            mark_inferred(fdb, list(fdb.frames.find({"ts": {"$gte": start, "$lt": start + timedelta(days=1)},
                                                    "seq": {"$exists": True}})), version)
        cursor = result.cursor if isinstance(result, dg.SensorResult) else cursor
        if writers_done and not requests:
            break
    for t in threads:
        t.join()
    assert fdb.frames.count_documents({}) == 300
    assert fdb.inferences.count_documents({}) == 300
    assert load_frames_cursor(result.cursor)["seq"] == 300


def test_stock_inferences_infers_each_frame_of_the_day_once(fdb, resources, trained_models, mongo_uri, database_name):
    version = deploy(fdb, trained_models[0].model)
    insert_frames(fdb, [frame(OLD + timedelta(minutes=i), seed=i) for i in range(5)]
                  + [frame(OLD + timedelta(days=1), seed=99)])
    instance = instance_with(F1)
    result = dg.materialize([stock_inferences], partition_key=key(F1, "2026-11-20"), resources=resources,
                            instance=instance)
    md = result.asset_materializations_for_node("stock_inferences")[0].metadata
    assert md["inferred_now"].value == 5 and md["frames"].value == 5
    assert fdb.inferences.count_documents({"model_version": version}) == 5
    again = dg.materialize([stock_inferences], partition_key=key(F1, "2026-11-20"), resources=resources,
                           instance=instance)
    md = again.asset_materializations_for_node("stock_inferences")[0].metadata
    assert md["inferred_now"].value == 0 and md["already_inferred"].value == 5
    assert fdb.inferences.count_documents({}) == 5


def test_a_range_backfill_of_stock_inferences_is_one_run_over_every_day(fdb, resources, trained_models):
    deploy(fdb, trained_models[0].model)
    insert_frames(fdb, [frame(OLD + timedelta(days=d), seed=d) for d in range(3)])
    result = dg.materialize([stock_inferences], resources=resources, instance=instance_with(F1),
                            tags=range_tags(F1, "2026-11-20", "2026-11-22"))
    assert result.success and fdb.inferences.count_documents({}) == 3


def test_stock_inferences_fails_clearly_when_the_endpoint_is_down(fdb, mongo_uri, database_name, trained_models):
    import socket

    deploy(fdb, trained_models[0].model)
    insert_frames(fdb, [frame(OLD, seed=1)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the asset's body, as a run's step executes it (a run would then retry it 3 times, 2 + 4 + 8 s apart)
    context = dg.build_asset_context(partition_key=key(F1, "2026-11-20"), instance=instance_with(F1))
    with pytest.raises(dg.Failure, match="Endpoint unavailable") as failure:
        stock_inferences(context, StockInferencesConfig(), mongo=MongoResource(uri=mongo_uri, database=database_name),
                         endpoint=EndpointResource(url=f"http://127.0.0.1:{port}", timeout_seconds=1))
    assert failure.value.allow_retries is not False and stock_inferences.op.retry_policy.max_retries == 3
    assert fdb.inferences.count_documents({}) == 0


def test_twin_state_shows_the_newest_frame_and_a_picture_of_the_rack(fdb, resources, trained_models):
    version = deploy(fdb, trained_models[0].model)
    insert_frames(fdb, [frame(OLD + timedelta(minutes=i), seed=i) for i in range(3)])
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([twin_state], resources=resources, instance=instance)
    md = result.asset_materializations_for_node("twin_state")[0].metadata
    assert "data:image/png;base64," in md["twin_detail"].value
    assert md["model_version"].value == version
    assert md["observed_frame_ts"].value == (OLD + timedelta(minutes=2)).timestamp()
    again = dg.materialize([twin_state], resources=resources, instance=instance)
    # the twin did not change: no second full picture in the event log, only the small inline one
    again_md = again.asset_materializations_for_node("twin_state")[0].metadata
    assert "twin_detail" not in again_md and again_md["twin"].value == md["twin"].value


def test_the_twin_picture_is_short_enough_for_the_dagster_ui_to_show_it_without_a_click(fdb, resources,
                                                                                        trained_models):
    # The UI shows Markdown metadata inline below 1,000 characters; a PNG data URL never is.
    import random
    from urllib.parse import unquote

    from factory_assets.defs.twin.picture import INLINE_LIMIT, twin_markdown
    from factory_assets.twin.state import SLOTS

    deploy(fdb, trained_models[0].model)
    insert_frames(fdb, [frame(OLD, seed=1)])
    md = dg.materialize([twin_state], resources=resources).asset_materializations_for_node("twin_state")[0].metadata
    assert len(md["twin"].value) < INLINE_LIMIT
    assert unquote(md["twin"].value).startswith("![twin](data:image/svg+xml,<svg ")
    # the rack as the controller reports it (A2 red, B1 white), as the camera sees it, the colours observed
    doc = {"reported": {"slots": {"A2": "RED", "B1": "WHITE"}},
           "observed": {"red": {"present": True}, "slots": {"A2": {"type": "RED"}, "B1": {"type": None}}},
           "delta": {"slots": {"B1": {"message": "controller says B1 holds WHITE, camera sees it empty"}}}}
    picture = unquote(twin_markdown(doc))
    assert [t in picture for t in (">reported<", ">seen<", ">observed<")] == [True] * 3
    assert " width='306'" in picture  # an intrinsic size: without one the UI's table cell draws it 0 px wide
    red = picture.split("fill='#d33'")[1].split("'/>")[0]
    assert red.count("h8v8h-8z") == 3  # A2 in both racks and the observed red
    assert "M36,20h8v8h-8z" in picture.split("stroke='red'")[1]  # B1 outlined on the camera's rack
    # every twin, however much vision and the controller disagree, fits (outlines dropped if ever needed)
    kinds = ["BLUE", "RED", "WHITE", None]
    for seed in range(300):
        r = random.Random(seed)
        doc = {"reported": {"slots": {s: r.choice(kinds) for s in SLOTS}},
               "observed": {**{c: {"present": r.random() < 0.5} for c in ("blue", "red", "white")},
                            "slots": {s: {"type": r.choice(kinds)} for s in SLOTS}},
               "delta": {"red": {}, "blue": {}, "slots": {s: {} for s in SLOTS if r.random() < 0.7}}}
        assert len(twin_markdown(doc)) < INLINE_LIMIT


def test_stock_inferences_depends_on_the_deployed_model_without_being_started_by_a_deployment():
    from factory_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    assert dg.AssetKey("model_endpoint") in graph.get(stock_inferences.key).parent_keys
    # what the daemon would do after a deployment: request nothing (stock_inferences has no
    # automation condition; twin_state follows stock_inferences only)
    instance = instance_with(F1)
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)  # the whole code location
    instance.report_runless_asset_event(dg.AssetMaterialization("model_endpoint", partition=F1))
    after_deploy = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    assert after_deploy.total_requested == 0
    instance.report_runless_asset_event(dg.AssetMaterialization("stock_inferences",
                                                                partition=str(key(F1, "2026-11-20"))))
    after_inferences = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=after_deploy.cursor)
    assert after_inferences.total_requested == 1 and after_inferences.get_num_requested(twin_state.key) == 1


def test_the_twin_never_regresses_when_an_older_frame_is_inferred_last(fdb, resources, trained_models):
    # Out-of-order completion: the newest frame's inference lands first, then an older one.
    from factory_assets.twin.state import Observation
    from factory_assets.twin.store import apply_observation, get_twin

    version = deploy(fdb, trained_models[0].model)
    insert_frames(fdb, [frame(OLD + timedelta(minutes=i), seed=i) for i in range(2)])
    older, newer = list(fdb.frames.find().sort("seq", 1))
    mark_inferred(fdb, [newer], version)
    apply_observation(fdb, Observation.from_inference(fdb.inferences.find_one({"frame_id": newer["_id"]}), "test"))
    mark_inferred(fdb, [older], version)
    assert not apply_observation(fdb, Observation.from_inference(
        fdb.inferences.find_one({"frame_id": older["_id"]}), "test"))
    assert get_twin(fdb)["observed"]["frame_id"] == newer["_id"]


def test_the_live_sensor_reports_each_ended_interval_of_twin_changes_once_with_its_provenance(fdb, resources, trained_models):
    from factory_assets.twin.state import Observation
    from factory_assets.twin.store import apply_observation

    version = deploy(fdb, trained_models[0].model)
    insert_frames(fdb, [frame(OLD + timedelta(minutes=i), seed=i) for i in range(2)])
    frames = list(fdb.frames.find().sort("seq", 1))
    for i, f in enumerate(frames):
        record_inference(fdb, build_inference(f, probabilities={"blue": 0.9 if i else 0.1, "red": 0.1, "white": 0.1},
                                              thresholds={"blue": 0.5, "red": 0.5, "white": 0.5},
                                              model_version=version, latency_ms=1.0, source="live"))
        apply_observation(fdb, Observation.from_inference(fdb.inferences.find_one({"frame_id": f["_id"]}), "live"))
    ctx = dg.build_sensor_context(resources={"mongo": resources["mongo"]})
    # changes of an interval that has not ended (dated ahead, so no clock boundary can close it mid-test)
    fdb.twin_history.update_many({}, {"$set": {"at": datetime.now(timezone.utc) + timedelta(days=1)}})
    assert not twin_live_sensor(ctx).asset_events
    fdb.twin_history.update_many({}, {"$set": {"at": OLD}})  # the same changes, in an interval that has ended
    result = twin_live_sensor(dg.build_sensor_context(resources={"mongo": resources["mongo"]}))
    [event] = result.asset_events  # one aggregated event for the interval, not one per change
    assert event.metadata["observed_changes"].value >= 1
    assert event.metadata["frame_id"].value == str(frames[-1]["_id"])
    assert event.metadata["model_version"].value == version
    assert "twin_detail" not in event.metadata and len(event.metadata["twin"].value) < 1000  # the small picture only
    again = twin_live_sensor(dg.build_sensor_context(cursor=result.cursor, resources={"mongo": resources["mongo"]}))
    assert not again.asset_events


def test_the_live_sensor_does_not_pass_a_version_of_an_open_interval_held_by_a_slow_writer(fdb, resources):
    # a writer that took its ``at`` early and won its swap late holds the higher version with the earlier ``at``
    open_at = datetime.now(timezone.utc) + timedelta(days=1)
    fdb.twin.insert_one({"_id": "factory-1", "version": 2, "updated_at": datetime.now(timezone.utc)})
    fdb.twin_history.insert_many([
        {"factory_id": "factory-1", "version": 1, "at": open_at, "kind": "reported", "changed": ["A1"]},
        {"factory_id": "factory-1", "version": 2, "at": OLD, "kind": "reported", "changed": ["A2"]}])
    first = twin_live_sensor(dg.build_sensor_context(resources={"mongo": resources["mongo"]}))
    assert not first.asset_events
    fdb.twin_history.update_one({"version": 1}, {"$set": {"at": OLD}})  # its interval has ended now
    second = twin_live_sensor(dg.build_sensor_context(cursor=first.cursor, resources={"mongo": resources["mongo"]}))
    [event] = second.asset_events
    assert (event.metadata["first_version"].value, event.metadata["last_version"].value) == (1, 2)


def _bootstrap_tick(resources):
    from factory_assets.defs.twin.sensors import bootstrap_model_sensor

    with dg.build_sensor_context(resources={**resources, "retrain_window": RetrainWindow()},
                                 instance=instance_with(F1)) as ctx:
        return bootstrap_model_sensor(ctx)


def test_bootstrap_waits_for_varied_stock_then_requests_the_first_training_run(fdb, resources):
    from factory_assets_tests.datasets.test_labels import T0, simulate_day

    simulate_day(fdb, seconds=60, change_every=1000)  # one stock situation only
    result = _bootstrap_tick(resources)
    assert not result.run_requests and "factory-1: waiting for data" in result.skip_reason.skip_message
    simulate_day(fdb, seconds=600, start=T0 + timedelta(minutes=5), seed=3, change_every=6)
    [request] = _bootstrap_tick(resources).run_requests
    assert request.run_key.startswith("bootstrap:factory-1:") and request.tags["factory"] == F1
    # the factory's first model trains on its last 7 days (today included), as one range run
    from factory_assets.vocabulary.clock import recent_days

    days = recent_days(7)
    assert (request.tags["dagster/asset_partition_range_start"], request.tags["dagster/asset_partition_range_end"]) \
        == (f"{days[0]}|factory-1", f"{days[-1]}|factory-1")


def test_a_deployed_model_that_disagrees_with_the_controller_triggers_retraining(fdb, resources, trained_models):
    from factory_assets_tests.datasets.test_labels import simulate_day

    version = deploy(fdb, trained_models[0].model, camera_id="txt-cam")  # simulate_day's camera
    simulate_day(fdb, seconds=300, seed=3, change_every=6)  # over 100 stable frames outside the crane's travel
    frames = list(fdb.frames.find().sort("seq", 1))
    # inferences that agree with the controller: no retraining
    from factory_assets.datasets.autolabel import auto_label

    auto_label(fdb, OLD.replace(year=2000), OLD.replace(year=2100), margin_s=0)
    truth = {lab["frame_id"]: lab["present"] for lab in fdb.labels.find()}
    for f in frames:
        if f["_id"] in truth:
            record_inference(fdb, build_inference(f, probabilities={c: float(v) for c, v in truth[f["_id"]].items()},
                                                  thresholds={"blue": 0.5, "red": 0.5, "white": 0.5},
                                                  model_version=version, latency_ms=1.0, source="test"))
    result = _bootstrap_tick(resources)
    assert not result.run_requests
    assert "disagrees with the controller on 0% of its latest 100 frames" in result.skip_reason.skip_message
    # the same frames seen by a model that never says red where red is stored
    fdb.inferences.update_many({"present.red": True}, {"$set": {"present.red": False}})
    [request] = _bootstrap_tick(resources).run_requests
    assert request.run_key.startswith(f"drift:factory-1:{version}:") and request.tags["factory"] == F1


def test_twin_state_is_requested_when_one_day_of_inferences_is_materialized_and_others_are_missing(fdb):
    # Most days have no frames, so most stock_inferences partitions never exist.
    from factory_assets.defs.twin.assets import TWIN_STATE_AUTOMATION

    unused = {"mongo": MongoResource(), "endpoint": EndpointResource()}  # evaluation runs nothing
    defs = dg.Definitions(assets=[stock_inferences, twin_state], resources=unused)
    instance = instance_with(F1)
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert first.total_requested == 0
    instance.report_runless_asset_event(dg.AssetMaterialization("stock_inferences",
                                                                partition=str(key(F1, "2026-11-20"))))
    second = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    assert second.get_num_requested(twin_state.key) == 1
    third = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=second.cursor)
    assert third.get_num_requested(twin_state.key) == 0  # once per update, not on every tick
    # plain eager() would wait for every day to exist: it never fires here
    @dg.asset(name="twin_state", deps=[stock_inferences], automation_condition=dg.AutomationCondition.eager())
    def eager_twin():
        return None

    eager_defs = dg.Definitions(assets=[stock_inferences, eager_twin], resources=unused)
    other = instance_with(F1)
    start = dg.evaluate_automation_conditions(defs=eager_defs, instance=other)
    other.report_runless_asset_event(dg.AssetMaterialization("stock_inferences", partition=str(key(F1, "2026-11-20"))))
    after = dg.evaluate_automation_conditions(defs=eager_defs, instance=other, cursor=start.cursor)
    assert after.get_num_requested(twin_state.key) == 0
    assert twin_state.get_asset_spec().automation_condition == TWIN_STATE_AUTOMATION


def test_a_poison_frame_is_quarantined_after_n_attempts_and_the_cursor_moves_past_it(fdb, resources,
                                                                                      trained_models):
    version = deploy(fdb, trained_models[0].model)
    good = frame(OLD, seed=1)
    poison = build_frame(b"\xff\xd8 not really a jpeg \xff\xd9", ts=OLD + timedelta(minutes=1),
                         camera_id="cam-1", factory_id="factory-1", content_type="image/jpeg", width=320,
                         height=240, source={"kind": "test"}, received_at=OLD)
    insert_frames(fdb, [good, poison])
    instance = instance_with(F1)
    config = {"ops": {"stock_inferences": {"config": {"max_attempts_per_frame": 3}}}}
    keys = []
    for attempt in range(3):
        request = tick(resources, instance=instance).run_requests[0]
        keys.append(request.run_key)
        result = dg.materialize([stock_inferences], partition_key=request.partition_key, resources=resources,
                                run_config=config, instance=instance, tags={"dagster/run_key": request.run_key})
        assert result.success  # a poison frame does not fail the run
    assert len(set(keys)) == 3  # each attempt got its own run
    md = result.asset_materializations_for_node("stock_inferences")[0].metadata
    assert md["quarantined_now"].value == 1
    quarantined = fdb.quarantine.find_one({"reason": "inference_failed_repeatedly"})
    assert quarantined["source"]["frame_id"] == str(poison["_id"]) and "3 attempts" in quarantined["error"]
    done = tick(resources, instance=instance)
    assert not done.run_requests and load_frames_cursor(done.cursor)["seq"] == 2
    assert fdb.inferences.count_documents({"model_version": version}) == 1


def test_a_flagged_disagreement_with_its_since_time_is_shown_not_a_failed_run(fdb, resources):
    # delta entries carry datetimes (since, last): the twin's metadata and the live sensor's events show them
    from factory_assets.defs.twin.assets import twin_metadata

    since = OLD + timedelta(seconds=3)
    delta = {"red": {"observed": False, "reported": True, "since": since, "frames": 3},
             "slots": {"A2": {"observed": None, "reported": "RED", "since": since, "frames": 3}}}
    md = twin_metadata({"version": 4, "delta": delta, "observed": {"red": {"present": False}}}, picture=False)
    assert md["delta"].value["red"]["since"] == since.isoformat()
    fdb.twin.insert_one({"_id": "factory-1", "version": 4})
    fdb.twin_history.insert_one({"factory_id": "factory-1", "version": 4, "at": OLD, "kind": "reported",
                                 "changed": ["A2"], "delta": delta})
    [event] = twin_live_sensor(dg.build_sensor_context(resources={"mongo": resources["mongo"]})).asset_events
    assert event.metadata["delta"].value["slots"]["A2"]["since"] == since.isoformat()


def test_the_live_sensor_looks_only_at_the_twins_that_changed_since_its_last_look(fdb, resources):
    # (what a tick reads at 1 and at 50 factories: test_fleet_tenancy.py)
    now = datetime.now(timezone.utc)
    for k in range(1, 51):  # 50 factories whose twins last changed a day ago, reported already
        fdb.twin.insert_one({"_id": f"factory-{k}", "version": 1, "updated_at": now - timedelta(days=1)})
        fdb.twin_history.insert_one({"factory_id": f"factory-{k}", "version": 1, "at": OLD, "kind": "reported",
                                     "changed": ["A1"]})
    first = twin_live_sensor(dg.build_sensor_context(resources={"mongo": resources["mongo"]}))
    assert len(first.asset_events) == 50
    # one factory changes: the next look reads that factory's history only
    fdb.twin.update_one({"_id": "factory-7"}, {"$set": {"version": 2, "updated_at": now}})
    fdb.twin_history.insert_one({"factory_id": "factory-7", "version": 2, "at": OLD, "kind": "reported",
                                 "changed": ["A2"]})
    import json

    looked = json.loads(first.cursor)
    second = twin_live_sensor(dg.build_sensor_context(cursor=first.cursor, resources={"mongo": resources["mongo"]}))
    [event] = second.asset_events
    assert event.metadata["factory_id"].value == "factory-7" and event.metadata["last_version"].value == 2
    assert json.loads(second.cursor)["factory-7"] == 2 and "@looked_at" in looked
