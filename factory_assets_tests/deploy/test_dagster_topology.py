"""Dagster on its production topology, run for real: a PostgreSQL instance, one ``dagster api grpc``
server per code location (the real ``factory_assets.definitions`` and the small test location
``topology_defs``), the webserver and the daemon as separate processes, started exactly as
``factory-assets up --dagster-postgres`` starts them (``Topology.services``). Runs are submitted
through the webserver's GraphQL API; states are read from the instance in PostgreSQL.

One topology serves the module (starting it costs ~20 s on 2 cores); each test waits until its own
runs have ended. The restart test comes last: it stops and starts every Dagster process.
"""
from __future__ import annotations

import json
import os
import signal
import uuid
from types import SimpleNamespace

import pytest

from factory_assets.cli.dagster_topology import (CodeServer, LOCATION_NAME, PASSWORD_ENV, PostgresTarget,
                                                 QueueSettings, Topology)
from factory_assets.cli.up import free_port
from factory_assets.defs.pools import MONGODB_POOL, SAGEMAKER_POOL
from factory_assets_tests.deploy.harness import RunningTopology, wait_for
from factory_assets_tests.deploy.topology_defs import GATES_ENV

pytestmark = pytest.mark.slow

TEST_LOCATION = "topology_tests"
REPO = "__repository__"
# Small limits so a handful of runs shows the queue; short intervals so the daemon reacts within
# a second (production defaults: QueueSettings()).
SETTINGS = QueueSettings(max_concurrent_runs=2, runs_per_factory=1, pool_limits=((MONGODB_POOL, 1), (SAGEMAKER_POOL, 1)),
                         dequeue_interval_seconds=1, monitoring_interval_seconds=1, free_slots_after_run_end_seconds=1)
RUN_TIMEOUT = 90.0


@pytest.fixture(scope="module")
def topo(postgres_cluster, mongo_uri, tmp_path_factory):
    import dagster as dg

    database = f"dagster_{uuid.uuid4().hex[:10]}"
    postgres_cluster.create_database(database)
    root = tmp_path_factory.mktemp("topology")
    gates = root / "gates"
    (gates / "requests").mkdir(parents=True)
    # the password reaches the processes only through the environment, as under `up`
    target = PostgresTarget.parse(postgres_cluster.url(database), environ={PASSWORD_ENV: postgres_cluster.password})
    topology = Topology(home=root / "dagster_home", target=target, settings=SETTINGS,
                        code_servers=[CodeServer(TEST_LOCATION, "factory_assets_tests.deploy.topology_defs",
                                                 port=free_port()),
                                      CodeServer(port=free_port())],
                        webserver_port=free_port())
    topology.write()
    base_env = {**os.environ, GATES_ENV: str(gates), "MONGODB_URI": mongo_uri,
                "MONGODB_DATABASE": f"topology_{uuid.uuid4().hex[:8]}", "FACTORY_LOG_LEVEL": "WARNING"}
    base_env.pop(PASSWORD_ENV, None)
    topology.apply_pool_limits(base_env)
    running = RunningTopology(topology, base_env, root / "logs")
    saved = os.environ.get(PASSWORD_ENV)
    os.environ[PASSWORD_ENV] = postgres_cluster.password  # for the instance this test process reads
    instance = None
    try:
        running.start()
        running.wait_until_loaded()
        instance = dg.DagsterInstance.from_config(str(topology.home))
        ns = SimpleNamespace(running=running, instance=instance, gates=gates, topology=topology)
        ns.stopped_automation = _stop_real_automation(ns)
        yield ns
    finally:
        for path in gates.glob("*.started"):  # let any run still waiting finish before the processes go
            (gates / f"{path.stem}.open").touch()
        running.stop()
        if instance is not None:
            instance.dispose()
        if saved is None:
            os.environ.pop(PASSWORD_ENV, None)
        else:
            os.environ[PASSWORD_ENV] = saved
        postgres_cluster.drop_database(database)


# --- helpers -------------------------------------------------------------------------------------

def _status(topo, run_id: str) -> str:
    return topo.instance.get_run_by_id(run_id).status.value


def _wait_status(topo, run_id: str, *statuses: str, timeout: float = RUN_TIMEOUT) -> str:
    def reached():
        status = _status(topo, run_id)
        return status if status in statuses else None

    try:
        return wait_for(reached, timeout, f"run {run_id} to be {'/'.join(statuses)}")
    except AssertionError:
        print(topo.running.log_tail("dagster-daemon"), topo.running.log_tail(f"dagster-code-{TEST_LOCATION}"))
        raise


def _started(topo, gate: str) -> bool:
    return (topo.gates / f"{gate}.started").exists()


def _open(topo, gate: str) -> None:
    (topo.gates / f"{gate}.open").touch()


def _submit(topo, job: str, gate: str, factory: str) -> str:
    return topo.running.submit(job, TEST_LOCATION, {"factory": factory, "gate": gate})


def _record(topo, run_id: str):
    return topo.instance.get_run_record_by_id(run_id)


def _sensor(topo, location: str, name: str) -> dict:
    data = topo.running.graphql("""query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) {
        __typename ... on Sensor { sensorState { status typeSpecificData { ... on SensorData { lastCursor } } } } } }""",
                                {"s": {"repositoryLocationName": location, "repositoryName": REPO,
                                       "sensorName": name}})["sensorOrError"]
    state = data["sensorState"]
    return {"status": state["status"], "cursor": (state["typeSpecificData"] or {}).get("lastCursor")}


def _request_run(topo, name: str):
    """Drops a request file for ``request_sensor`` and waits for the run it asks for to end."""
    import dagster as dg

    (topo.gates / "requests" / f"{name}.request").touch()

    def run_of_request():
        records = topo.instance.get_run_records(dg.RunsFilter(tags={"dagster/run_key": name}))
        if not records or not records[0].dagster_run.is_finished:
            return None
        # the run worker writes one more event after the run's status: "Process for run exited"
        logs = topo.instance.all_logs(records[0].dagster_run.run_id)
        return records[0] if any("Process for run exited" in (e.message or "") for e in logs) else None

    return wait_for(run_of_request, RUN_TIMEOUT, f"the run requested by {name}")


def _stop_real_automation(topo) -> list[str]:
    """Stops the real location's schedule and sensors (they would add runs to the queue under test);
    the stopped states are stored in PostgreSQL like any other."""
    repo = topo.running.graphql("""query($r: RepositorySelector!) { repositoryOrError(repositorySelector: $r) {
        ... on Repository { schedules { id name } sensors { id name } } } }""",
                                {"r": {"repositoryLocationName": LOCATION_NAME, "repositoryName": REPO}})
    repo = repo["repositoryOrError"]
    for s in repo["schedules"]:
        topo.running.graphql("mutation($id: String!) { stopRunningSchedule(id: $id) { __typename } }", {"id": s["id"]})
    for s in repo["sensors"]:
        topo.running.graphql("mutation($id: String!) { stopSensor(id: $id) { __typename } }", {"id": s["id"]})
    return [s["name"] for s in repo["schedules"] + repo["sensors"]]


# --- tests ---------------------------------------------------------------------------------------

def test_the_real_definitions_load_through_their_grpc_server_with_pools_on_the_heavy_assets(topo):
    locations = topo.running.locations()
    assert locations[LOCATION_NAME][:2] == ("LOADED", "RepositoryLocation"), locations[LOCATION_NAME]
    repo = topo.running.graphql("""query($r: RepositorySelector!) { repositoryOrError(repositorySelector: $r) {
        ... on Repository { jobs { name } assetNodes { assetKey { path } pools } } } }""",
                                {"r": {"repositoryLocationName": LOCATION_NAME, "repositoryName": REPO}})
    repo = repo["repositoryOrError"]
    assert {"stock_inference_job", "retrain_job", "twin_refresh_job"} <= {j["name"] for j in repo["jobs"]}
    pools = {"/".join(a["assetKey"]["path"]): a["pools"] for a in repo["assetNodes"]}
    assert pools["stock_inferences"] == [MONGODB_POOL] and pools["labeled_images"] == [MONGODB_POOL]
    assert pools["stock_model"] == [SAGEMAKER_POOL] and pools["model_endpoint"] == [SAGEMAKER_POOL]
    # the real schedule and sensors were stopped (stored in PostgreSQL) so they add no run to the queues under test
    assert {"new_frames_sensor", "reinfer_stock_schedule"} <= set(topo.stopped_automation)
    assert _sensor(topo, LOCATION_NAME, "new_frames_sensor")["status"] == "STOPPED"


def test_a_sensor_requested_run_completes_through_the_daemon_and_the_code_server(topo):
    record = _request_run(topo, "factory-3-1")
    run = record.dagster_run
    assert run.status.value == "SUCCESS"
    assert run.tags["factory"] == "factory-3" and run.tags["dagster/sensor_name"] == "request_sensor"
    # the run went through the queue (QueuedRunCoordinator), not straight to the launcher
    events = topo.instance.all_logs(run.run_id)
    kinds = [e.dagster_event.event_type_value for e in events if e.dagster_event]
    assert kinds.index("PIPELINE_ENQUEUED") < kinds.index("PIPELINE_STARTING") < kinds.index("PIPELINE_SUCCESS")
    assert "factory-3-1" in json.loads(_sensor(topo, TEST_LOCATION, "request_sensor")["cursor"])


def test_runs_beyond_the_limits_wait_in_the_queue_and_start_in_order(topo):
    # at most 2 runs in progress, 1 per factory: q0 (a) and q2 (b) start; q1 waits for factory a,
    # q3 (c) for a free run slot
    gates = [f"queue-{uuid.uuid4().hex[:6]}-{i}" for i in range(4)]
    factories = ["queue-a", "queue-a", "queue-b", "queue-c"]
    runs = [_submit(topo, "gated", g, f) for g, f in zip(gates, factories)]
    try:
        wait_for(lambda: _started(topo, gates[0]) and _started(topo, gates[2]), RUN_TIMEOUT, "q0 and q2 to start")
        assert [_status(topo, r) for r in runs] == ["STARTED", "QUEUED", "STARTED", "QUEUED"]

        _open(topo, gates[0])  # factory a is free again and one run slot too: q1, ahead of q3, takes it
        wait_for(lambda: _started(topo, gates[1]), RUN_TIMEOUT, "q1 to start")
        assert [_status(topo, r) for r in runs] == ["SUCCESS", "STARTED", "STARTED", "QUEUED"]

        _open(topo, gates[2])
        wait_for(lambda: _started(topo, gates[3]), RUN_TIMEOUT, "q3 to start")
        _open(topo, gates[1])
        _open(topo, gates[3])
        for r in runs:
            assert _wait_status(topo, r, "SUCCESS", "FAILURE") == "SUCCESS"
    finally:
        for g in gates:
            _open(topo, g)
    rec = [_record(topo, r) for r in runs]
    assert rec[1].start_time >= rec[0].end_time  # the factory limit held q1 until q0 ended
    assert rec[3].start_time >= rec[2].end_time  # the run limit held q3 until a slot came free
    assert rec[1].start_time < rec[3].start_time  # first in, first out among the runs that could start


def test_a_run_killed_mid_step_gives_its_pool_slot_back(topo):
    first, second, probe = (f"pool-{uuid.uuid4().hex[:6]}-{i}" for i in range(3))
    storage = topo.instance.event_log_storage
    assert storage.get_concurrency_info(MONGODB_POOL).slot_count == 1  # set by apply_pool_limits
    holder = _submit(topo, "pooled", first, "pool-1")
    try:
        wait_for(lambda: _started(topo, first), RUN_TIMEOUT, "the first run's step to hold the pool's slot")
        assert storage.get_concurrency_info(MONGODB_POOL).active_run_ids == {holder}
        waiter = _submit(topo, "pooled", second, "pool-2")
        # a run submitted after it, needing no pool, passes it and ends: the queue has been worked
        # off past the waiter, which stays queued because its step's pool has no free slot
        later = _submit(topo, "gated", probe, "pool-3")
        _open(topo, probe)
        assert _wait_status(topo, later, "SUCCESS", "FAILURE") == "SUCCESS"
        assert _status(topo, waiter) == "QUEUED" and not _started(topo, second)

        os.kill(int((topo.gates / f"{first}.started").read_text()), signal.SIGKILL)  # the run worker, mid-step
        assert _wait_status(topo, holder, "FAILURE", "SUCCESS") == "FAILURE"
        # run monitoring frees the dead run's slot; the waiting run is dequeued and its step takes it
        wait_for(lambda: _started(topo, second), RUN_TIMEOUT, "the waiting run's step to get the freed slot")
        assert storage.get_concurrency_info(MONGODB_POOL).active_run_ids == {waiter}
        _open(topo, second)
        assert _wait_status(topo, waiter, "SUCCESS", "FAILURE") == "SUCCESS"
    finally:
        for gate in (first, second, probe):
            _open(topo, gate)
    info = storage.get_concurrency_info(MONGODB_POOL)
    assert info.claimed_slots == [] and info.pending_steps == []
    assert not (topo.gates / f"{first}.done").exists()  # the killed step never finished


def test_a_backfill_over_factories_and_days_runs_every_partition_through_the_queue(topo):
    import dagster as dg

    keys = [f"{day}|{factory}" for day in ("2026-11-01", "2026-11-02") for factory in ("factory-1", "factory-2")]
    # the job's partition set; its runs are created at launch (the backfill daemon would take up
    # to its fixed 30 s loop to do it) and go through the queue like any other
    selector = {"partitionSetName": "factory_days_job_partition_set",
                "repositorySelector": {"repositoryLocationName": TEST_LOCATION, "repositoryName": REPO}}
    answer = topo.running.graphql("""mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
        __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }""",
                                  {"p": {"selector": selector, "partitionNames": keys,
                                         "forceSynchronousSubmission": True}})
    backfill_id = answer["launchPartitionBackfill"].get("backfillId")
    assert backfill_id, answer

    def all_runs_ended():
        runs = topo.instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
        return runs if len(runs) == len(keys) and all(r.is_finished for r in runs) else None

    runs = wait_for(all_runs_ended, 2 * RUN_TIMEOUT, f"the {len(keys)} runs of backfill {backfill_id}")
    assert {r.status.value for r in runs} == {"SUCCESS"}
    assert sorted(r.tags["dagster/partition"] for r in runs) == sorted(keys)
    materialized = topo.instance.get_materialized_partitions(dg.AssetKey("factory_day"))
    assert set(keys) <= materialized


def test_runs_events_and_sensor_cursors_survive_a_restart_of_every_dagster_process(topo):
    import dagster as dg

    before = _request_run(topo, "factory-4-1").dagster_run
    events_before = len(topo.instance.all_logs(before.run_id))
    runs_before = {r.run_id: r.status for r in topo.instance.get_runs()}
    cursor_before = _sensor(topo, TEST_LOCATION, "request_sensor")["cursor"]
    stopped_real_sensor = _sensor(topo, LOCATION_NAME, "new_frames_sensor")["status"]

    old_pids = {name: proc.pid for name, proc in topo.running.procs}
    topo.running.stop()
    topo.running.start()
    topo.running.wait_until_loaded()
    assert not set(old_pids.values()) & {proc.pid for _, proc in topo.running.procs}  # new processes, all of them

    assert {r.run_id: r.status for r in topo.instance.get_runs()} == runs_before
    assert len(topo.instance.all_logs(before.run_id)) == events_before
    assert _sensor(topo, TEST_LOCATION, "request_sensor")["cursor"] == cursor_before
    assert _sensor(topo, LOCATION_NAME, "new_frames_sensor")["status"] == stopped_real_sensor == "STOPPED"

    after = _request_run(topo, "factory-4-2").dagster_run
    assert after.status.value == "SUCCESS"
    # the sensor went on from its stored cursor: no second run for a request it had already handled
    assert json.loads(_sensor(topo, TEST_LOCATION, "request_sensor")["cursor"]) == json.loads(cursor_before) + ["factory-4-2"]
    assert len(topo.instance.get_runs(dg.RunsFilter(tags={"dagster/sensor_name": "request_sensor"}))) == \
        len(json.loads(cursor_before)) + 1
