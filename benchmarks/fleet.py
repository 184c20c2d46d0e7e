"""A fleet of simulated factories on this machine: 1, 10 and 50 factories at 1 frame/s each (issue 19).

For each fleet size N, in a fresh FACTORY_HOME with its own embedded SecantusDB, the stack
``factory-assets up --factories N --fps 1 --no-dagster`` starts (the same services, built by
``cli.up.build_services``, started here so their process ids are known): Mosquitto, one
ingester following every factory's prefix, one ``simulate --factories N`` process, the
multi-model inference server following the registry, the live twin updater and the twin API.

Each factory's model is trained *before* the stack starts, with the project's own trainer
(``backends.local.LocalTrainer``, the one ``stock_model`` calls) on frames rendered with that
factory's own camera pose (``simulation.fleet``: random racks, the simulator's renderer, slot
labels), registered for the factory's camera and deployed through ``storage.models`` (checks
recorded as passed when its validation per-label accuracy reaches the policy's 0.90). They
are cached on disk (``--model-cache``), keyed by the vision code's version, the seed and the
factory: training 50 of them takes longer than the windows measured here.

Then, after a warm-up (every factory's twin shows an inference), over ``--minutes``:

- **frame → twin** per factory: from a frame's ``received_at`` (the ingester's clock when the
  MQTT message arrived) to the ``digital_twin`` write that shows that frame (the ``updated_at``
  of the update, read from a change stream on the twin collection). A frame the twin never
  showed (the live updater skipped it, e.g. a backlog left to the batch path) counts as
  infinitely late in the percentiles and is counted apart;
- **CPU** of each service's process tree (``/proc/<pid>/stat``) over the window; the platform's
  cost per factory is ingester + live updater + inference server + database, divided by N
  (simulator, broker and twin API reported beside it);
- the inference server's **RSS** with N models loaded; the live updater's backlog (frames
  stored but not yet read by it), sampled every 5 s.

After the window, with the stack still running:

- **sensor ticks**: one tick each of ``factory_discovery_sensor``, ``new_frames_sensor``,
  ``twin_live_sensor`` and ``bootstrap_model_sensor`` (``dg.build_sensor_context`` against the
  fleet's database, an instance with the N factories registered), timed 15 s after a first
  untimed tick, twice;
- at N = ``--join-at`` (default 10), **a new factory joins**: factory N+1 of the same fleet plan
  (its own seed, pose and clock) starts publishing (the ingester was given its prefix from the
  start; it sent nothing before), and the platform's own bootstrap path runs as Dagster's
  daemon would run it, in this process every 15 s: ``factory_discovery_sensor`` registers it,
  ``bootstrap_model_sensor`` requests its ``retrain_job`` once its frames can train a model,
  that run executes, ``retrained_model_sensor`` requests its ``model_job``, which trains,
  checks and deploys (``model_endpoint`` waits until the server answers by the model's
  name). Timed from its first stored frame to the deployment and to the first inference the
  live updater made with that model;
- **agreement** per factory: ``benchmarks/bootstrap_live.measure`` (each inference against the
  controller's own ``f/i/stock`` on stable frames, exact over the three colours, and per slot)
  over every inference of the run; one model per factory, so per model is per factory.

Prints one JSON document: per N, and a ``targets`` block. The machine is shared: the 1-minute
load average is printed with each window.

    .venv/bin/python benchmarks/fleet.py --factories 1,10,50 --minutes 3
    .venv/bin/python benchmarks/fleet.py --pretrain 50          # fill the model cache only
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATABASE = "bench_fleet"
SENSOR_GAP_S = 15.0  # factory_discovery_sensor's and bootstrap_model_sensor's interval
MIN_ACCURACY = 0.90  # ModelPolicyResource's default min_per_label_accuracy

TARGETS = {"cost_per_factory_50_over_1": 1.3, "frame_to_twin_p95_ms_at_50": 500.0,
           "new_factory_first_model_s": 180.0, "agreement_min": 0.98}


# --- pure figures -------------------------------------------------------------------------------------------------


def latency_summary(latencies_ms: list[float], missing: int = 0) -> dict:
    """p50 / p95 / max of ``latencies_ms`` where each of ``missing`` (a frame never shown) counts as
    infinitely late: a percentile that falls among them is ``None``, and so is the max when any is."""
    values = sorted(float(v) for v in latencies_ms) + [math.inf] * int(missing)

    def pick(q: float):
        if not values:
            return None
        v = values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]  # nearest rank
        return None if math.isinf(v) else round(v, 1)

    return {"frames": len(values), "not_shown": int(missing), "p50_ms": pick(0.50), "p95_ms": pick(0.95),
            "max_ms": pick(1.0)}


def kept_up(not_shown: int, backlog_end: int | None, n: int, fps: float, slack_s: float = 5.0) -> bool:
    """Whether the live path kept up with the fleet: it showed every frame of the window on the twin,
    and at the window's end it was at most ``slack_s`` seconds of frames behind."""
    return not_shown == 0 and backlog_end is not None and backlog_end <= n * fps * slack_s


def cost_ratio(per_factory_at_n: float | None, per_factory_at_1: float | None) -> float | None:
    if not per_factory_at_n or not per_factory_at_1:
        return None
    return round(per_factory_at_n / per_factory_at_1, 2)


# --- processes ----------------------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, CPU ticks user + system) of every process (``/proc/<pid>/stat``)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        table[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return table


def tree_cpu_s(table: dict, root: int) -> float:
    """CPU seconds of ``root`` and its descendants in ``table``."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            total += table[pid][1]
        todo.extend(children.get(pid, ()))
    return total / CLK_TCK


def rss_mb(pid: int) -> dict:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        pass
    return {"rss_mb": out.get("VmRSS"), "peak_rss_mb": out.get("VmHWM")}


def start_profiles(pids: dict[str, int], out_dir: Path | None) -> list[subprocess.Popen]:
    """py-spy (``pip install py-spy``) on each of ``pids`` over the window: collapsed stacks in ``out_dir``."""
    if out_dir is None:
        return []
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy is not installed (pip install py-spy): no profile", file=sys.stderr)
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "50", "--nonblocking", "--subprocesses",
                              "--format", "raw", "--output", str(out_dir / f"{name}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, pid in pids.items()]


def stop_profiles(profiles: list[subprocess.Popen]) -> None:
    for p in profiles:
        p.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    for p in profiles:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- models -------------------------------------------------------------------------------------------------------


def write_pose_dataset(out_dir: Path, pose, seed: int, n_train: int, n_valid: int) -> Path:
    """Random racks rendered by the simulator's renderer through ``pose``, in SageMaker's layout with the
    per-slot sidecar (``<split>.slots``), as ``training_manifests`` writes a factory's dataset."""
    import numpy as np

    from factory_assets.datasets.lst import LstRow, format_slots, write_lst
    from factory_assets.simulation.datasets import labels_of, random_stock
    from factory_assets.simulation.render import encode_jpeg, render_warehouse

    rng = np.random.default_rng(seed)
    index = 1
    for split, n in (("train", n_train), ("valid", n_valid)):
        img_dir = out_dir / f"{split}-imgs"
        img_dir.mkdir(parents=True, exist_ok=True)
        rows, slot_rows = [], []
        for i in range(n):
            stock = random_stock(rng)
            img = render_warehouse(stock, rng=rng, lighting=float(rng.uniform(0.6, 1.1)), pose=pose)
            name = f"{split}-{i:05d}.jpeg"
            (img_dir / name).write_bytes(encode_jpeg(img))
            rows.append(LstRow(index, tuple(labels_of(stock)), name))
            slot_rows.append((index, stock, name))
            index += 1
        write_lst(out_dir / f"{split}-annots" / f"{split}.lst", rows)
        (out_dir / f"{split}-annots" / f"{split}.slots").write_text(format_slots(slot_rows), encoding="utf-8")
    return out_dir


def pretrained(cache: Path, member, seed: int, n_train: int = 60, n_valid: int = 30):
    """The model of fleet member ``member`` (and its metrics), from the cache or trained now."""
    from factory_assets.vision.model import StockModel
    from factory_assets.vision.version import code_version

    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{code_version()}-seed{seed}-{member.factory_id}-{n_train}.npz"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        return StockModel.from_bytes(path.read_bytes()), {**json.loads(meta.read_text()), "cached": True}
    from factory_assets.backends.local import LocalTrainer, evaluate

    with tempfile.TemporaryDirectory(prefix="fleet-model-") as tmp:
        ds = write_pose_dataset(Path(tmp) / "ds", member.pose, seed=10_000 * (seed + 1) + member.number,
                                n_train=n_train, n_valid=n_valid)
        t0 = time.perf_counter()
        result = LocalTrainer().train(ds, Path(tmp) / "model", seed=0)
        train_s = time.perf_counter() - t0
        ev = evaluate(result.model, ds, "valid")
    metrics = {"model_kind": result.metrics.get("model_kind") or ev.get("model_kind"),
               "per_label_accuracy": float(ev["per_label_accuracy"]),
               "slot_accuracy": (ev.get("slots") or {}).get("slot_accuracy"),
               "train_seconds": round(train_s, 2), "train_frames": n_train}
    path.write_bytes(result.model.to_bytes())
    meta.write_text(json.dumps(metrics))
    return result.model, {**metrics, "cached": False}


def deploy_fleet_models(fdb, plan, cache: Path, seed: int, serve_url: str, camera_id: str) -> dict:
    """Register and deploy each member's model for its own camera; returns {factory: version} and timing."""
    from factory_assets.storage.models import deploy_model, register_model, set_checks
    from factory_assets.vision.version import code_version
    from factory_assets.vocabulary import DEFAULT_ENDPOINT

    versions, trained = {}, []
    for member in plan:
        model, metrics = pretrained(cache, member, seed)
        if not metrics["cached"]:
            trained.append(metrics["train_seconds"])
        register_model(fdb, model, dataset_version=f"benchmark-rendered-{member.factory_id}",
                       code_version=code_version(), metrics={"valid": metrics}, factory_id=member.factory_id,
                       camera_id=camera_id)
        passed = metrics["per_label_accuracy"] >= MIN_ACCURACY
        set_checks(fdb, model.version, passed, {"per_label_accuracy": passed, "no_regression": True})
        deploy_model(fdb, member.factory_id, camera_id, model.version, endpoint=DEFAULT_ENDPOINT, url=serve_url)
        versions[member.factory_id] = model.version
    return {"versions": versions, "trained_now": len(trained), "train_seconds_each": trained}


# --- the stack ----------------------------------------------------------------------------------------------------


class Stack:
    """``up``'s services for a fleet (no Dagster), each in its own process group, logs under ``home/logs``."""

    def __init__(self, home: Path, env: dict, n: int, fps: float, seed: int, extra_prefixes: int = 0):
        from factory_assets.cli.up import build_services, free_port
        from factory_assets.simulation.broker import QueueLimits
        from factory_assets.simulation.fleet import fleet_plan

        self.mqtt_port, self.serve_port = free_port(), free_port()
        self.env = dict(env, FACTORY_ENDPOINT_URL=self.serve_url)
        prefixes = [m.prefix_spec for m in fleet_plan(n + extra_prefixes, seed)] if extra_prefixes else None
        self.services = build_services(self.mqtt_port, free_port(), self.serve_port, fps, seed, dagster=False,
                                       queue=QueueLimits.for_outage(fps=fps * n), factories=n, prefixes=prefixes)
        self.log_dir = home / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)

    @property
    def serve_url(self) -> str:
        return f"http://127.0.0.1:{self.serve_port}"

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def start(self) -> None:
        from factory_assets.cli.up import wait_port

        for svc in self.services:
            with open(self.log_dir / f"{svc.name}.log", "ab", buffering=0) as out:
                svc.proc = subprocess.Popen(svc.argv, cwd=ROOT, env={**self.env, **svc.env}, start_new_session=True,
                                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            if svc.ready_port and not wait_port(svc.ready_port, 90, svc.proc):
                raise RuntimeError(f"{svc.name} did not come up; see {self.log_dir / (svc.name + '.log')}")

    def pids(self) -> dict[str, int]:
        return {svc.name: svc.proc.pid for svc in self.services if svc.proc}

    def stop(self) -> None:
        for svc in reversed(self.services):
            if svc.proc and svc.proc.poll() is None:
                try:
                    os.killpg(svc.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for svc in reversed(self.services):
            if not svc.proc:
                continue
            try:
                svc.proc.wait(15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(svc.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                svc.proc.wait()


class TwinWatcher(threading.Thread):
    """Every ``digital_twin`` write that shows a new frame: frame id -> (factory, the write's
    ``updated_at`` as epoch seconds, when this reader saw it)."""

    def __init__(self, fdb):
        super().__init__(daemon=True, name="twin-watcher")
        self.fdb = fdb
        self.seen: dict = {}
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        try:
            with self.fdb.twin.watch(max_await_time_ms=200) as stream:
                self.ready.set()
                while not self.stop_event.is_set():
                    change = stream.try_next()
                    if change is None:
                        continue
                    t_seen = time.time()
                    fields = ((change.get("updateDescription") or {}).get("updatedFields")
                              or change.get("fullDocument") or {})
                    observed = fields.get("observed")
                    if not isinstance(observed, dict) or "frame_id" not in observed:
                        continue
                    written = fields.get("updated_at")
                    at = written.timestamp() if isinstance(written, datetime) else t_seen
                    self.seen.setdefault(observed["frame_id"], ((change.get("documentKey") or {}).get("_id"), at,
                                                                t_seen))
        except Exception as exc:  # noqa: BLE001 - reported in the result
            self.error = f"{type(exc).__name__}: {exc}"
            self.ready.set()


def live_backlog(fdb) -> int:
    from factory_assets.storage.frames import FrameSequence
    from factory_assets.twin.live import load_cursor

    return FrameSequence(fdb).horizon() - load_cursor(fdb, "twin-live")


# --- sensors ------------------------------------------------------------------------------------------------------


class Sensors:
    """The fleet's sensors ticked as Dagster's daemon ticks them, against the benchmark's database."""

    def __init__(self, uri: str, serve_url: str, factories: list[str]):
        import dagster as dg

        from factory_assets.defs.camera.arrival import raw_frames_sensor  # noqa: F401 - loads the defs' modules
        from factory_assets.defs.fleet import factory_discovery_sensor
        from factory_assets.defs.models.resources import EndpointResource
        from factory_assets.defs.partitions import FACTORY_DIMENSION
        from factory_assets.defs.resources import MongoResource
        from factory_assets.defs.twin.sensors import (RetrainWindow, bootstrap_model_sensor, new_frames_sensor,
                                                      twin_live_sensor)

        self.dg = dg
        self.instance = dg.DagsterInstance.ephemeral()
        self.instance.add_dynamic_partitions(FACTORY_DIMENSION, list(factories))
        self.resources = {"mongo": MongoResource(uri=uri, database=DATABASE),
                          "endpoint": EndpointResource(url=serve_url), "retrain_window": RetrainWindow()}
        self.sensors = {"factory_discovery_sensor": factory_discovery_sensor, "new_frames_sensor": new_frames_sensor,
                        "twin_live_sensor": twin_live_sensor, "bootstrap_model_sensor": bootstrap_model_sensor}
        self.cursors: dict = {}

    def tick(self, name: str):
        """One tick; returns (result, milliseconds). Dynamic partition requests are applied, as the daemon does."""
        t0 = time.perf_counter()
        with self.dg.build_sensor_context(cursor=self.cursors.get(name), instance=self.instance,
                                          resources=self.resources) as ctx:
            result = self.sensors[name](ctx)
        ms = (time.perf_counter() - t0) * 1000
        self.cursors[name] = getattr(result, "cursor", None) or self.cursors.get(name)
        for request in getattr(result, "dynamic_partitions_requests", None) or []:
            self.instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        return result, ms

    def timed_rounds(self, rounds: int = 2) -> dict:
        for name in self.sensors:  # the first ticks set the cursors (not timed)
            self.tick(name)
        times: dict[str, list[float]] = {name: [] for name in self.sensors}
        for _ in range(rounds):
            time.sleep(SENSOR_GAP_S)  # what arrives between two ticks of the discovery and bootstrap sensors
            for name in self.sensors:
                times[name].append(round(self.tick(name)[1], 1))
        return {name: {"ms": ms, "max_ms": max(ms)} for name, ms in times.items()}


# --- a new factory ------------------------------------------------------------------------------------------------


def join_new_factory(fdb, stack: Stack, sensors: Sensors, n: int, seed: int, fps: float, minutes: float,
                     camera_id: str) -> dict:
    """Factory n+1 starts publishing; the platform's bootstrap path (sensors, then its runs) gives it a model."""
    from factory_assets.defs.partitions import FACTORY_DIMENSION
    from factory_assets.simulation.fleet import fleet_plan
    from factory_assets.storage.frames import wait_until
    from factory_assets.vocabulary import DEFAULT_ENDPOINT

    member = fleet_plan(n + 1, seed)[n]
    factory = member.factory_id
    out: dict = {"factory": factory, "seed": member.seed, "camera_pose": member.pose.describe()}
    os.environ.update({k: stack.env[k] for k in ("MONGODB_URI", "MONGODB_DATABASE", "FACTORY_HOME",
                                                  "FACTORY_ENDPOINT_URL")})
    from factory_assets.definitions import defs  # its resources read the environment set above

    log = open(stack.log_dir / "new-factory-simulator.log", "ab", buffering=0)
    sim = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--simulate-one", str(n + 1),
                            "--seed", str(seed), "--fps", f"{fps:g}", "--mqtt", stack.mqtt_url], cwd=ROOT,
                           env=stack.env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    started = time.time()
    deadline = time.monotonic() + minutes * 60
    ticks, notes, version = 0, [], None
    try:
        while time.monotonic() < deadline and version is None:
            next_tick = time.monotonic() + SENSOR_GAP_S
            sensors.tick("factory_discovery_sensor")
            if "discovered_at" not in out and sensors.instance.has_dynamic_partition(FACTORY_DIMENSION, factory):
                out["discovered_at"] = time.time()
            result, _ = sensors.tick("bootstrap_model_sensor")
            ticks += 1
            mine = [r for r in (getattr(result, "run_requests", None) or []) if r.tags.get("factory") == factory]
            if mine:
                version = _run_bootstrap(defs, sensors, mine[0], factory, out)
                if version is None:
                    notes.append("the requested runs deployed no model")
                continue
            time.sleep(max(0.0, next_tick - time.monotonic()))
        if version is not None:
            by_its_model = {"factory_id": factory, "model_version": version}
            wait_until(lambda: fdb.inferences.find_one(by_its_model) is not None, 90, 0.5)
    finally:
        try:
            os.killpg(sim.pid, signal.SIGTERM)
            sim.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(sim.pid, signal.SIGKILL)
    first = fdb.frames.find_one({"factory_id": factory}, {"received_at": 1, "camera_id": 1}, sort=[("seq", 1)])
    if first is None:
        return {**out, "error": "no frame of the new factory was stored", "started_at": started}
    t0 = first["received_at"].timestamp()
    out.update({"publishing_started_s_before_first_frame": round(t0 - started, 1), "sensor_ticks": ticks,
                "model_version": version, "notes": notes,
                "frames_stored": fdb.frames.count_documents({"factory_id": factory})})
    for key in ("discovered_at", "requested_at", "retrain_run_done_at", "deployed_at"):
        if key in out:
            out[key.replace("_at", "_s_after_first_frame")] = round(out.pop(key) - t0, 1)
    if version is not None:
        deployment = fdb.endpoints.find_one({"name": f"{DEFAULT_ENDPOINT}/{factory}/{camera_id}"}) or {}
        out["deployment_status"] = deployment.get("status")
        inf = fdb.inferences.find_one({"factory_id": factory, "model_version": version}, sort=[("created_at", 1)])
        if inf is not None:
            out["model_kind"] = inf.get("model_kind") or "presence"
            out["first_inference_s_after_first_frame"] = round(inf["created_at"].timestamp() - t0, 1)
    else:
        from factory_assets.twin.drift import bootstrap_readiness

        out["readiness_at_deadline"] = bootstrap_readiness(fdb, factory_id=factory).describe()
    return out


def _run_bootstrap(defs, sensors: Sensors, request, factory: str, out: dict) -> str | None:
    """``retrain_job`` for the request, then the ``model_job`` that ``retrained_model_sensor`` asks for."""
    dg = sensors.dg
    from factory_assets.defs.twin.sensors import retrained_model_sensor

    out["requested_at"] = time.time()
    out["bootstrap_reason"] = request.tags.get("factory/reason")
    t0 = time.perf_counter()
    datasets = defs.resolve_job_def("retrain_job").execute_in_process(instance=sensors.instance, tags=request.tags,
                                                                     raise_on_error=False)
    out["retrain_run_s"] = round(time.perf_counter() - t0, 1)
    out["retrain_run_done_at"] = time.time()
    if not datasets.success:
        return None
    requests = retrained_model_sensor(dg.build_run_status_sensor_context(
        sensor_name="retrained_model_sensor", dagster_instance=sensors.instance, dagster_run=datasets.dagster_run,
        dagster_event=datasets.get_run_success_event()))
    mine = [r for r in requests or [] if r.tags.get("factory") == factory]
    if not mine:
        return None
    t0 = time.perf_counter()
    models = defs.resolve_job_def("model_job").execute_in_process(
        instance=sensors.instance, partition_key=mine[0].partition_key, tags=mine[0].tags, raise_on_error=False)
    out["model_run_s"] = round(time.perf_counter() - t0, 1)
    checks = {e.check_name: e.passed for e in models.get_asset_check_evaluations()}
    out["checks"] = checks
    deployed = models.asset_materializations_for_node("model_endpoint") if models.success else []
    if not deployed:
        return None
    out["deployed_at"] = time.time()
    return deployed[0].metadata["model_version"].value


# --- one fleet size -----------------------------------------------------------------------------------------------


def agreement_by_factory(fdb, factories: list[str]) -> dict:
    """Per factory of ``factories`` (and any other that had a model: reported, not rated)."""
    spec = importlib.util.spec_from_file_location("bootstrap_live", ROOT / "benchmarks" / "bootstrap_live.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    measured = module.measure(fdb)
    owners = {d["_id"]: d.get("factory_id") for d in fdb.models.find({}, {"factory_id": 1})}
    per_factory = {}
    for m in measured.get("models", []):
        per_factory[owners.get(m["model_version"], m["model_version"])] = {
            "agreement_exact": m["agreement_exact"], "stable_frames": m["stable_frames"],
            "per_slot_accuracy": m["per_slot_accuracy"], "inferences": m["inferences"]}
    fleet = [per_factory.get(f) or {"agreement_exact": None, "stable_frames": 0} for f in factories]
    rated = [v["agreement_exact"] for v in fleet if v["agreement_exact"] is not None]
    return {"min": min(rated) if rated else None, "factories": len(factories), "factories_rated": len(rated),
            "factories_at_or_above_98pct": sum(a >= TARGETS["agreement_min"] for a in rated),
            "stable_frames_min": min((v["stable_frames"] for v in fleet), default=None),
            "per_factory": per_factory}


def run_fleet_size(n: int, args) -> dict:
    from factory_assets.simulation.fleet import fleet_plan
    from factory_assets.storage.embedded import EmbeddedMongo
    from factory_assets.storage.frames import FrameSequence, wait_until
    from factory_assets.storage.mongo import connect
    from factory_assets.vocabulary import DEFAULT_CAMERA_ID

    home = Path(tempfile.mkdtemp(prefix=f"bench-fleet-{n}-"))
    embedded = EmbeddedMongo(home)
    status = embedded.start(port=0)
    env = {**os.environ, "MONGODB_URI": status.uri, "MONGODB_DATABASE": DATABASE, "FACTORY_HOME": str(home),
           "DAGSTER_HOME": str(home / "dagster_home")}
    joins = n == args.join_at
    stack = Stack(home, env, n, args.fps, args.seed, extra_prefixes=1 if joins else 0)
    fdb = connect(status.uri, DATABASE)
    plan = fleet_plan(n, args.seed)
    factories = [m.factory_id for m in plan]
    out: dict = {"factories": n, "fps_each": args.fps}
    t0 = time.perf_counter()
    models = deploy_fleet_models(fdb, plan, args.model_cache, args.seed, stack.serve_url, DEFAULT_CAMERA_ID)
    out["models"] = {"deployed": len(models["versions"]), "trained_now": models["trained_now"],
                     "register_and_deploy_s": round(time.perf_counter() - t0, 1)}
    watcher = TwinWatcher(fdb)
    try:
        stack.start()
        watcher.start()
        watcher.ready.wait(30)
        t0 = time.monotonic()
        observed = {"_id": {"$in": factories}, "observed.model_version": {"$exists": True}}
        warm = wait_until(lambda: fdb.twin.count_documents(observed) >= n, 120 + 3 * n, 1.0)
        out["warm_up_s"] = round(time.monotonic() - t0, 1)
        if not warm:
            out["warm_up_error"] = (f"only {fdb.twin.count_documents({'observed.model_version': {'$exists': True}})} "
                                    f"of {n} twins showed an inference")
        camera_ids = fdb.frames.distinct("camera_id")
        if camera_ids != [DEFAULT_CAMERA_ID]:
            out["camera_ids"] = camera_ids
        time.sleep(10)  # the live updater past the warm-up's backlog
        # --- the window
        pids = stack.pids()
        backlog: list[int] = []
        profiles = start_profiles({k: v for k, v in {**pids, "database": status.pid}.items()
                                   if k in ("database", "twin-updater", "ingester", "inference-server")},
                                  args.profile / f"n{n}" if args.profile else None)
        before, seq0, load0, wall0, own0 = proc_table(), FrameSequence(fdb).horizon(), load_average(), time.time(), \
            os.times()
        window_end = time.monotonic() + args.minutes * 60
        while time.monotonic() < window_end:
            backlog.append(live_backlog(fdb))
            time.sleep(min(5.0, max(0.0, window_end - time.monotonic())))
        after, seq1, load1, wall1, own1 = proc_table(), FrameSequence(fdb).horizon(), load_average(), time.time(), \
            os.times()
        window_s = wall1 - wall0
        stop_profiles(profiles)
        server_mem = rss_mb(pids["inference-server"])
        live_mem = rss_mb(pids["twin-updater"])
        db_mem = rss_mb(status.pid)
        cpu = {name: round(tree_cpu_s(after, pid) - tree_cpu_s(before, pid), 2) for name, pid in pids.items()}
        cpu["database"] = round(tree_cpu_s(after, status.pid) - tree_cpu_s(before, status.pid), 2)
        cpu["benchmark_process"] = round((own1.user + own1.system) - (own0.user + own0.system), 2)
        wait_until(lambda: live_backlog(fdb) <= 0 or FrameSequence(fdb).horizon() > seq1 + 5 * n, 30, 0.5)
        time.sleep(2)
        out["window"] = {"seconds": round(window_s, 1), "load_average_start": load0, "load_average_end": load1}
        # --- frame -> twin
        per_factory: dict[str, list] = {f: [] for f in factories}
        missing: dict[str, int] = {f: 0 for f in factories}
        stored = 0
        for frame in fdb.frames.find({"seq": {"$gt": seq0, "$lte": seq1}}, {"received_at": 1, "factory_id": 1}):
            f = frame.get("factory_id")
            if f not in per_factory:
                continue
            stored += 1
            shown = watcher.seen.get(frame["_id"])
            if shown is None:
                missing[f] += 1
            else:
                per_factory[f].append((shown[1] - frame["received_at"].timestamp()) * 1000)
        pooled = latency_summary([v for vs in per_factory.values() for v in vs], sum(missing.values()))
        each = {f: latency_summary(per_factory[f], missing[f]) for f in factories}
        p95s = [s["p95_ms"] if s["p95_ms"] is not None else math.inf for s in each.values()]
        worst = max(factories, key=lambda f: p95s[factories.index(f)])
        out["frame_to_twin"] = {
            **pooled, "per_factory_p95_ms_max": None if math.isinf(max(p95s)) else round(max(p95s), 1),
            "per_factory_p95_ms_median": round(sorted(p95s)[len(p95s) // 2], 1)
            if not math.isinf(sorted(p95s)[len(p95s) // 2]) else None,
            "p95_ms_of_frames_shown": latency_summary([v for vs in per_factory.values() for v in vs])["p95_ms"],
            "worst_factory": worst, "worst_factory_figures": each[worst],
            "watcher_error": watcher.error}
        out["frames"] = {"stored_in_window": stored, "stored_per_s": round(stored / window_s, 2),
                         "expected_per_s": n * args.fps,
                         "live_backlog_max": max(backlog, default=None), "live_backlog_end": backlog[-1] if backlog
                         else None}
        out["frames"]["live_path_kept_up"] = kept_up(pooled["not_shown"], out["frames"]["live_backlog_end"], n,
                                                     args.fps)
        platform = cpu["ingester"] + cpu["twin-updater"] + cpu["inference-server"] + cpu["database"]
        out["cpu"] = {
            "seconds": cpu,
            "share_of_a_core": {k: round(v / window_s, 3) for k, v in cpu.items()},
            "platform_share_of_a_core": round(platform / window_s, 3),
            "platform_per_factory_share_of_a_core": round(platform / window_s / n, 4),
            "platform_ms_per_frame": round(platform * 1000 / stored, 2) if stored else None,
            "platform_ms_per_frame_shown": round(platform * 1000 / (stored - pooled["not_shown"]), 2)
            if stored > pooled["not_shown"] else None}
        out["memory"] = {"inference_server": server_mem, "live_updater": live_mem, "database": db_mem}
        # --- sensors, the new factory, agreement
        sensors = Sensors(status.uri, stack.serve_url, factories)
        out["sensor_tick"] = sensors.timed_rounds(args.sensor_rounds)
        if joins:
            out["new_factory"] = join_new_factory(fdb, stack, sensors, n, args.seed, args.fps, args.join_minutes,
                                                  DEFAULT_CAMERA_ID)
        out["agreement"] = agreement_by_factory(fdb, factories)
    finally:
        watcher.stop_event.set()
        stack.stop()
        embedded.stop()
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
        else:
            out["home"] = str(home)
    return out


def targets(results: dict) -> dict:
    by_n = {r["factories"]: r for r in results}
    out = {}
    one, fifty = by_n.get(1), by_n.get(50)
    if one and fifty:
        ratio = cost_ratio(fifty["cpu"]["platform_per_factory_share_of_a_core"],
                           one["cpu"]["platform_per_factory_share_of_a_core"])
        # a lower cost per factory only counts when the work was done: every frame shown, no growing backlog
        out["cost_per_factory_50_over_1"] = {"value": ratio, "target": TARGETS["cost_per_factory_50_over_1"],
                                             "kept_up_at_50": fifty["frames"]["live_path_kept_up"],
                                             "met": ratio is not None and fifty["frames"]["live_path_kept_up"]
                                             and ratio <= TARGETS["cost_per_factory_50_over_1"]}
    if fifty:
        p95 = fifty["frame_to_twin"]["per_factory_p95_ms_max"]
        out["frame_to_twin_p95_ms_at_50"] = {"value": p95, "pooled_p95_ms": fifty["frame_to_twin"]["p95_ms"],
                                             "target": TARGETS["frame_to_twin_p95_ms_at_50"],
                                             "met": p95 is not None and p95 <= TARGETS["frame_to_twin_p95_ms_at_50"]}
    joined = [r["new_factory"] for r in results if "new_factory" in r]
    if joined:
        s = joined[0].get("deployed_s_after_first_frame")
        out["new_factory_first_model_s"] = {"value": s, "first_inference_s": joined[0].get(
            "first_inference_s_after_first_frame"), "target": TARGETS["new_factory_first_model_s"],
            "met": s is not None and s <= TARGETS["new_factory_first_model_s"]}
    worst = [r["agreement"]["min"] for r in results if r.get("agreement", {}).get("min") is not None]
    if worst:
        out["agreement_min"] = {"value": min(worst), "target": TARGETS["agreement_min"],
                                "met": all(r["agreement"]["factories_at_or_above_98pct"] == r["factories"]
                                           for r in results)}
    return out


def simulate_one(k: int, mqtt_url: str, seed: int, fps: float) -> int:
    """Factory ``k`` of the fleet plan alone, at ``up``'s rates (the factory that joins)."""
    from factory_assets.cli.up import SIMULATOR_CHANGE_EVERY_S, SIMULATOR_TIME_SCALE
    from factory_assets.simulation.factory import Timings
    from factory_assets.simulation.fleet import fleet_plan
    from factory_assets.simulation.publisher import run_simulation
    from factory_assets.vocabulary import CRANE_TRAVEL_S

    member = fleet_plan(k, seed)[k - 1]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    timings = Timings(crane_travel_s=tuple(s / SIMULATOR_TIME_SCALE for s in CRANE_TRAVEL_S),
                      scale=SIMULATOR_TIME_SCALE)
    result = run_simulation(mqtt_url, fps=fps, seed=member.seed, factory_id=member.factory_id, prefix=member.prefix,
                            pose=member.pose, clock_offset_s=member.clock_offset_s,
                            change_every_s=SIMULATOR_CHANGE_EVERY_S, timings=timings, stop_event=stop)
    print(f"{member.describe()}: {result.frames} frames, {result.dropped_frames} dropped", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--factories", default="1,10,50", help="fleet sizes, comma-separated")
    parser.add_argument("--minutes", type=float, default=3.0, help="measurement window per fleet size")
    parser.add_argument("--fps", type=float, default=1.0, help="frames per second of each factory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--join-at", type=int, default=10, help="the fleet size a new factory joins (0: none)")
    parser.add_argument("--join-minutes", type=float, default=12.0, help="how long the new factory may take")
    parser.add_argument("--sensor-rounds", type=int, default=2)
    parser.add_argument("--model-cache", type=Path, default=None,
                        help="pre-trained models (default FACTORY_HOME/benchmarks/fleet-models)")
    parser.add_argument("--pretrain", type=int, default=None, metavar="N", help="fill the cache for N factories, exit")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="py-spy the database, live updater, ingester and server over each window "
                             "(collapsed stacks)")
    parser.add_argument("--keep", action="store_true", help="keep each run's FACTORY_HOME (database, logs)")
    parser.add_argument("--simulate-one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mqtt", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.simulate_one:
        return simulate_one(args.simulate_one, args.mqtt, args.seed, args.fps)
    from factory_assets import config

    args.model_cache = args.model_cache or config.factory_home() / "benchmarks" / "fleet-models"
    sizes = [int(s) for s in args.factories.split(",") if s.strip()]
    if args.join_at == 1:
        parser.error("--join-at must be a fleet of 2 or more (a lone factory has no prefix to join beside)")
    if args.pretrain:
        from factory_assets.simulation.fleet import fleet_plan

        t0 = time.perf_counter()
        trained = [pretrained(args.model_cache, m, args.seed)[1] for m in fleet_plan(args.pretrain, args.seed)]
        print(json.dumps({"pretrained": len(trained), "trained_now": sum(not m["cached"] for m in trained),
                          "seconds": round(time.perf_counter() - t0, 1),
                          "per_label_accuracy_min": min(m["per_label_accuracy"] for m in trained),
                          "load_average": load_average()}))
        return 0
    started = datetime.now(timezone.utc)
    results = []
    for n in sizes:
        print(f"[fleet] {n} factories ...", file=sys.stderr, flush=True)
        results.append(run_fleet_size(n, args))
        print(f"[fleet] {n} factories: {json.dumps(results[-1], default=str)[:400]}", file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "fleet", "started": started.isoformat(), "cpu_count": os.cpu_count(),
                      "minutes": args.minutes, "fps_each": args.fps, "seed": args.seed, "results": results,
                      "targets": targets(results)}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
