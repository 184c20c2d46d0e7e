"""The files in deploy/, checked without a cluster: they parse, and they name only images (Dockerfile
targets or pinned third-party ones), ports, variables and commands that exist; every
``factory-assets`` command is parsed by the real CLI parser, every Dagster command by Dagster's own
click commands; every dagster.yaml used there passes Dagster's config validation and matches what
``factory-assets dagster-config`` generates."""
from __future__ import annotations

import importlib
import re
import warnings
from pathlib import Path

import pytest
import yaml

from factory_assets.cli.dagster_topology import (DEFINITIONS_MODULE, LOCATION_NAME, PASSWORD_ENV, PostgresTarget,
                                                 QueueSettings, instance_config)
from factory_assets.defs.pools import FACTORY_TAG

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# Variables read by the third-party images and charts, not by our code
THIRD_PARTY_VARIABLES = {
    "POSTGRES_USER", "POSTGRES_DB", "POSTGRES_PASSWORD",  # the postgres image
    "DAGSTER_PG_PASSWORD",  # the dagster.yaml Dagster's Helm chart renders
}
DAGSTER_SCRIPTS = {"dagster": "dagster._cli", "dagster-daemon": "dagster._daemon.cli",
                   "dagster-webserver": "dagster_webserver.cli"}


# --- what exists -----------------------------------------------------------------------------------

def _dockerfile_targets() -> set[str]:
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.M | re.I))


def _read_by_our_code(name: str) -> bool:
    """Whether ``name`` appears as a string literal in the package (environment variables are read by name)."""
    needle = re.compile(rf"[\"']{re.escape(name)}[\"']")
    return any(needle.search(p.read_text()) for p in (ROOT / "factory_assets").rglob("*.py"))


def _known_variable(name: str) -> bool:
    return name in THIRD_PARTY_VARIABLES or _read_by_our_code(name)


def _parses(argv: list[str]) -> None:
    """The command's program accepts these arguments (its own parser, nothing run)."""
    program, *args = argv
    if program == "factory-assets":
        from factory_assets.cli import build_parser

        try:
            build_parser().parse_args(args)
        except SystemExit as exc:
            raise AssertionError(f"factory-assets rejects {args}") from exc
        return
    import click

    assert program in DAGSTER_SCRIPTS, f"unknown program {program!r} in {argv}"
    cmd, name = importlib.import_module(DAGSTER_SCRIPTS[program]).cli, program
    while isinstance(cmd, click.Group):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx = cmd.make_context(name, args)
            rest = [*ctx.protected_args, *ctx.args]
        name, cmd, args = cmd.resolve_command(ctx, rest)
    try:
        cmd.make_context(name, args)
    except click.ClickException as exc:
        raise AssertionError(f"{program} rejects {argv[1:]}: {exc.format_message()}") from exc


def _option(argv: list[str], *names: str) -> str:
    for i, a in enumerate(argv):
        if a in names:
            return argv[i + 1]
    raise AssertionError(f"none of {names} in {argv}")


def _validated(config: dict, tmp_path: Path) -> dict:
    from dagster._core.instance.config import dagster_instance_config

    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(config))
    return dagster_instance_config(str(tmp_path))[0]


def _without_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


# --- compose ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _bind_mounts(service: dict) -> dict[str, Path]:
    """container path -> the repository file mounted there"""
    mounts = {}
    for v in service.get("volumes", []):
        source, target = v.split(":")[:2]
        if source.startswith("."):
            mounts[target] = (DEPLOY / source).resolve()
    return mounts


def test_the_compose_file_names_only_images_services_and_files_that_exist(compose):
    services = compose["services"]
    assert {"postgres", "mongodb", "mosquitto", "code-server", "webserver", "daemon", "api",
            "inference"} <= set(services)
    assert len([s for s in services if s.startswith("ingester-")]) >= 2
    targets = _dockerfile_targets()
    for name, svc in services.items():
        if "build" in svc:
            assert svc["build"]["target"] in targets, name
            assert (DEPLOY / svc["build"]["context"] / "Dockerfile").resolve() == ROOT / "Dockerfile"
            assert svc["image"].endswith(":" + svc["build"]["target"]), name
        else:  # third-party, pinned to a release line
            image, _, tag = svc["image"].partition(":")
            assert tag and tag != "latest", name
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown {dep}"
        for target, source in _bind_mounts(svc).items():
            assert source.is_file(), f"{name} mounts missing {source}"
        for v in svc.get("volumes", []):
            if not v.startswith("."):
                assert v.split(":")[0] in compose["volumes"], f"{name}: undeclared volume {v}"
    assert services["inference"]["build"]["target"] == "serving"  # the inference server runs without Dagster
    assert services["code-server"]["build"]["target"] == "platform"


def test_every_command_in_the_compose_file_is_one_the_real_programs_accept(compose):
    services = compose["services"]
    commands = {}
    for name, svc in services.items():
        if "build" not in svc:
            continue
        argv = [*svc.get("entrypoint", []), *svc["command"]]
        mounts = _bind_mounts(svc)
        _parses([str(mounts.get(a, a)) for a in argv])
        commands[name] = argv
    grpc = commands["code-server"]
    assert grpc[:5] == ["dagster", "api", "grpc", "-m", DEFINITIONS_MODULE]
    assert _option(grpc, "--location-name") == LOCATION_NAME
    assert commands["dagster-pools"][:3] == ["factory-assets", "dagster-config", "--apply-pool-limits"]
    assert commands["inference"][:2] == ["factory-assets", "serve"]


def test_the_compose_ports_are_the_ones_the_commands_listen_on(compose):
    services = compose["services"]
    listening = {"mosquitto": re.search(r"^listener (\d+)", (DEPLOY / "mosquitto" / "mosquitto.conf").read_text(),
                                        re.M).group(1)}
    for name, svc in services.items():
        if "command" in svc and "build" in svc:
            argv = [*svc.get("entrypoint", []), *svc["command"]]
            if "-p" in argv or "--port" in argv:
                listening[name] = _option(argv, "-p", "--port")
    for name, svc in services.items():
        for mapping in svc.get("ports", []):
            assert mapping.split(":")[-1] == listening[name], f"{name} publishes {mapping}"
    workspace = yaml.safe_load((DEPLOY / "dagster" / "workspace.yaml").read_text())
    server = workspace["load_from"][0]["grpc_server"]
    assert server["host"] == "code-server" and str(server["port"]) == listening["code-server"]
    assert _option(services["twin-updater"]["command"], "--endpoint-url") == f"http://inference:{listening['inference']}"


def test_the_compose_file_sets_only_variables_something_reads(compose):
    for name, svc in compose["services"].items():
        for variable in svc.get("environment", {}):
            assert _known_variable(variable), f"{name} sets {variable}, which nothing reads"
    interpolated = set(re.findall(r"\$\{(\w+)", (DEPLOY / "compose.yaml").read_text()))
    assert interpolated == {"DAGSTER_POSTGRES_PASSWORD"}
    assert "DAGSTER_POSTGRES_PASSWORD" in (ROOT / "docs" / "scaling-out.md").read_text()


def test_the_compose_dagster_yaml_is_what_dagster_config_generates_and_passes_validation(compose, tmp_path,
                                                                                        capsys):
    from factory_assets.cli import main

    postgres = compose["services"]["postgres"]["environment"]
    url = f"postgresql://{postgres['POSTGRES_USER']}@postgres:5432/{postgres['POSTGRES_DB']}"
    assert main(["dagster-config", "--dagster-postgres", url, "--code-server", "code-server:4266",
                 "--write", str(tmp_path / "generated")]) == 0
    capsys.readouterr()
    for name in ("dagster.yaml", "workspace.yaml"):
        assert (DEPLOY / "dagster" / name).read_text() == (tmp_path / "generated" / name).read_text(), name
    config = _validated(yaml.safe_load((DEPLOY / "dagster" / "dagster.yaml").read_text()), tmp_path)
    assert config["storage"]["postgres"]["postgres_db"]["password"] == {"env": PASSWORD_ENV}
    assert PASSWORD_ENV in compose["services"]["code-server"]["environment"]
    assert PASSWORD_ENV in compose["services"]["daemon"]["environment"]


# --- Helm ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def helm() -> dict:
    return yaml.safe_load((DEPLOY / "helm" / "dagster-values.yaml").read_text())


def _chart_instance(values: dict) -> dict:
    """The dagster.yaml Dagster's chart renders from these values (templates/configmap-instance.yaml
    and its helpers), for the parts set here."""
    pg = values["postgresql"]
    db = {"postgres_db": {"username": pg["postgresqlUsername"], "password": {"env": "DAGSTER_PG_PASSWORD"},
                          "hostname": pg["postgresqlHost"], "db_name": pg["postgresqlDatabase"],
                          "port": pg["service"]["port"], "params": pg["postgresqlParams"],
                          "scheme": pg["postgresqlScheme"]}}
    daemon = values["dagsterDaemon"]
    queued = daemon["runCoordinator"]["config"]["queuedRunCoordinator"]
    monitoring = daemon["runMonitoring"]
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    concurrency = values["concurrency"]
    return {
        "scheduler": {"module": "dagster.core.scheduler", "class": "DagsterDaemonScheduler"},
        "schedule_storage": {"module": "dagster_postgres.schedule_storage", "class": "PostgresScheduleStorage",
                             "config": db},
        "run_storage": {"module": "dagster_postgres.run_storage", "class": "PostgresRunStorage", "config": db},
        "event_log_storage": {"module": "dagster_postgres.event_log", "class": "PostgresEventLogStorage",
                              "config": db},
        "run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": {
            "load_incluster_config": k8s["loadInclusterConfig"], "image_pull_policy": k8s["imagePullPolicy"],
            "env_config_maps": [c["name"] for c in k8s["envConfigMaps"]],
            "env_secrets": [s["name"] for s in k8s["envSecrets"]], "fail_pod_on_run_failure": True}},
        "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator",
                            "config": {"dequeue_interval_seconds": queued["dequeueIntervalSeconds"]}},
        "run_monitoring": {"enabled": monitoring["enabled"],
                           "start_timeout_seconds": monitoring["startTimeoutSeconds"],
                           "cancel_timeout_seconds": monitoring["cancelTimeoutSeconds"],
                           "poll_interval_seconds": monitoring["pollIntervalSeconds"],
                           "free_slots_after_run_end_seconds": monitoring["freeSlotsAfterRunEndSeconds"]},
        "concurrency": {
            "pools": {"default_limit": concurrency["pools"]["defaultLimit"],
                      "granularity": concurrency["pools"]["granularity"]},
            "runs": {"max_concurrent_runs": concurrency["runs"]["maxConcurrentRuns"],
                     "tag_concurrency_limits": concurrency["runs"]["tagConcurrencyLimits"]}},
        "telemetry": {"enabled": values["telemetry"]["enabled"]},
    }


def test_the_helm_values_render_an_instance_that_passes_dagsters_validation(helm, tmp_path):
    from dagster._config import validate_config
    from dagster_postgres import PostgresRunStorage

    instance = _chart_instance(helm)
    config = _validated(instance, tmp_path)
    assert validate_config(PostgresRunStorage.config_type(), config["run_storage"]["config"]).success
    # the same queue, per-factory limit, pools and run monitoring as dagster-config generates
    ours = instance_config(PostgresTarget.parse("postgresql://dagster@db/dagster", environ={}),
                           QueueSettings(max_concurrent_runs=8))
    assert config["concurrency"]["runs"]["tag_concurrency_limits"] == ours["concurrency"]["runs"][
        "tag_concurrency_limits"]
    assert config["concurrency"]["pools"] == ours["concurrency"]["pools"]
    assert config["concurrency"]["runs"]["tag_concurrency_limits"][0]["key"] == FACTORY_TAG
    assert config["run_monitoring"]["enabled"] and config["run_monitoring"]["free_slots_after_run_end_seconds"] > 0
    assert config["run_storage"]["config"]["postgres_db"]["scheme"] == ours["storage"]["postgres"]["postgres_db"][
        "scheme"]


def test_the_helm_values_run_our_platform_image_as_the_code_location_with_the_k8s_run_launcher(helm):
    (deployment,) = helm["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", DEFINITIONS_MODULE]
    assert deployment["image"]["repository"].endswith("/factory-assets")
    assert deployment["image"]["tag"].startswith("platform")
    _parses(["dagster", "api", "grpc", *deployment["dagsterApiGrpcArgs"], "-p", str(deployment["port"])])
    assert helm["runLauncher"]["type"] == "K8sRunLauncher"
    assert helm["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    config_maps = {o["metadata"]["name"] for o in _k8s_objects() if o["kind"] == "ConfigMap"}
    for ref in deployment["envConfigMaps"] + helm["runLauncher"]["config"]["k8sRunLauncher"]["envConfigMaps"]:
        assert ref["name"] in config_maps


# --- Kubernetes ---------------------------------------------------------------------------------------

def _k8s_objects() -> list[dict]:
    objects = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        objects += [o for o in yaml.safe_load_all(path.read_text()) if o]
    return objects


def _env_of(container: dict, config_maps: dict) -> dict:
    env = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]])
    for e in container.get("env", []):
        env[e["name"]] = e.get("value", "<secret>")
    return env


def test_the_kubernetes_objects_run_commands_the_cli_accepts_and_set_only_variables_it_reads():
    objects = _k8s_objects()
    config_maps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Job")]
    assert {o["metadata"]["name"] for o in workloads} >= {"factory-ingester", "factory-api", "factory-inference",
                                                          "factory-twin-updater", "factory-dagster-pools"}
    for variable in config_maps["factory-assets-config"]:
        assert _known_variable(variable), variable
    for o in workloads:
        for c in o["spec"]["template"]["spec"]["containers"]:
            image = c["image"].rsplit(":", 1)[1]
            assert image.split("-")[0] in _dockerfile_targets(), c["image"]
            env = _env_of(c, config_maps)
            for variable in (e["name"] for e in c.get("env", [])):
                assert _known_variable(variable), variable
            argv = [*c.get("command", []), *c.get("args", [])]
            # Kubernetes expands $(VAR) from the container's environment
            argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in argv]
            _parses(argv)
            for port in c.get("ports", []):
                assert str(port["containerPort"]) == _option(argv, "--port", "-p"), o["metadata"]["name"]
    inference = next(o for o in workloads if o["metadata"]["name"] == "factory-inference")
    assert ":serving" in inference["spec"]["template"]["spec"]["containers"][0]["image"]


def _shard_plan(argv: list[str], env: dict | None = None):
    """The factories and session of the ingester these arguments (and environment) start, split as
    the ingester splits them."""
    from factory_assets.ingest.shards import ShardPlan
    from factory_assets.vocabulary.mqtt import TopicPrefix

    prefixes = [TopicPrefix.parse(argv[i + 1]) for i, a in enumerate(argv) if a == "--prefix"]
    shard = _option(argv, "--shard") if "--shard" in argv else (env or {})["FACTORY_INGEST_SHARD"]
    return ShardPlan.make(prefixes, shard=shard, shards=int(_option(argv, "--shards")))


def _assert_every_factory_in_one_shard(plans, all_factories: set[str]) -> None:
    owners: dict[str, int] = {}
    for plan in plans:
        for p in plan.own:
            owners[p.factory_id] = owners.get(p.factory_id, 0) + 1
    assert owners == {f: 1 for f in all_factories}, owners
    assert len({plan.client_id for plan in plans}) == len(plans)  # a persistent session per shard


def test_each_kubernetes_ingester_pod_owns_its_own_factories_under_its_own_session():
    objects = _k8s_objects()
    config_maps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    (sts,) = [o for o in objects if o["kind"] == "StatefulSet"]
    container = sts["spec"]["template"]["spec"]["containers"][0]
    env = _env_of(container, config_maps)
    replicas = sts["spec"]["replicas"]
    plans = []
    for ordinal in range(replicas):
        pod_env = {**env, "FACTORY_INGEST_SHARD": f"{sts['metadata']['name']}-{ordinal}"}  # metadata.name
        argv = [re.sub(r"\$\((\w+)\)", lambda m: pod_env[m.group(1)], a) for a in container["command"]]
        _parses(argv)
        assert int(_option(argv, "--shards")) == replicas
        plans.append(_shard_plan(argv, pod_env))
    api = next(o for o in objects if o["metadata"]["name"] == "factory-api")
    api_argv = api["spec"]["template"]["spec"]["containers"][0]["command"]
    api_factories = {api_argv[i + 1].split("=")[1] for i, a in enumerate(api_argv) if a == "--prefix"}
    _assert_every_factory_in_one_shard(plans, api_factories)  # the factories the API sends orders to


def test_each_compose_ingester_owns_its_own_factories_under_its_own_session(compose):
    services = compose["services"]
    plans = [_shard_plan(svc["command"]) for name, svc in sorted(services.items()) if name.startswith("ingester-")]
    api = services["api"]["command"]
    _assert_every_factory_in_one_shard(plans, {api[i + 1].split("=")[1] for i, a in enumerate(api) if a == "--prefix"})


# --- ECS ----------------------------------------------------------------------------------------------

def test_the_ecs_instance_passes_dagsters_validation_and_the_ecs_run_launchers(tmp_path):
    from dagster._config import validate_config
    from dagster_aws.ecs import EcsRunLauncher

    text = (DEPLOY / "ecs" / "dagster.yaml").read_text()
    config = _validated(yaml.safe_load(text), tmp_path)
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_aws.ecs", "EcsRunLauncher")
    result = validate_config(EcsRunLauncher.config_type(), launcher["config"])
    assert result.success, result.errors
    db = config["storage"]["postgres"]["postgres_db"]
    target = PostgresTarget.parse(f"postgresql://{db['username']}@{db['hostname']}:{db['port']}/{db['db_name']}"
                                  f"?sslmode={db['params']['sslmode']}", environ={})
    ours = instance_config(target, QueueSettings(max_concurrent_runs=8), password_env=True)
    assert {k: v for k, v in config.items() if k != "run_launcher"} == ours
    assert PASSWORD_ENV in {s["name"] for s in launcher["config"]["secrets"]}  # run tasks reach the database
