"""The instance ``factory-assets dagster-config`` and ``up --dagster-postgres`` generate: valid for
Dagster's own config validation, loaded on a real PostgreSQL with the queue, pools and run monitoring
it names, and never holding the password."""
from __future__ import annotations

import io
import uuid
from contextlib import redirect_stdout

import pytest
import yaml

from factory_assets.cli.dagster_topology import (CODE_SERVER_PORT, DEFINITIONS_MODULE, LOCATION_NAME, PASSWORD_ENV,
                                                 PostgresTarget, QueueSettings, Topology, dagster_yaml,
                                                 local_topology)
from factory_assets.defs.pools import FACTORY_TAG, MONGODB_POOL, SAGEMAKER_POOL


def _validated(tmp_path, text: str) -> dict:
    """Dagster's own loading of an instance directory's dagster.yaml: schema and cross-checks."""
    from dagster._core.instance.config import dagster_instance_config

    (tmp_path / "dagster.yaml").write_text(text)
    config, _ = dagster_instance_config(str(tmp_path))
    return config


def test_the_generated_dagster_yaml_passes_dagsters_own_config_validation(tmp_path):
    from dagster._core.errors import DagsterInvalidConfigError

    target = PostgresTarget.parse("postgresql://dagster:pw@db:5432/dagster?sslmode=require")
    config = _validated(tmp_path, dagster_yaml(target))
    assert config["storage"]["postgres"]["postgres_db"]["password"] == {"env": PASSWORD_ENV}
    assert config["storage"]["postgres"]["postgres_db"]["params"] == {"sslmode": "require"}
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["concurrency"]["runs"]["tag_concurrency_limits"] == [
        {"key": FACTORY_TAG, "value": {"applyLimitPerUniqueValue": True}, "limit": QueueSettings().runs_per_factory}]
    assert config["run_monitoring"]["enabled"] is True
    # the validation is real: a misspelt key is refused
    with pytest.raises(DagsterInvalidConfigError):
        _validated(tmp_path, dagster_yaml(target).replace("max_concurrent_runs", "max_concurent_runs"))


def test_the_instance_on_postgresql_has_the_queue_pools_and_run_monitoring_it_was_given(
        postgres_cluster, postgres_database, tmp_path, monkeypatch):
    import dagster as dg
    from dagster._core.run_coordinator import QueuedRunCoordinator

    monkeypatch.setenv(PASSWORD_ENV, postgres_cluster.password)  # the only way the password reaches Dagster
    target = PostgresTarget.parse(postgres_cluster.url(postgres_database))
    settings = QueueSettings(max_concurrent_runs=3, runs_per_factory=1, pool_limits=((MONGODB_POOL, 2),
                                                                                      (SAGEMAKER_POOL, 1)))
    topology = Topology(home=tmp_path / "home", target=target, settings=settings)
    topology.write()
    assert postgres_cluster.password not in (topology.home / "dagster.yaml").read_text()
    topology.apply_pool_limits()  # `factory-assets dagster-config --apply-pool-limits` in a child process
    with dg.DagsterInstance.from_config(str(topology.home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        queue = instance.get_concurrency_config().run_queue_config
        assert queue.max_concurrent_runs == 3
        assert queue.tag_concurrency_limits == [
            {"key": FACTORY_TAG, "value": {"applyLimitPerUniqueValue": True}, "limit": 1}]
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 60
        storage = instance.event_log_storage
        assert storage.get_concurrency_info(MONGODB_POOL).slot_count == 2
        assert storage.get_concurrency_info(SAGEMAKER_POOL).slot_count == 1


def test_dagster_config_prints_the_two_files_an_operator_adapts_without_the_password(monkeypatch, tmp_path):
    from factory_assets.cli import main

    monkeypatch.setenv(PASSWORD_ENV, "s3cret-pw")
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["dagster-config", "--dagster-postgres", "postgresql://dagster@db.plant:5432/dagster",
                     "--code-server", "code:4000", "--max-concurrent-runs", "8", "--pool", "mongodb=3"]) == 0
    text = out.getvalue()
    assert "s3cret-pw" not in text
    instance, workspace = yaml.safe_load_all(text)
    assert instance["concurrency"]["runs"]["max_concurrent_runs"] == 8
    assert instance["storage"]["postgres"]["postgres_db"]["password"] == {"env": PASSWORD_ENV}
    assert "dagster instance concurrency set mongodb 3 && dagster instance concurrency set sagemaker 1" in text
    assert workspace == {"load_from": [{"grpc_server": {"host": "code", "port": 4000,
                                                        "location_name": LOCATION_NAME}}]}
    _validated(tmp_path, text.split("---\n")[0])
    with redirect_stdout(io.StringIO()):
        assert main(["dagster-config", "--dagster-postgres", "postgresql://dagster@db.plant:5432/dagster",
                     "--write", str(tmp_path / "out")]) == 0
    assert yaml.safe_load((tmp_path / "out" / "workspace.yaml").read_text())["load_from"][0]["grpc_server"][
        "port"] == CODE_SERVER_PORT


@pytest.mark.parametrize("url, reason", [
    ("mysql://u@h/db", "not a PostgreSQL URL"),
    ("postgresql://h:5432/db", "names a user, a host and one database"),
    ("postgresql://u@h:5432/", "names a user, a host and one database"),
    ("postgresql://u:pw@h:port/db", "bad PostgreSQL URL"),
])
def test_a_url_that_is_not_a_postgresql_database_gets_a_clear_error_without_its_password(url, reason):
    with pytest.raises(ValueError, match=reason) as exc:
        PostgresTarget.parse(url, environ={})
    assert "pw" not in str(exc.value).replace("postgresql", "")


def test_the_password_comes_from_the_url_or_the_environment_and_is_never_shown():
    from_url = PostgresTarget.parse("postgresql://dagster:p%40ss@db:5433/dagster", environ={})
    assert (from_url.password, from_url.port, from_url.redacted) == ("p@ss", 5433, "postgresql://dagster:***@db:5433/dagster")
    assert "p@ss" not in repr(from_url) + str(from_url) + dagster_yaml(from_url)
    from_env = PostgresTarget.parse("postgresql://dagster@db/dagster", environ={PASSWORD_ENV: "envpw"})
    assert from_env.password == "envpw" and "envpw" not in dagster_yaml(from_env)
    without = PostgresTarget.parse("postgresql://dagster@db/dagster", environ={})
    assert without.password is None and "password" not in without.postgres_db()


def test_up_with_dagster_postgres_starts_the_topology_instead_of_dagster_dev(postgres_cluster, postgres_database,
                                                                             tmp_path, monkeypatch):
    import dagster as dg

    from factory_assets.cli import build_parser
    from factory_assets.cli.up import build_services

    url = postgres_cluster.url(postgres_database, with_password=True)
    args = build_parser().parse_args(["up", "--dagster-postgres", url])
    assert args.dagster_postgres == url
    env: dict = {"PATH": "/usr/bin:/bin"}
    said: list[str] = []
    services = local_topology(url, 3999, env, home=tmp_path / "home", say=said.append)
    assert postgres_cluster.password not in "\n".join(said) and "factory:***@" in said[0]
    assert postgres_cluster.password not in str(env)  # only in the Dagster services' own environment
    stack = build_services(1883, 3999, 8080, 2.0, 0, dagster_services=services)
    names = [s.name for s in stack]
    assert "dagster" not in names  # no `dagster dev`
    assert names[-3:] == ["dagster-code-server", "dagster-webserver", "dagster-daemon"]
    code, web, daemon = stack[-3:]
    assert code.argv[code.argv.index("api"):][:4] == ["api", "grpc", "-m", DEFINITIONS_MODULE]
    workspace = yaml.safe_load((tmp_path / "home" / "workspace.yaml").read_text())
    assert workspace["load_from"][0]["grpc_server"]["port"] == code.ready_port
    assert web.ready_port == 3999 and daemon.argv[-3:] == ["run", "-w", str(tmp_path / "home" / "workspace.yaml")]
    assert all(s.env[PASSWORD_ENV] == postgres_cluster.password and s.env["DAGSTER_HOME"] == str(tmp_path / "home")
               for s in (code, web, daemon))
    # the pool limits are in the instance's storage already
    monkeypatch.setenv(PASSWORD_ENV, postgres_cluster.password)
    with dg.DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        assert {p: instance.event_log_storage.get_concurrency_info(p).slot_count
                for p in (MONGODB_POOL, SAGEMAKER_POOL)} == dict(QueueSettings().pool_limits)


def test_up_with_an_unreachable_postgresql_stops_with_the_reason_and_no_password(tmp_path):
    from factory_assets.cli.up import free_port

    url = f"postgresql://dagster:hunter2@127.0.0.1:{free_port()}/dagster_{uuid.uuid4().hex[:6]}"
    with pytest.raises(RuntimeError) as exc:
        local_topology(url, 3999, {"PATH": "/usr/bin:/bin"}, home=tmp_path / "home", say=lambda _: None)
    message = str(exc.value)
    assert "hunter2" not in message and "postgresql://dagster:***@127.0.0.1" in message
    assert "does not answer" in message and "refused" in message.lower()
