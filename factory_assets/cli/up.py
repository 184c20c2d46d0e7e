"""``factory-assets up``: the whole stack in one command, stopped cleanly by Ctrl-C.

Starts (in order) the embedded MongoDB (unless MONGODB_URI is set), an MQTT
broker, the MQTT ingester, the simulated factory, the inference server, the live
twin updater and ``dagster dev``. Each child runs in its own process group; on
Ctrl-C / SIGTERM they are stopped in reverse order (SIGTERM, then SIGKILL after
a grace period), and the embedded MongoDB is stopped if this command started it.
A service that exits meanwhile is restarted with backoff (``cli/supervisor.py``);
one in a crash loop stops the stack with the path of its log. The embedded MongoDB is
restarted on its port if its process dies.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from factory_assets import config
from factory_assets.cli.supervisor import CrashLoop, DatabaseWatch, Supervisor
from factory_assets.vocabulary import DEFAULT_ENDPOINT


def free_port(preferred: int = 0) -> int:
    """``preferred`` when it is free on 127.0.0.1, else any free port (0: any)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return s.getsockname()[1]  # ``preferred``, or the one picked for 0
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


@dataclass
class Service:
    name: str
    argv: list[str]
    ready_port: int | None = None  # wait until this TCP port accepts connections
    env: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    restarts: int = 0  # by the supervisor, after the service exited


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    """Until 127.0.0.1:``port`` accepts connections (False on timeout, or when ``proc`` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def dagster_home() -> Path:
    home = Path(os.environ.get("DAGSTER_HOME") or config.factory_home() / "dagster_home")
    home.mkdir(parents=True, exist_ok=True)
    yaml = home / "dagster.yaml"
    if not yaml.exists():
        yaml.write_text("telemetry:\n  enabled: false\n")
    return home


# The code location `dagster dev` loads: the installed module, so `factory-assets up` works from
# any directory after `pip install .` (workspace.yaml names the same module, for the repository).
DAGSTER_TARGET = ["-m", "factory_assets.definitions"]

# The simulated factory's rates under `up` (docs/twin.md, "The first model"): its schedule looks for
# work about every 4 s, its robot, oven and sorting line take 0.6 of the simulator's default durations
# (a raw piece stored every ~30-50 s, the input station's realistic pace), its crane the modelled
# CRANE_TRAVEL_S (6-18 s: --crane-travel is given before the scale).
SIMULATOR_CHANGE_EVERY_S = 4.0
SIMULATOR_TIME_SCALE = 0.6


def build_services(mqtt_port: int, dagster_port: int, serve_port: int, fps: float, seed: int,
                   dagster: bool = True, dagster_services: list | None = None, *, mqtt_url: str | None = None,
                   queue=None, camera_fps: float | None = None, simulator: bool = True,
                   prefixes: list[str] | None = None, ingest_shards: int = 1, factories: int = 1,
                   cameras: int = 1) -> list[Service]:
    """The services ``up`` starts, in order. ``mqtt_url``: a broker of the user's own (none is
    started; the URL carries no password: children read ``FACTORY_MQTT_PASSWORD``). ``queue``:
    the started broker's offline queue (default sized for 30 minutes at ``fps``). ``camera_fps``:
    what the ingester asks the camera for (default ``fps``, the simulator's rate). ``prefixes``:
    the factories (``PREFIX[=FACTORY_ID]``), one simulator each; ``ingest_shards``: ingester
    processes sharing them (``ingest/shards.py``; ``ValueError`` when they cannot be split).
    ``factories`` > 1: a simulated fleet (``simulation/fleet.py``), factory-k under ``fleet/factory-k/``,
    simulated by one ``simulate --factories N`` (each factory with its own seed, camera pose and clock).
    ``cameras`` > 1: each simulated factory has that many cameras (``simulate --cameras K``)."""
    from factory_assets.simulation.broker import QueueLimits, queue_argv

    py = sys.executable
    cli = [py, "-m", "factory_assets.cli"]
    own_broker = mqtt_url is None
    mqtt_url = mqtt_url or f"mqtt://127.0.0.1:{mqtt_port}"
    queue = queue or QueueLimits.for_outage(fps=fps)
    camera_fps = fps if camera_fps is None else camera_fps
    if factories > 1 and not prefixes:
        from factory_assets.simulation.fleet import fleet_plan

        prefixes = [m.prefix_spec for m in fleet_plan(factories, seed)]
    services = []
    if own_broker:
        services.append(Service("mqtt-broker", [py, "-m", "factory_assets.simulation.broker", "--port",
                                                str(mqtt_port), *queue_argv(queue)], mqtt_port))
    ingest = cli + ["ingest", "mqtt", "--url", mqtt_url, "--camera-fps", f"{camera_fps:g}"]
    ingest += [arg for spec in prefixes or () for arg in ("--prefix", spec)]
    if ingest_shards > 1:  # each shard gets the whole list and takes its own share of it
        from factory_assets.ingest.shards import split_prefixes
        from factory_assets.vocabulary.mqtt import TopicPrefix

        split_prefixes([TopicPrefix.parse(spec) for spec in prefixes or ()], ingest_shards)  # refused here, not in k children
        services += [Service(f"ingester-{k}", ingest + ["--shards", str(ingest_shards), "--shard", str(k)])
                     for k in range(ingest_shards)]
    else:
        services.append(Service("ingester", ingest))
    if simulator:
        from factory_assets.vocabulary import CRANE_TRAVEL_S

        simulate = cli + ["simulate", "--mqtt", mqtt_url, "--fps", f"{fps:g}",
                          "--change-every", f"{SIMULATOR_CHANGE_EVERY_S:g}", "--time-scale", f"{SIMULATOR_TIME_SCALE:g}",
                          "--crane-travel", *(f"{s / SIMULATOR_TIME_SCALE:g}" for s in CRANE_TRAVEL_S)]
        if cameras > 1:  # further cameras publish i/cam with their camera_id: the ingester needs nothing more
            simulate += ["--cameras", str(cameras)]
        if factories > 1:  # the whole fleet in one process, each factory with its own pose and clock
            services.append(Service("simulator", simulate + ["--seed", str(seed), "--factories", str(factories)]))
        elif not prefixes:
            services.append(Service("simulator", simulate + ["--seed", str(seed)]))
        for j, spec in enumerate(prefixes if factories <= 1 and prefixes else ()):  # one factory under each prefix
            from factory_assets.vocabulary.mqtt import TopicPrefix

            prefix = TopicPrefix.parse(spec)
            services.append(Service(f"simulator-{j}", simulate + ["--seed", str(seed + j), "--prefix", prefix.prefix,
                                                                   *(["--factory-id", prefix.factory_id]
                                                                     if prefix.factory_id else [])]))
    services += extra_services(cli, serve_port=serve_port, mqtt_url=mqtt_url, prefixes=prefixes)
    if not dagster:
        return services
    if dagster_services is not None:  # --dagster-postgres: code server, webserver, daemon (cli/dagster_topology.py)
        return services + dagster_services
    services.append(Service("dagster", [py, "-m", "dagster", "dev", *DAGSTER_TARGET, "-h", "127.0.0.1",
                                        "-p", str(dagster_port)], dagster_port,
                            env={"DAGSTER_HOME": str(dagster_home())}))
    return services


def broker_url_for_children(url: str, env: dict) -> str:
    """The user's broker URL without its password, which goes to ``env["FACTORY_MQTT_PASSWORD"]``
    (children's command lines are visible to every user of the machine)."""
    from urllib.parse import quote

    from factory_assets.vocabulary.mqtt import DEFAULT_PASSWORD_ENV, MqttTarget

    target = MqttTarget.parse(url, password_env="\0none")
    if target.password is not None:
        env[DEFAULT_PASSWORD_ENV] = target.password
    login = f"{quote(target.username, safe='')}@" if target.username else ""
    return f"{'mqtts' if target.tls else 'mqtt'}://{login}{target.host}:{target.port}"


def extra_services(cli: list[str], *, serve_port: int, mqtt_url: str,
                   prefixes: list[str] | None = None) -> list[Service]:
    """Services of later domains (inference server, live twin updater) when present."""
    import importlib.util

    services = []
    if importlib.util.find_spec("factory_assets.serving.server"):
        services.append(Service("inference-server", cli + ["serve", "--endpoint", DEFAULT_ENDPOINT,
                                                           "--port", str(serve_port)], serve_port))
    if importlib.util.find_spec("factory_assets.twin.live"):
        services.append(Service("twin-updater", cli + ["twin", "live", "--endpoint-url",
                                                       f"http://127.0.0.1:{serve_port}"]))
    if importlib.util.find_spec("factory_assets.api"):
        api_port = free_port(8000)
        services.append(Service("twin-api", cli + ["api", "--port", str(api_port), "--mqtt", mqtt_url]
                                + [arg for spec in prefixes or () for arg in ("--prefix", spec)], api_port))
    return services


def _say(text: str) -> None:
    print(f"[up] {text}", flush=True)


def service_links(services: list[Service]) -> dict[str, str]:
    """Where a person points a browser or a client, for the services that serve HTTP."""
    names = {"inference-server": "inference server (/ping)", "twin-api": "twin page & API (/docs)"}
    return {names[s.name]: f"http://127.0.0.1:{s.ready_port}" for s in services
            if s.name in names and s.ready_port}


class StatusDisplay:
    """The refreshing console: a rich Live panel on a terminal, a plain line every 30 s elsewhere."""

    def __init__(self, services, mongo_uri: str, links: dict, log_dir, verbose: bool = False):
        from factory_assets.cli.console import StatusProbe

        self.services = services
        self.links = links
        self.log_dir = log_dir
        self.verbose = verbose
        self.probe = StatusProbe(mongo_uri, config.database_name())
        self._live = None
        self._last_read = 0.0
        self._last_plain = 0.0
        self._status = None

    def start(self) -> "StatusDisplay":
        from rich.console import Console

        console = Console()
        if console.is_terminal and not self.verbose:
            from rich.live import Live

            self._live = Live(console=console, refresh_per_second=2, transient=False)
            self._live.start()
        else:
            for name, url in self.links.items():
                _say(f"{name}: {url}")
            _say(f"logs: {self.log_dir}  (Ctrl-C stops everything)")
        self.refresh()
        return self

    def refresh(self) -> None:
        from factory_assets.cli.console import plain_line, render

        now = time.monotonic()
        if self._status is None or now - self._last_read >= 2.0:
            self._status = self.probe.read(now)
            self._last_read = now
        if self._live is not None:
            self._live.update(render(self.services, self._status, self.links, self.log_dir))
        elif not self.verbose and now - self._last_plain >= 30.0:
            print(plain_line(self.services, self._status), flush=True)
            self._last_plain = now

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
        self.probe.close()


def stop_all(services: list[Service], grace: float = 10.0) -> None:
    for svc in reversed(services):
        if svc.proc and svc.proc.poll() is None:
            try:
                os.killpg(svc.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for svc in reversed(services):
        if not svc.proc:
            continue
        try:
            svc.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            _say(f"{svc.name} did not stop in {grace:.0f}s; killing it")
            try:
                os.killpg(svc.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            svc.proc.wait()
        _say(f"stopped {svc.name}")


def up(args) -> int:
    from factory_assets.storage.embedded import EmbeddedMongo
    from factory_assets.storage.mongo import redact_uri

    if args.factories != 1:  # a simulated fleet: its factories' prefixes (docs/fleet.md)
        from factory_assets.simulation.fleet import fleet_plan

        if args.prefix:
            _say("error: --factories N simulates its own factories under fleet/factory-k/; leave out --prefix")
            return 2
        try:
            args.prefix = [m.prefix_spec for m in fleet_plan(args.factories, args.seed)]
        except ValueError as exc:
            _say(f"error: --factories {args.factories}: {exc}")
            return 2
    from factory_assets.simulation.fleet import MAX_CAMERAS

    if not 1 <= args.cameras <= MAX_CAMERAS:
        _say(f"error: --cameras {args.cameras}: a factory has 1 to {MAX_CAMERAS} cameras")
        return 2
    try:  # the factories must split into the shards asked for: said before anything starts
        from factory_assets.ingest.shards import split_prefixes
        from factory_assets.vocabulary.mqtt import TopicPrefix

        split_prefixes([TopicPrefix.parse(spec) for spec in args.prefix or ()], args.ingest_shards)
    except ValueError as exc:
        _say(f"error: --ingest-shards {args.ingest_shards}: {exc}")
        return 2
    os.chdir(config.project_root())
    env = dict(os.environ)
    started_db = False
    embedded = EmbeddedMongo()
    using_embedded = not env.get("MONGODB_URI")
    if using_embedded:
        started_db = not embedded.status().running
        status = embedded.start()
        env["MONGODB_URI"] = status.uri
        _say(f"embedded MongoDB: {status.uri}")
    else:
        _say(f"MongoDB: {redact_uri(env['MONGODB_URI'])}")
    serve_port = free_port(args.serve_port)
    # Dagster's EndpointResource and the live updater must reach the same server.
    env["FACTORY_ENDPOINT_URL"] = f"http://127.0.0.1:{serve_port}"
    if not env.get("FACTORY_PARTITIONS_START"):  # Dagster's days start where the frames start (docs/dagster.md)
        from factory_assets.cli.console import first_frame_day

        env["FACTORY_PARTITIONS_START"] = first_frame_day(env["MONGODB_URI"], config.database_name())
    _say(f"Dagster partitions from {env['FACTORY_PARTITIONS_START']}")
    dagster_services = None
    postgres_url = args.dagster_postgres or env.get("FACTORY_DAGSTER_POSTGRES_URL")
    if postgres_url and not args.no_dagster:  # Dagster's production topology instead of `dagster dev`
        from factory_assets.cli.dagster_topology import local_topology

        try:
            dagster_services = local_topology(postgres_url, args.port, env, say=_say)
        except (RuntimeError, ValueError):
            if started_db and not args.keep_db:
                embedded.stop()
            raise
    from factory_assets.simulation.broker import queue_limits

    # one ingester session takes every factory's frames: the queue holds them all
    args.outage_fps = (args.fps * max(1, len(args.prefix or ())) * max(1, args.cameras) if args.outage_fps is None
                       else args.outage_fps)
    mqtt_url = broker_url_for_children(args.mqtt_url, env) if args.mqtt_url else None
    if mqtt_url:
        from factory_assets.vocabulary.mqtt import redact

        _say(f"MQTT broker: {redact(args.mqtt_url)} (yours: none started)")
    services = build_services(free_port(args.mqtt_port), args.port, serve_port, args.fps, args.seed,
                              dagster=not args.no_dagster, dagster_services=dagster_services, mqtt_url=mqtt_url,
                              queue=queue_limits(args), camera_fps=args.camera_fps,
                              simulator=not args.no_simulator, prefixes=args.prefix, ingest_shards=args.ingest_shards,
                              factories=args.factories, cameras=args.cameras)
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    log_dir = config.factory_home() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    links = {"Dagster UI": f"http://127.0.0.1:{args.port}"} if not args.no_dagster else {}
    links.update(service_links(services))
    if "twin page & API (/docs)" in links:
        links["fleet page"] = links["twin page & API (/docs)"] + "/fleet"
    code = 0
    console = None
    def start(svc: Service) -> subprocess.Popen:
        out = None if args.verbose else open(log_dir / f"{svc.name}.log", "ab", buffering=0)  # None: inherit
        proc = subprocess.Popen(svc.argv, env={**env, **svc.env}, start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT if out is not None else None)
        if out is not None:
            out.close()  # the child holds its own descriptor
        return proc

    try:
        for svc in services:
            svc.proc = start(svc)
            _say(f"started {svc.name} (pid {svc.proc.pid})")
            if svc.ready_port and not wait_port(svc.ready_port, 60, svc.proc):
                raise RuntimeError(f"{svc.name} did not come up on port {svc.ready_port}; "
                                   f"see {log_dir / (svc.name + '.log')}")
        console = StatusDisplay(services, env["MONGODB_URI"], links, log_dir, verbose=args.verbose).start()
        supervisor = Supervisor(services, start, time.monotonic(), say=_say)
        db_watch = DatabaseWatch(embedded, time.monotonic(), say=_say) if using_embedded else None
        while not stopping:
            if db_watch is not None:
                db_watch.step(time.monotonic())  # the embedded MongoDB, when its process died
            try:
                supervisor.step(time.monotonic())  # a service that exited is restarted, with backoff
            except CrashLoop as exc:
                raise RuntimeError(f"{exc}; see {log_dir / (exc.service + '.log')}") from exc
            console.refresh()
            time.sleep(0.5)
    except RuntimeError as exc:
        _say(f"{exc}; stopping")
        code = 1
    finally:
        if console is not None:
            console.stop()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop_all(services)
        if started_db and not args.keep_db:
            embedded.stop()
            _say("stopped embedded MongoDB")
    return code


def register(sub) -> None:
    p = sub.add_parser("up", help="run the whole stack (what `make run` does)")
    p.add_argument("--port", type=int, default=3000, help="Dagster UI port")
    p.add_argument("--mqtt-port", type=int, default=1883)
    p.add_argument("--serve-port", type=int, default=8080)
    p.add_argument("--fps", type=float, default=2.0, help="simulated camera frames per second")
    p.add_argument("--camera-fps", type=float, default=None,
                   help="frames per second the ingester asks the camera for (c/cam; default --fps, 0: leave it)")
    p.add_argument("--mqtt-url", default=None, metavar="URL",
                   help="use your own broker (mqtt://[user[:password]@]host:port, mqtts://...) instead of "
                        "starting one; the password may come from FACTORY_MQTT_PASSWORD")
    p.add_argument("--no-simulator", action="store_true", help="no simulated factory (a real one is connected)")
    p.add_argument("--prefix", action="append", default=None, metavar="PREFIX[=FACTORY_ID]",
                   help="a factory whose topics are under PREFIX (repeat for several): the ingester follows each, "
                        "and a simulated factory publishes under each (docs/mqtt.md)")
    p.add_argument("--factories", type=int, default=1, metavar="N",
                   help="simulate N factories through the broker, factory-1..N under fleet/factory-k/, each with its "
                        "own seed, camera pose and clock; the ingester and the API follow each (docs/fleet.md)")
    p.add_argument("--cameras", type=int, default=1, metavar="K",
                   help="each simulated factory has K cameras on its rack, each at its own pose, each with a model "
                        "of its own (docs/fleet.md#several-cameras-in-one-factory; default 1)")
    p.add_argument("--ingest-shards", type=int, default=1, metavar="K",
                   help="run K ingester processes, each owning whole factories of the --prefix list (needs at least "
                        "K prefixed factories; docs/mqtt.md#shards-more-than-one-ingester)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-dagster", action="store_true", help="everything but dagster dev")
    p.add_argument("--dagster-postgres", metavar="URL", default=None,
                   help="run Dagster's production topology instead of dagster dev: an instance on this PostgreSQL "
                        "database (postgresql://USER@HOST:5432/DB; default FACTORY_DAGSTER_POSTGRES_URL; password "
                        "from the URL or FACTORY_DAGSTER_POSTGRES_PASSWORD), the daemon, a dagster api grpc code "
                        "server and the webserver (docs/scaling-out.md)")
    p.add_argument("--keep-db", action="store_true", help="leave the embedded MongoDB running on exit")
    p.add_argument("--verbose", action="store_true",
                   help="stream every service's output here instead of .factory/logs/<service>.log")
    from factory_assets.simulation.broker import add_queue_arguments

    add_queue_arguments(p, fps_default="--fps")  # the started broker's offline queue (docs/mqtt.md)
    p.set_defaults(func=up)
