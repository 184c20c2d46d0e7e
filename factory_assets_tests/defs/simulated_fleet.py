"""Simulated factories stored through the ingester's own path, and the platform's own sensors and
jobs run on them as the Dagster daemon would (shared by the fleet's end-to-end tests)."""
from __future__ import annotations

import json
from datetime import timedelta

import dagster as dg
import pytest

from factory_assets.twin.state import SLOTS

EP = "factory-stock"
TXT_CAM = "txt-cam"  # the ingester's camera id: the controller's camera sends none


class SimulatedFactory:
    """One member of the fleet plan (with its cameras), stored through the ingester under its
    factory id, one second of the factory at a time: the controller's messages, then one ``i/cam``
    per camera as each publishes it (the controller's without a camera id, a further camera's
    with its own)."""

    def __init__(self, fdb, member, start, frame_every_s: int = 1):
        from factory_assets.ingest.service import Ingestor
        from factory_assets.simulation.factory import FactorySimulator

        self.member, self.start = member, start
        self.factory_id = member.factory_id
        self.sim = FactorySimulator(seed=member.seed, change_every_s=6.0, start=start, pose=member.pose,
                                    extra_cameras=member.extra_cameras)
        self.ingestor = Ingestor(fdb)  # camera_id txt-cam, as `ingest mqtt` by default
        self.frame_every_s = frame_every_s  # the cameras' period; the controller's messages every second
        self.sending = self.sim.cameras  # the first ``sending`` cameras publish (a camera added later: raise it)
        self.t = 0
        self.truth: dict = {}  # frame time -> the rack the cameras show

    @property
    def camera_ids(self) -> list[str]:
        return [TXT_CAM] + [c.camera_id for c in self.member.extra_cameras]

    def run(self, seconds: int) -> None:
        for _ in range(seconds):
            ts = self.start + timedelta(seconds=self.t)
            self.sim.advance(ts)
            self._controller()
            if self.t % self.frame_every_s == 0:
                for camera in range(self.sending):
                    msg, shown = self.sim.camera_message(ts, camera)
                    self.ingestor.handle_mqtt("i/cam", json.dumps(msg).encode(), factory_id=self.factory_id)
                self.truth[ts] = shown
            self.t += 1
        self.ingestor.flush()

    def idle(self, seconds: int) -> None:
        """``seconds`` pass with the factory's camera off: no frame; what the controller published
        meanwhile arrives with the next frames (as a broker's queue delivers it)."""
        self.t += seconds

    def _controller(self) -> None:
        while self.sim.outbox:
            m = self.sim.outbox.popleft()
            self.ingestor.handle_mqtt(m.topic, json.dumps(m.payload).encode(), factory_id=self.factory_id)


def run_fleet(factories: list[SimulatedFactory], seconds: int, updater=None, chunk: int = 30) -> None:
    """Every factory ``seconds`` on, ``chunk`` seconds at a time; the live updater, when given,
    follows after each chunk (as it does while the frames arrive)."""
    done = 0
    while done < seconds:
        step = min(chunk, seconds - done)
        for f in factories:
            f.run(step)
        done += step
        if updater is not None:
            follow(updater)


def follow(updater) -> None:
    """The live updater reads until it has caught up."""
    while updater.step():
        pass


@pytest.fixture
def fleet_server(mongo_uri, database_name):
    """The fleet's one inference server, hosting the registry's models by name."""
    from factory_assets.serving.server import build_server

    srv = build_server("127.0.0.1", 0, uri=mongo_uri, database=database_name, registry=True).start()
    yield srv
    srv.stop()


def platform_resources(mongo_uri: str, database_name: str, endpoint_url: str, tmp_path) -> dict:
    from dagster_aws.s3 import S3Resource

    from factory_assets.defs.datasets.resources import DatasetTargetResource
    from factory_assets.defs.models.resources import EndpointResource, ModelPolicyResource
    from factory_assets.defs.resources import MongoResource
    from factory_assets.defs.twin.sensors import RetrainWindow

    return {"mongo": MongoResource(uri=mongo_uri, database=database_name),
            "endpoint": EndpointResource(url=endpoint_url),
            "model_policy": ModelPolicyResource(min_per_label_accuracy=0.8),
            "dataset_target": DatasetTargetResource(local_root=str(tmp_path / "datasets")),
            "s3": S3Resource(region_name="us-east-1"), "retrain_window": RetrainWindow()}


def platform_definitions(resources: dict) -> dg.Definitions:
    from factory_assets.defs.datasets import asset_checks as dataset_checks
    from factory_assets.defs.datasets.assets import labeled_images, training_manifests
    from factory_assets.defs.models.assets import model_endpoint, stock_model
    from factory_assets.defs.twin.jobs import model_job, retrain_job

    return dg.Definitions(assets=[labeled_images, training_manifests, stock_model, model_endpoint],
                          asset_checks=dataset_checks, jobs=[retrain_job, model_job], resources=resources)


class Daemon:
    """What the Dagster daemon does with the fleet's sensors, on one instance and one set of
    definitions: each sensor ticks with the cursor its last tick returned, new factories become
    partitions, and a bootstrap request runs ``retrain_job``, whose success makes
    ``retrained_model_sensor`` request ``model_job`` for the factory, which runs."""

    def __init__(self, defs: dg.Definitions, resources: dict):
        self.defs, self.resources = defs, resources
        self.instance = dg.DagsterInstance.ephemeral()
        self.cursors: dict = {}

    def tick(self, sensor):
        # the sensor's own resources only: a context builds every resource it is given (an S3 client is 0.3 s)
        needs = {k: self.resources[k] for k in sensor.required_resource_keys}
        with dg.build_sensor_context(instance=self.instance, resources=needs,
                                     cursor=self.cursors.get(sensor.name)) as ctx:
            result = sensor(ctx)
        self.cursors[sensor.name] = result.cursor or self.cursors.get(sensor.name)
        return result

    def discover(self) -> list[str]:
        """One tick of ``factory_discovery_sensor``: the factories it registered."""
        from factory_assets.defs.fleet import factory_discovery_sensor

        added = []
        for request in self.tick(factory_discovery_sensor).dynamic_partitions_requests or ():
            self.instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
            added += list(request.partition_keys)
        return added

    def bootstrap(self) -> list:
        """One tick of ``bootstrap_model_sensor``: its run requests."""
        return list(self.tick_bootstrap().run_requests or ())

    def tick_bootstrap(self) -> dg.SensorResult:
        """One tick of ``bootstrap_model_sensor``: its result (run requests or why none)."""
        from factory_assets.defs.twin.sensors import bootstrap_model_sensor

        return self.tick(bootstrap_model_sensor)

    def retrain_then_deploy(self, request) -> dg.ExecuteInProcessResult:
        """``retrain_job`` as requested, then the ``model_job`` run ``retrained_model_sensor``
        requests for it; the model run's result."""
        from factory_assets.defs.twin.sensors import retrained_model_sensor

        factory_id = request.tags["factory"]
        assert request.tags["dagster/asset_partition_range_start"].endswith(f"|{factory_id}")
        datasets = self.defs.resolve_job_def("retrain_job").execute_in_process(instance=self.instance,
                                                                                tags=request.tags)
        [model_request] = retrained_model_sensor(dg.build_run_status_sensor_context(
            sensor_name="retrained_model_sensor", dagster_instance=self.instance, dagster_run=datasets.dagster_run,
            dagster_event=datasets.get_run_success_event()))
        assert (model_request.partition_key, model_request.tags["factory"]) == (factory_id, factory_id)
        return self.defs.resolve_job_def("model_job").execute_in_process(
            instance=self.instance, partition_key=model_request.partition_key, tags=model_request.tags)


def bootstrap(daemon: Daemon, fleet: list[SimulatedFactory], newcomers: set[str], updater=None,
              chunk_s: int = 30, limit_s: int = 900) -> dict[str, str]:
    """The fleet runs on, ``chunk_s`` seconds at a time, the sensors ticking after each chunk, until
    every factory of ``newcomers`` has a model deployed by its own runs (``retrain_job`` then
    ``model_job``, tagged with it). Every request must be for a newcomer, once. Returns
    ``{factory_id: {camera_id: deployed version}}``."""
    from factory_assets.serving.models import model_name

    versions: dict[str, dict] = {}
    waited = 0
    while versions.keys() != newcomers:
        assert waited < limit_s, f"{sorted(newcomers - versions.keys())} not bootstrapped after {limit_s} s"
        run_fleet(fleet, chunk_s, updater)
        waited += chunk_s
        daemon.discover()
        for request in daemon.bootstrap():
            factory_id = request.tags["factory"]
            assert factory_id in newcomers - versions.keys(), request.tags
            deployed = daemon.retrain_then_deploy(request).asset_materializations_for_node("model_endpoint")
            rows = deployed[0].metadata["deployments"].value
            versions[factory_id] = {row["camera_id"]: row["model_version"] for row in rows}
            for row in rows:  # the server is asked for it by its name, which pairs it with its factory and camera
                assert row["target_model"] == model_name(factory_id, row["camera_id"], row["model_version"])
    return versions


def bootstrap_camera(daemon: Daemon, fleet: list[SimulatedFactory], factory_id: str, camera_id: str,
                     chunk_s: int = 30, limit_s: int = 900) -> tuple[dg.RunRequest, dict, list]:
    """The fleet runs on, ``chunk_s`` seconds at a time, the sensors ticking after each chunk, until
    ``bootstrap_model_sensor`` requests a run for ``camera_id`` of ``factory_id``, which runs
    (``retrain_job`` then ``model_job``). Every request must be that one. Returns the request, the
    ``model_endpoint`` materialization's deployment rows and the sensor's skip reasons until then."""
    waited, waiting = 0, []
    while True:
        assert waited < limit_s, f"{factory_id} {camera_id} not bootstrapped after {limit_s} s: {waiting[-1:]}"
        run_fleet(fleet, chunk_s)
        waited += chunk_s
        daemon.discover()
        result = daemon.tick_bootstrap()
        if not result.run_requests:
            waiting.append(result.skip_reason.skip_message if result.skip_reason else "")
            continue
        [request] = result.run_requests
        assert request.tags["factory"] == factory_id and request.tags["factory/cameras"] == camera_id, request.tags
        deployed = daemon.retrain_then_deploy(request).asset_materializations_for_node("model_endpoint")
        return request, deployed[0].metadata["deployments"].value, waiting


def slot_accuracy(fdb, factory: SimulatedFactory, since, camera_id: str | None = None) -> tuple[float, set]:
    """Share of slot readings of the factory's inferences (frames after ``since``; of one camera
    when given) that match the rack its cameras showed, and the model versions that made them."""
    right = total = 0
    versions = set()
    query = {"factory_id": factory.factory_id, "frame_ts": {"$gt": since}}
    frame_ids = None
    if camera_id is not None:
        frame_ids = {f["_id"] for f in fdb.frames.find({"factory_id": factory.factory_id, "camera_id": camera_id,
                                                        "ts": {"$gt": since}}, {"_id": 1})}
    for inf in fdb.inferences.find(query):
        if frame_ids is not None and inf["frame_id"] not in frame_ids:
            continue
        versions.add(inf["model_version"])
        shown = factory.truth[inf["frame_ts"]]
        seen = {s: (v or {}).get("type") for s, v in (inf.get("slots") or {}).items()}
        right += sum(seen.get(s) == shown.get(s) for s in SLOTS)
        total += len(SLOTS)
    return right / max(total, 1), versions


def twin_follows(fdb, factory: SimulatedFactory, versions) -> None:
    """The factory's twin shows what its cameras showed at its newest frame, seen by one of its own models."""
    from factory_assets.twin.store import get_twin

    newest = fdb.frames.find_one({"factory_id": factory.factory_id}, sort=[("seq", -1)])
    observed = get_twin(fdb, factory.factory_id)["observed"]
    assert observed["frame_ts"] == newest["ts"], factory.factory_id
    assert observed["model_version"] in set(versions), factory.factory_id
    seen = {s: (v or {}).get("type") for s, v in observed["slots"].items()}
    assert seen == {s: factory.truth[newest["ts"]].get(s) for s in SLOTS}, factory.factory_id
