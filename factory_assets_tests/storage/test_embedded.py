import os
import subprocess
import sys

from pymongo import MongoClient


def cli(*args, env):
    return subprocess.run([sys.executable, "-m", "factory_assets.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_db_start_status_stop_manage_a_daemon_other_processes_can_discover(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MONGODB_URI"}
    env["FACTORY_HOME"] = str(tmp_path)
    env["FACTORY_MONGODB_PORT"] = "0"  # any free port: the default may be taken by a dev stack
    start = cli("db", "start", env=env)
    try:
        assert start.returncode == 0, start.stderr
        uri = cli("db", "uri", env=env).stdout.strip()
        assert uri.startswith("mongodb://127.0.0.1:") and ":27017" not in uri
        client = MongoClient(uri, serverSelectionTimeoutMS=5000)
        client.smart_factory.probe.insert_one({"x": 1})
        assert cli("db", "start", env=env).returncode == 0  # idempotent: still the same daemon
        assert cli("db", "uri", env=env).stdout.strip() == uri
        assert "running" in cli("db", "status", env=env).stdout
        client.close()
    finally:
        stop = cli("db", "stop", env=env)
    assert "stopped" in stop.stdout
    status = cli("db", "status", env=env)
    assert status.returncode == 3 and "stopped" in status.stdout
    # Data survives a restart of the daemon.
    assert cli("db", "start", env=env).returncode == 0
    try:
        uri = cli("db", "uri", env=env).stdout.strip()
        with MongoClient(uri) as again:
            assert again.smart_factory.probe.count_documents({}) == 1
    finally:
        cli("db", "stop", env=env)


def test_without_mongodb_uri_or_daemon_the_error_says_how_to_start_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MONGODB_URI"}
    env["FACTORY_HOME"] = str(tmp_path)
    out = cli("db", "uri", env=env)
    assert out.returncode == 1 and "factory-assets db start" in out.stderr
