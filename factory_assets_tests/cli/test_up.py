"""``factory-assets up``: the services it starts."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_dagster_loads_the_definitions_up_names_from_outside_the_repository(tmp_path):
    # after `pip install .` the user runs `factory-assets up` anywhere: no workspace.yaml there
    from factory_assets.cli.up import DAGSTER_TARGET, build_services

    dagster = next(s for s in build_services(1883, 3000, 8080, 2.0, 0) if s.name == "dagster")
    assert dagster.argv[dagster.argv.index("dev") + 1:][:len(DAGSTER_TARGET)] == DAGSTER_TARGET
    result = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", *DAGSTER_TARGET],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={"DAGSTER_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Validation successful" in result.stdout + result.stderr


def _argv(services, name: str) -> list[str]:
    return next(s.argv for s in services if s.name == name)


def test_up_asks_the_camera_for_the_simulators_rate_and_sizes_the_brokers_offline_queue_for_it():
    from factory_assets.cli.up import build_services

    services = build_services(1883, 3000, 8080, 5.0, 0, dagster=False)
    ingester, simulator = _argv(services, "ingester"), _argv(services, "simulator")
    assert ingester[ingester.index("--camera-fps") + 1] == "5" and simulator[simulator.index("--fps") + 1] == "5"
    broker = _argv(services, "mqtt-broker")
    assert broker[broker.index("--outage-minutes") + 1] == "30" and broker[broker.index("--outage-fps") + 1] == "5"
    assert "--no-queue-qos0" not in broker
    ingester = _argv(build_services(1883, 3000, 8080, 5.0, 0, dagster=False, camera_fps=0), "ingester")
    assert ingester[ingester.index("--camera-fps") + 1] == "0"  # leave the camera to others


def test_up_options_set_the_outage_the_queue_is_sized_for():
    import argparse

    from factory_assets.cli import up as up_cli
    from factory_assets.simulation.broker import queue_limits

    sub = argparse.ArgumentParser().add_subparsers()
    up_cli.register(sub)
    args = sub.choices["up"].parse_args(["--fps", "4", "--outage-minutes", "60"])
    args.outage_fps = args.fps if args.outage_fps is None else args.outage_fps  # as up() does
    queue = queue_limits(args)
    assert (queue.messages, queue.qos0, queue.fps) == (60 * 60 * 4 + 3600, True, 4.0)
    args = sub.choices["up"].parse_args(["--max-queued-messages", "100", "--no-queue-qos0"])
    args.outage_fps = args.fps
    assert (queue_limits(args).messages, queue_limits(args).qos0) == (100, False)


def test_the_broker_up_starts_is_configured_to_queue_frames_for_the_stated_outage(tmp_path):
    from factory_assets.cli.up import build_services
    from factory_assets.simulation.broker import READY_PREFIX, mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("needs Mosquitto")
    argv = _argv(build_services(0, 3000, 8080, 5.0, 0, dagster=False), "mqtt-broker")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, FACTORY_HOME=str(tmp_path)))
    try:
        line = proc.stdout.readline()
        assert line.startswith(READY_PREFIX), proc.stderr.read()
        port = line.strip().rsplit(":", 1)[1]
        conf = (tmp_path / "mosquitto" / f"mosquitto-{port}.conf").read_text().splitlines()
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    frames, others = 30 * 60 * 5, 30 * 60
    assert "queue_qos0_messages true" in conf and f"max_queued_messages {frames + others}" in conf
    assert f"max_queued_bytes {frames * 32 * 1024 + others * 4096}" in conf and "max_inflight_messages 0" in conf


def test_with_the_users_own_broker_up_starts_none_and_keeps_the_password_off_the_command_lines():
    from factory_assets.cli.up import broker_url_for_children, build_services

    env: dict = {}
    url = broker_url_for_children("mqtts://txt:xtx%40secret@broker.example:8883", env)
    assert url == "mqtts://txt@broker.example:8883" and env == {"FACTORY_MQTT_PASSWORD": "xtx@secret"}
    services = build_services(1883, 3000, 8080, 2.0, 0, dagster=False, mqtt_url=url, simulator=False)
    names = [s.name for s in services]
    assert "mqtt-broker" not in names and "simulator" not in names and "ingester" in names
    assert all("secret" not in " ".join(s.argv) for s in services)
    assert url in _argv(services, "ingester")
