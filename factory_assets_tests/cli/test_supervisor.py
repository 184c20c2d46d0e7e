"""``factory-assets up`` restarts a service that exits: real child processes, a clock passed in."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest

from factory_assets.cli.supervisor import CrashLoop, RestartPolicy, Supervisor


@dataclass
class Svc:
    name: str
    argv: list
    proc: subprocess.Popen | None = None
    restarts: int = 0


def start(svc: Svc) -> subprocess.Popen:
    return subprocess.Popen(svc.argv, stdin=subprocess.DEVNULL)


def exiting(code: int) -> list:
    return [sys.executable, "-c", f"raise SystemExit({code})"]


def waiting_for_stdin() -> list:
    # runs until we close its stdin: a service that stays up as long as the test wants
    return [sys.executable, "-c", "import sys; sys.stdin.read()"]


def test_a_service_that_exits_is_restarted_after_a_backoff_that_doubles():
    svc = Svc("twin-updater", exiting(3))
    svc.proc = start(svc)
    said = []
    sup = Supervisor([svc], start, now=0.0, say=said.append)
    svc.proc.wait()
    sup.step(1.0)
    assert sup.waiting() == ["twin-updater"] and svc.restarts == 0
    assert "exited with code 3; restarting it in 1 s" in said[-1]
    sup.step(1.5)  # before its backoff: not yet
    assert svc.restarts == 0
    sup.step(2.0)
    assert svc.restarts == 1 and sup.waiting() == []
    svc.proc.wait()
    sup.step(2.5)
    assert "restarting it in 2 s" in said[-1]  # the second crash waits twice as long
    sup.step(4.5)
    assert svc.restarts == 2
    svc.proc.wait()


def test_a_service_that_stays_up_is_left_alone_and_its_backoff_resets():
    svc = Svc("ingester", exiting(1))
    svc.proc = start(svc)
    said = []
    sup = Supervisor([svc], lambda s: subprocess.Popen(waiting_for_stdin(), stdin=subprocess.PIPE),
                     now=0.0, policy=RestartPolicy(healthy_after=60), say=said.append)
    svc.proc.wait()
    sup.step(1.0)
    sup.step(2.0)  # restarted: this one stays up
    first = svc.proc
    sup.step(100.0)  # up for over a minute: the next crash waits the shortest delay again
    assert svc.proc is first and svc.restarts == 1
    first.stdin.close()
    first.wait()
    sup.step(101.0)
    assert "restarting it in 1 s" in said[-1]


def test_a_crash_loop_stops_the_stack_naming_the_service():
    svc = Svc("inference-server", exiting(2))
    svc.proc = start(svc)
    sup = Supervisor([svc], start, now=0.0, policy=RestartPolicy(max_crashes=3, window=300), say=lambda _: None)
    now = 0.0
    with pytest.raises(CrashLoop) as info:
        while True:
            svc.proc.wait()
            now += 1.0
            sup.step(now)  # notes the exit
            now += 60.0
            sup.step(now)  # restarts it
    assert info.value.service == "inference-server"
    assert "exited 4 times" in str(info.value) and svc.restarts == 3


def test_crashes_spread_beyond_the_window_are_not_a_crash_loop():
    svc = Svc("simulator", exiting(1))
    svc.proc = start(svc)
    sup = Supervisor([svc], start, now=0.0, policy=RestartPolicy(max_crashes=2, window=100, backoff_max=1),
                     say=lambda _: None)
    now = 0.0
    for _ in range(6):  # one crash every 200 s: never more than one inside the window
        svc.proc.wait()
        now += 200.0
        sup.step(now)
        sup.step(now + 1.0)
    assert svc.restarts == 6
    svc.proc.wait()


def test_up_restarts_the_embedded_mongodb_on_its_port_when_its_process_dies_and_not_after_db_stop(tmp_path):
    # every service holds the daemon's URI: the restarted one must answer on the same port, with the data
    import os
    import signal
    import socket

    from pymongo import MongoClient, WriteConcern

    from factory_assets.cli.supervisor import DatabaseWatch
    from factory_assets.storage.embedded import EmbeddedMongo
    from factory_assets.storage.frames import wait_until

    embedded = EmbeddedMongo(home=tmp_path)
    first = embedded.start(port=0)
    try:
        with MongoClient(first.uri, serverSelectionTimeoutMS=10000) as client:
            # journaled, as the ingester writes: it survives a SIGKILL
            client.smart_factory.get_collection("probe", write_concern=WriteConcern(j=True)).insert_one({"x": 1})
        said = []
        watch = DatabaseWatch(embedded, now=0.0, say=said.append, check_every=2.0)
        watch.step(0.0)
        assert watch.restarts == 0 and said == []  # alive: left alone
        os.kill(first.pid, signal.SIGKILL)
        assert wait_until(embedded.died, 30)  # the kill is delivered asynchronously
        watch.step(2.0)
        again = embedded.status()
        assert watch.restarts == 1 and again.running and again.pid != first.pid and again.uri == first.uri
        with MongoClient(again.uri, serverSelectionTimeoutMS=10000) as client:
            assert client.smart_factory.probe.count_documents({}) == 1
        # a restart that fails (the port taken meanwhile) is retried after its backoff
        os.kill(again.pid, signal.SIGKILL)
        assert wait_until(embedded.died, 30)
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind(("127.0.0.1", watch.port))
            squatter.listen()
            watch.step(4.0)
            assert watch.restarts == 1 and not embedded.status().running
            assert "did not restart" in said[-1]
        watch.step(4.0 + watch.policy.backoff_first)
        third = embedded.status()
        assert watch.restarts == 2 and third.running and third.uri == first.uri
        with MongoClient(third.uri, serverSelectionTimeoutMS=10000) as client:
            assert client.smart_factory.probe.count_documents({}) == 1
        embedded.stop()  # stopped on purpose: not restarted
        watch.step(100.0)
        assert watch.restarts == 2 and not embedded.status().running
    finally:
        embedded.stop()
