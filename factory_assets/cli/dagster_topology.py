"""Dagster on its production topology: an instance on PostgreSQL, the code location served by
``dagster api grpc``, the daemon and the webserver as separate processes, and a run queue.

``factory-assets up --dagster-postgres URL`` (or ``FACTORY_DAGSTER_POSTGRES_URL``) starts this
instead of ``dagster dev``; ``factory-assets dagster-config`` prints the ``dagster.yaml`` and
``workspace.yaml`` it would use, for an operator to adapt (docs/scaling-out.md).

The instance (``dagster.yaml``):

- ``storage: postgres``: run, event-log and schedule storage in one PostgreSQL database
  (``dagster-postgres``). The password never enters the file: it names the environment variable
  ``FACTORY_DAGSTER_POSTGRES_PASSWORD`` (``{env: ...}``), which every Dagster process and run
  worker reads; ``up`` fills it from the URL or passes the operator's value on.
- ``run_coordinator: QueuedRunCoordinator``: runs wait in a queue that the daemon works off in
  order, under ``concurrency.runs``: a maximum of runs in progress and one limit per distinct
  ``factory`` run tag (``applyLimitPerUniqueValue``).
- ``concurrency.pools``: steps declare a pool (``mongodb``, ``sagemaker``: factory_assets/defs/pools.py)
  and wait for a free slot of it (granularity ``op``). The limit of each named pool lives in the
  instance's storage, not in the file: ``set_pool_limits`` / ``dagster instance concurrency set``.
- ``run_monitoring``: the daemon fails runs stuck starting or cancelling, and frees the pool slots
  of runs that ended without releasing them (a run worker killed mid-step).
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from factory_assets.defs.pools import FACTORY_TAG, MONGODB_POOL, SAGEMAKER_POOL

log = logging.getLogger(__name__)

URL_ENV = "FACTORY_DAGSTER_POSTGRES_URL"
PASSWORD_ENV = "FACTORY_DAGSTER_POSTGRES_PASSWORD"
LOCATION_NAME = "factory_assets"
DEFINITIONS_MODULE = "factory_assets.definitions"
CODE_SERVER_PORT = 4266
SCHEMES = ("postgresql", "postgres", "postgresql+psycopg2")
DRIVER_SCHEME = "postgresql+psycopg2"


@dataclass(frozen=True)
class PostgresTarget:
    """Where the instance's storage lives: ``postgresql://user[:password]@host[:port]/db[?sslmode=...]``.
    A password that is not in the URL comes from ``FACTORY_DAGSTER_POSTGRES_PASSWORD``.
    ``str()`` and ``redacted`` never show it."""

    hostname: str
    db_name: str
    username: str
    port: int = 5432
    password: str | None = field(default=None, repr=False)
    params: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, url: str, *, environ=None) -> "PostgresTarget":
        environ = os.environ if environ is None else environ
        example = "postgresql://USER@HOST:5432/DATABASE"
        try:
            parts = urlsplit(url.strip())
            port = parts.port or 5432
        except ValueError as exc:
            raise ValueError(f"bad PostgreSQL URL {redact(url)}: {exc} (use {example})") from None
        if parts.scheme not in SCHEMES:
            raise ValueError(f"not a PostgreSQL URL: {redact(url)} (use {example})")
        db_name = unquote(parts.path.lstrip("/"))
        if not parts.hostname or not parts.username or not db_name or "/" in db_name:
            raise ValueError(f"a PostgreSQL URL names a user, a host and one database: {redact(url)} "
                             f"(use {example})")
        password = (unquote(parts.password) if parts.password is not None
                    else environ.get(PASSWORD_ENV) or None)
        return cls(hostname=parts.hostname, port=port, db_name=db_name, username=unquote(parts.username),
                   password=password, params=tuple(parse_qsl(parts.query)))

    @property
    def redacted(self) -> str:
        login = f"{self.username}:***" if self.password else self.username
        query = "?" + "&".join(f"{k}={v}" for k, v in self.params) if self.params else ""
        return f"postgresql://{login}@{self.hostname}:{self.port}/{self.db_name}{query}"

    def __str__(self) -> str:
        return self.redacted

    def postgres_db(self, password_env: bool | None = None) -> dict:
        """Dagster's ``postgres_db`` block: the password as ``{env: FACTORY_DAGSTER_POSTGRES_PASSWORD}``
        (``password_env``: whether to name it; default: when the target has a password)."""
        db: dict = {"hostname": self.hostname, "port": self.port, "db_name": self.db_name,
                    "username": self.username,
                    # the driver dagster-postgres installs: SQLAlchemy 2.1 would pick psycopg 3 for
                    # a bare postgresql:// and fail with "No module named 'psycopg'"
                    "scheme": DRIVER_SCHEME}
        if self.password if password_env is None else password_env:
            db["password"] = {"env": PASSWORD_ENV}
        if self.params:
            db["params"] = dict(self.params)
        return db


def redact(url: str) -> str:
    """A URL fit for logs: the password between ``:`` and ``@`` becomes ``***``."""
    head, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    login, _, host = rest.partition("@")
    user = login.split(":", 1)[0]
    return f"{head}://{user}:***@{host}" if ":" in login else url


@dataclass(frozen=True)
class QueueSettings:
    """The run queue, the pools and run monitoring. Defaults fit one machine with 2 cores."""

    max_concurrent_runs: int = 4
    runs_per_factory: int = 2  # one such limit for each distinct value of the `factory` run tag
    pool_limits: tuple[tuple[str, int], ...] = ((MONGODB_POOL, 2), (SAGEMAKER_POOL, 1))
    default_pool_limit: int = 1  # a pool with no limit set in the instance's storage
    dequeue_interval_seconds: int = 5
    monitoring_interval_seconds: int = 30
    free_slots_after_run_end_seconds: int = 60
    start_timeout_seconds: int = 180
    cancel_timeout_seconds: int = 180

    def __post_init__(self):
        for name in ("max_concurrent_runs", "runs_per_factory", "default_pool_limit",
                     "dequeue_interval_seconds", "monitoring_interval_seconds",
                     "free_slots_after_run_end_seconds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be at least 1, not {getattr(self, name)}")
        for pool, limit in self.pool_limits:
            if limit < 0:
                raise ValueError(f"the limit of pool {pool} must be 0 or more, not {limit}")


def instance_config(target: PostgresTarget, settings: QueueSettings = QueueSettings(), *,
                    run_launcher: dict | None = None, password_env: bool | None = None) -> dict:
    """The instance's ``dagster.yaml`` as a dict (``run_launcher``: Dagster's default, runs as
    processes of the code server, unless given)."""
    config: dict = {
        "storage": {"postgres": {"postgres_db": target.postgres_db(password_env)}},
        "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator",
                            "config": {"dequeue_interval_seconds": settings.dequeue_interval_seconds}},
        "concurrency": {
            "runs": {
                "max_concurrent_runs": settings.max_concurrent_runs,
                "tag_concurrency_limits": [{"key": FACTORY_TAG, "value": {"applyLimitPerUniqueValue": True},
                                            "limit": settings.runs_per_factory}],
            },
            "pools": {"default_limit": settings.default_pool_limit, "granularity": "op"},
        },
        "run_monitoring": {
            "enabled": True,
            "start_timeout_seconds": settings.start_timeout_seconds,
            "cancel_timeout_seconds": settings.cancel_timeout_seconds,
            "poll_interval_seconds": settings.monitoring_interval_seconds,
            "free_slots_after_run_end_seconds": settings.free_slots_after_run_end_seconds,
        },
        "telemetry": {"enabled": False},
    }
    if run_launcher:
        config["run_launcher"] = run_launcher
    return config


@dataclass(frozen=True)
class CodeServer:
    """One code location served by ``dagster api grpc -m MODULE``."""

    location_name: str = LOCATION_NAME
    module: str = DEFINITIONS_MODULE
    host: str = "127.0.0.1"
    port: int = CODE_SERVER_PORT


def workspace_config(code_servers) -> dict:
    """``workspace.yaml``: each code location as a ``grpc_server`` (the webserver and the daemon
    connect to running servers; neither starts one)."""
    return {"load_from": [{"grpc_server": {"host": c.host, "port": c.port, "location_name": c.location_name}}
                          for c in code_servers]}


def _dump(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def dagster_yaml(target: PostgresTarget, settings: QueueSettings = QueueSettings(), **kw) -> str:
    pools = " && ".join(f"dagster instance concurrency set {p} {n}" for p, n in settings.pool_limits)
    header = (f"# Dagster instance for factory_assets on {target.redacted}\n"
              f"# (generated by `factory-assets dagster-config`; docs/scaling-out.md).\n"
              + (f"# Every Dagster process and run worker needs {PASSWORD_ENV} in its environment.\n"
                 if (target.password if kw.get("password_env") is None else kw["password_env"]) else "")
              + f"# Pool limits live in the instance's storage, not here: {pools}\n")
    return header + _dump(instance_config(target, settings, **kw))


def workspace_yaml(code_servers) -> str:
    return ("# the code locations, each a running `dagster api grpc` server\n"
            + _dump(workspace_config(code_servers)))


def set_pool_limits(limits, home: str | Path | None = None) -> dict[str, int]:
    """Sets each pool's limit in the instance's storage (``DAGSTER_HOME``'s or ``home``'s instance),
    as ``dagster instance concurrency set`` does; returns the limits now in force."""
    import dagster as dg

    if home is None and not os.environ.get("DAGSTER_HOME"):
        raise ValueError("DAGSTER_HOME is not set: name the instance's directory")
    try:
        instance = dg.DagsterInstance.from_config(str(home)) if home else dg.DagsterInstance.get()
    except Exception as exc:  # dagster-postgres retried; say why it gave up, not where
        root = exc
        while root.__cause__ is not None:
            root = root.__cause__
        reason = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
        raise RuntimeError(f"the instance's database cannot be used: {reason}") from exc
    with instance:
        storage = instance.event_log_storage
        if not storage.supports_global_concurrency_limits:
            raise ValueError("this instance's storage has no concurrency pools (SQLite?): use PostgreSQL")
        for pool, limit in limits:
            storage.set_concurrency_slots(pool, int(limit))
        return {pool: storage.get_concurrency_info(pool).slot_count for pool, _ in limits}


def _dagster_script(name: str, module: str) -> list[str]:
    """The console script installed beside this Python (a venv need not be on PATH), else ``-m``."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return [str(beside)]
    found = shutil.which(name)
    return [found] if found else [sys.executable, "-m", module]


@dataclass
class Topology:
    """The local topology: a directory holding ``dagster.yaml`` and ``workspace.yaml`` (the
    instance's ``DAGSTER_HOME``), one ``dagster api grpc`` server per code location, the daemon
    and the webserver."""

    home: Path
    target: PostgresTarget
    settings: QueueSettings = field(default_factory=QueueSettings)
    code_servers: list[CodeServer] = field(default_factory=lambda: [CodeServer()])
    webserver_host: str = "127.0.0.1"
    webserver_port: int = 3000

    @property
    def workspace_file(self) -> Path:
        return self.home / "workspace.yaml"

    def write(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "dagster.yaml").write_text(dagster_yaml(self.target, self.settings))
        self.workspace_file.write_text(workspace_yaml(self.code_servers))

    def env(self) -> dict[str, str]:
        """What every Dagster process of the topology needs in its environment."""
        env = {"DAGSTER_HOME": str(self.home)}
        if self.target.password:
            env[PASSWORD_ENV] = self.target.password
        return env

    def services(self):
        """The processes, in start order: code servers (ready when their port answers), the
        webserver, the daemon. Each a ``factory_assets.cli.up.Service``."""
        from factory_assets.cli.up import Service

        env = self.env()
        services = []
        for c in self.code_servers:
            name = "dagster-code-server" if len(self.code_servers) == 1 else f"dagster-code-{c.location_name}"
            # --use-python-environment-entry-point: run workers start as `<this python> -m dagster`,
            # so a venv that is not on PATH works
            argv = [sys.executable, "-m", "dagster", "api", "grpc", "-m", c.module, "-h", c.host,
                    "-p", str(c.port), "--location-name", c.location_name, "--use-python-environment-entry-point"]
            services.append(Service(name, argv, c.port, env=dict(env)))
        services.append(Service("dagster-webserver",
                                [*_dagster_script("dagster-webserver", "dagster_webserver"),
                                 "-w", str(self.workspace_file), "-h", self.webserver_host,
                                 "-p", str(self.webserver_port)], self.webserver_port, env=dict(env)))
        services.append(Service("dagster-daemon",
                                [*_dagster_script("dagster-daemon", "dagster._daemon"), "run",
                                 "-w", str(self.workspace_file)], env=dict(env)))
        return services

    def apply_pool_limits(self, base_env: dict | None = None, timeout: float = 120.0) -> None:
        """Sets the pool limits in a child process (it connects to PostgreSQL and creates Dagster's
        tables on first use): fails here, with PostgreSQL's reason, when the database cannot be used."""
        import socket

        try:  # a host that does not answer fails here at once, not after dagster-postgres's retries
            socket.create_connection((self.target.hostname, self.target.port), timeout=10).close()
        except OSError as exc:
            raise RuntimeError(f"PostgreSQL at {self.target.redacted} does not answer: {exc}") from None
        argv = [sys.executable, "-m", "factory_assets.cli", "dagster-config", "--apply-pool-limits"]
        for pool, limit in self.settings.pool_limits:
            argv += ["--pool", f"{pool}={limit}"]
        result = subprocess.run(argv, env={**(os.environ if base_env is None else base_env), **self.env()},
                                capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
            reason = next((line for line in reversed(lines) if line.startswith("error: ")), lines[-1])
            raise RuntimeError(f"Dagster's instance on {self.target.redacted} could not be prepared: "
                               f"{reason.removeprefix('error: ')}")


def local_topology(url: str, webserver_port: int, env: dict, home: Path | None = None,
                   settings: QueueSettings | None = None, say=log.info):
    """For ``factory-assets up --dagster-postgres URL``: writes the instance's files under
    ``.factory/dagster-postgres``, sets the pool limits (``env``: the stack's environment) and
    returns the services to start instead of ``dagster dev``, the password in their environment only."""
    from factory_assets import config
    from factory_assets.cli.up import free_port

    target = PostgresTarget.parse(url, environ=env)
    topology = Topology(home=home or config.factory_home() / "dagster-postgres", target=target,
                        settings=settings or QueueSettings(),
                        code_servers=[CodeServer(port=free_port(CODE_SERVER_PORT))],
                        webserver_port=webserver_port)
    topology.write()
    say(f"Dagster instance on {target.redacted} (DAGSTER_HOME {topology.home})")
    topology.apply_pool_limits(env)
    say("pool limits: " + ", ".join(f"{p}={n}" for p, n in topology.settings.pool_limits))
    return topology.services()  # each carries DAGSTER_HOME and the password in its own environment


def _pool_limit(text: str) -> tuple[str, int]:
    pool, sep, limit = text.partition("=")
    if not sep or not pool or not limit.isdigit():
        raise ValueError(f"a pool limit is POOL=N, not {text!r}")
    return pool, int(limit)


def dagster_config(args) -> int:
    pools = dict(QueueSettings().pool_limits)
    pools.update(dict(_pool_limit(p) for p in args.pool or []))
    settings = QueueSettings(max_concurrent_runs=args.max_concurrent_runs,
                             runs_per_factory=args.runs_per_factory, pool_limits=tuple(pools.items()))
    if args.apply_pool_limits:
        limits = set_pool_limits(settings.pool_limits)
        print("pool limits: " + ", ".join(f"{p}={n}" for p, n in limits.items()), flush=True)
        return 0
    url = args.dagster_postgres or os.environ.get(URL_ENV)
    if not url:
        raise ValueError(f"give --dagster-postgres URL or set {URL_ENV}")
    target = PostgresTarget.parse(url)
    host, _, port = args.code_server.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--code-server is HOST:PORT, not {args.code_server!r}")
    servers = [CodeServer(host=host, port=int(port))]
    # an operator's database has a password: the file names its variable whether or not it is set here
    files = {"dagster.yaml": dagster_yaml(target, settings, password_env=True),
             "workspace.yaml": workspace_yaml(servers)}
    if args.write:
        out = Path(args.write)
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (out / name).write_text(text)
            print(out / name, flush=True)
        return 0
    print("---\n".join(f"# ==> {name} <==\n{text}" for name, text in files.items()), end="", flush=True)
    return 0


def register(sub) -> None:
    p = sub.add_parser("dagster-config",
                       help="print the dagster.yaml (PostgreSQL instance, run queue, pools) and workspace.yaml "
                            "that `up --dagster-postgres` uses")
    p.add_argument("--dagster-postgres", metavar="URL", default=None,
                   help=f"postgresql://USER@HOST:5432/DATABASE (default: {URL_ENV}); the password from the URL "
                        f"or {PASSWORD_ENV}, written into dagster.yaml as {{env: {PASSWORD_ENV}}}")
    p.add_argument("--code-server", default=f"127.0.0.1:{CODE_SERVER_PORT}", metavar="HOST:PORT",
                   help="where `dagster api grpc -m factory_assets.definitions` listens")
    p.add_argument("--max-concurrent-runs", type=int, default=QueueSettings.max_concurrent_runs, metavar="N")
    p.add_argument("--runs-per-factory", type=int, default=QueueSettings.runs_per_factory, metavar="N",
                   help="runs in progress per value of the `factory` run tag")
    p.add_argument("--pool", action="append", metavar="POOL=N",
                   help="a pool's limit (default: " + ", ".join(f"{a}={b}" for a, b in QueueSettings.pool_limits)
                        + "); repeat for each pool")
    p.add_argument("--write", metavar="DIR", help="write the two files into DIR instead of printing them")
    p.add_argument("--apply-pool-limits", action="store_true",
                   help="set the pool limits in the instance of DAGSTER_HOME (its storage keeps them)")
    p.set_defaults(func=dagster_config)
