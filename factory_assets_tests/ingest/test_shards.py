"""Ingest past one process: shards own whole factories, a killed shard's replacement resumes its
session, and a factory handed to another shard is let go only once that shard subscribed.

Real processes and a real Mosquitto (configured as ``up`` configures it), real SecantusDB. Frames
are published at QoS 0 as the controller publishes ``i/cam``, with QoS 1 readings beside them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from datetime import timedelta

import pytest

from factory_assets.ingest.shards import (SESSION_RECORD_PREFIX, ShardPlan, shard_client_id, shard_index,
                                          split_prefixes)
from factory_assets.storage.frames import wait_until
from factory_assets.vocabulary import utcnow
from factory_assets.vocabulary.mqtt import TopicPrefix
from factory_assets_tests.fixtures.mqtt import IngesterProcess, ingester_env
from factory_assets_tests.helpers import cam_payload, jpeg_bytes
from factory_assets_tests.ingest.test_no_frame_lost import NEEDS_MOSQUITTO, broker, broker_saw_it_go  # noqa: F401

FACTORIES = 6
PREFIXES = [f"/plant/line{j}/=factory-{j}" for j in range(FACTORIES)]
ROUND = 20  # frames per factory per phase


def frame_ts(i: int) -> str:
    return f"2026-11-24T08:{i // 60:02d}:{i % 60:02d}.000Z"


IMAGES = {(j, i): jpeg_bytes(size=(48, 32), seed=1000 * j + i) for j in range(FACTORIES) for i in range(3 * ROUND)}


def test_factories_are_split_between_shards_by_position_and_whole():
    fleet = [TopicPrefix.parse(p) for p in PREFIXES]
    shards = split_prefixes(fleet, 2)
    assert [[p.factory_id for p in s] for s in shards] == [["factory-0", "factory-2", "factory-4"],
                                                          ["factory-1", "factory-3", "factory-5"]]
    assert [len(s) for s in split_prefixes(fleet, 4)] == [2, 2, 1, 1]
    plan = ShardPlan.make(fleet, shard="ingester-1", shards=2)  # a StatefulSet's pod name
    assert plan.own == shards[1] and plan.fleet == fleet
    assert plan.client_id == "factory-assets-ingest-shard-ingester-1" and shard_client_id("0") == \
        "factory-assets-ingest-shard-0"
    assert ShardPlan.make(fleet[:2], shard="north").own == fleet[:2]  # a named shard owning what it is given
    assert shard_index("3", 4) == 3
    with pytest.raises(ValueError, match="at least 3 factories.*there are 2 factories"):
        split_prefixes(fleet[:2], 3)
    with pytest.raises(ValueError, match="there is one factory \\(no --prefix\\)"):
        split_prefixes([], 2)
    with pytest.raises(ValueError, match="every factory needs a prefix"):
        split_prefixes([TopicPrefix.parse("=factory-1"), fleet[0]], 2)
    with pytest.raises(ValueError, match="outside 0..1"):
        shard_index("ingester-2", 2)
    with pytest.raises(ValueError, match="needs --shard"):
        ShardPlan.make(fleet, shards=2)


def test_the_ingest_command_refuses_more_shards_than_factories_with_the_reason():
    done = subprocess.run([sys.executable, "-m", "factory_assets.cli", "ingest", "mqtt", "--url", "mqtt://127.0.0.1:1",
                           "--shards", "2", "--shard", "1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "2 ingester shards need at least 2 factories" in done.stdout and "no --prefix" in done.stdout


class Controllers:
    """Six factories' controllers on one paho client: frames at QoS 0, readings at QoS 1, each under its prefix."""

    def __init__(self, broker):
        import paho.mqtt.client as mqtt

        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"plant-{uuid.uuid4().hex[:8]}")
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.infos = []
        self.readings = 0

    def frames(self, rounds: range, factories=range(FACTORIES)) -> None:
        for i in rounds:
            for j in factories:
                prefix = TopicPrefix.parse(PREFIXES[j])
                self.infos.append(self.client.publish(prefix.full("i/cam"), cam_payload(IMAGES[j, i], frame_ts(i)),
                                                      qos=0))

    def reading(self, j: int, n: int) -> None:
        payload = json.dumps({"ts": f"2026-11-24T09:00:{n:02d}.000Z", "ldr": 100 + n, "br": "42.0"}).encode()
        self.infos.append(self.client.publish(TopicPrefix.parse(PREFIXES[j]).full("i/ldr"), payload, qos=1))
        self.readings += 1

    def all_sent(self, timeout: float = 30) -> bool:
        return wait_until(lambda: all(info.is_published() for info in self.infos), timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Shard(IngesterProcess):
    """``factory-assets ingest mqtt --shards 2 --shard K`` with the whole fleet's prefixes (no --client-id)."""

    def __init__(self, url: str, env: dict, k: int):
        super().__init__(url, env, shard_client_id(str(k)))
        self.cmd = [sys.executable, "-m", "factory_assets.cli", "ingest", "mqtt", "--url", url, "--shards", "2",
                    "--shard", str(k), "--progress-every", "0", "--camera-fps", "0",
                    *(arg for p in PREFIXES for arg in ("--prefix", p))]


def per_factory(fdb) -> dict[str, int]:
    return {d["_id"]: d["n"] for d in fdb.frames.aggregate([{"$group": {"_id": "$factory_id", "n": {"$sum": 1}}}])}


def test_two_shards_store_six_factories_once_each_in_order_when_one_is_killed_and_replaced(fdb, mongo_uri,
                                                                                           database_name, broker):
    if broker.kind != "mosquitto":
        pytest.skip(NEEDS_MOSQUITTO)
    env = ingester_env(mongo_uri, database_name)
    shards = [Shard(broker.url, env, 0), Shard(broker.url, env, 1)]
    plant = None
    try:
        for shard in shards:
            shard.start()
        assert all(s.out.count(f"ingesting from {broker.url} as {shard_client_id(str(k))}") == 1
                   for k, s in enumerate(shards))
        assert shards[1].out.count("factories /plant/line1/=factory-1, /plant/line3/=factory-3, "
                                   "/plant/line5/=factory-5") == 1
        plant = Controllers(broker)
        plant.frames(range(0, ROUND))
        assert plant.all_sent()
        # QoS 0 cannot be saved from inside a killed process: the kill comes once shard 1's frames are stored
        expected = {f"factory-{j}": ROUND for j in range(FACTORIES)}
        assert wait_until(lambda: per_factory(fdb) == expected, 60), per_factory(fdb)
        for n in range(10):  # ... while QoS 1 readings of shard 1's factories are in flight
            plant.reading(1 + 2 * (n % 3), n)
        assert plant.all_sent()
        shards[1].kill()  # SIGKILL mid-stream
        assert broker_saw_it_go(broker, shard_client_id("1")), broker.log_text()[-2000:]
        plant.frames(range(ROUND, 2 * ROUND))  # shard 1 is down: the broker queues its factories' frames
        assert plant.all_sent()
        held = {**{f"factory-{j}": 2 * ROUND for j in (0, 2, 4)}, **{f"factory-{j}": ROUND for j in (1, 3, 5)}}
        assert wait_until(lambda: per_factory(fdb) == held, 60), per_factory(fdb)  # shard 0 takes none of them
        shards[1].start()  # the replacement: same shard, same session
        assert shards[1].out.wait_for("session present: True", 30), shards[1].out.text()
        plant.frames(range(2 * ROUND, 3 * ROUND))
        assert plant.all_sent()
        expected = {f"factory-{j}": 3 * ROUND for j in range(FACTORIES)}
        assert wait_until(lambda: per_factory(fdb) == expected and fdb.sensors.count_documents({}) == 10, 60), \
            (per_factory(fdb), fdb.sensors.count_documents({}), shards[1].out.text())
        for j in range(FACTORIES):  # each frame once, under its factory, in the order its factory sent them
            docs = list(fdb.frames.find({"factory_id": f"factory-{j}"}, {"ts": 1, "sha256": 1, "seq": 1,
                                                                          "source.topic": 1}).sort("seq", 1))
            assert [d["ts"].strftime("%Y-%m-%dT%H:%M:%S.000Z") for d in docs] == [frame_ts(i) for i in range(3 * ROUND)]
            assert len({d["sha256"] for d in docs}) == 3 * ROUND
            assert {d["source"]["topic"] for d in docs} == {f"/plant/line{j}/i/cam"}
        readings = list(fdb.sensors.find({}, {"payload.ldr": 1, "factory_id": 1}))
        assert sorted(d["payload"]["ldr"] for d in readings) == list(range(100, 110))
        assert {d["factory_id"] for d in readings} == {"factory-1", "factory-3", "factory-5"}
    finally:
        if plant:
            plant.close()
        outputs = [s.stop() for s in shards]
    assert all(s.proc.returncode == 0 for s in shards), outputs


def test_a_factory_handed_to_another_shard_is_let_go_only_once_that_shard_has_subscribed(fdb, broker):
    # a rescale: shard A owned both factories, now only the first. Its session still holds the second's
    # subscription; it keeps storing what arrives there until shard B has subscribed (a stale record of a
    # removed shard does not count), then unsubscribes: no frame falls between the two, none is stored twice
    from factory_assets.ingest.mqtt import MqttIngester
    from factory_assets.ingest.service import Ingestor

    if broker.kind != "mosquitto":
        pytest.skip(NEEDS_MOSQUITTO)
    fleet = [TopicPrefix.parse("/site/a/=factory-a"), TopicPrefix.parse("/site/b/=factory-b")]
    a_id, b_id = f"shard-a-{uuid.uuid4().hex[:6]}", f"shard-b-{uuid.uuid4().hex[:6]}"

    def ingester(client_id, own):
        return MqttIngester(Ingestor(fdb), broker.url, client_id=client_id, prefixes=own, fleet_prefixes=fleet,
                            progress_every=0, camera_fps=None, session_tend_every=0.1).start()

    def recorded(client_id):
        doc = fdb.counters.find_one({"_id": SESSION_RECORD_PREFIX + client_id}) or {}
        return doc.get("subscriptions")

    first = ingester(a_id, fleet)
    assert wait_until(lambda: recorded(a_id) == ["/site/a/#", "/site/b/#"], 30)
    first.stop()
    # a shard removed long ago still has a record claiming factory-b: it must not count
    fdb.counters.insert_one({"_id": SESSION_RECORD_PREFIX + f"gone-{uuid.uuid4().hex[:6]}",
                             "subscriptions": ["/site/b/#"], "at": utcnow() - timedelta(hours=1)})
    a = ingester(a_id, fleet[:1])  # restarted owning factory-a only
    b = None
    plant = Controllers(broker)
    published = []
    stop_publishing = threading.Event()

    def publish_factory_b():  # factory-b's camera, all through the handover
        i = 0
        while not stop_publishing.is_set() and i < 3 * ROUND:
            plant.infos.append(plant.client.publish("/site/b/i/cam", cam_payload(IMAGES[0, i], frame_ts(i)), qos=0))
            published.append(i)
            i += 1
            stop_publishing.wait(0.02)

    try:
        assert a.subscribed.wait(30)
        publisher = threading.Thread(target=publish_factory_b, daemon=True)
        publisher.start()
        assert wait_until(lambda: a.ingestor.stats.frames >= 5, 30)  # nobody else holds factory-b: A stores it
        assert a.released == [] and recorded(a_id) == ["/site/a/#", "/site/b/#"]
        b = ingester(b_id, fleet[1:])
        assert wait_until(lambda: a.released == ["/site/b/#"], 30)  # once B's session holds it
        assert wait_until(lambda: recorded(a_id) == ["/site/a/#"], 30) and recorded(b_id) == ["/site/b/#"]
        assert wait_until(lambda: a.held_bytes == 0, 30)  # what reached A before its UNSUBACK is stored
        stored_by_a = a.ingestor.stats.frames
        assert wait_until(lambda: b.ingestor.stats.frames >= 5, 30)
        stop_publishing.set()
        publisher.join(30)
        assert plant.all_sent()
        assert wait_until(lambda: fdb.frames.count_documents({"factory_id": "factory-b"}) == len(published), 30)
        assert a.ingestor.stats.frames == stored_by_a  # nothing more reached A
        docs = list(fdb.frames.find({}, {"ts": 1, "factory_id": 1}))
        assert len({d["ts"] for d in docs}) == len(docs) == len(published)
        assert {d["factory_id"] for d in docs} == {"factory-b"}
    finally:
        stop_publishing.set()
        plant.close()
        a.stop()
        if b:
            b.stop()


def test_up_runs_k_ingester_shards_over_the_prefixed_factories_and_one_simulated_factory_each():
    from factory_assets.cli.up import build_services

    prefixes = PREFIXES[:3]
    services = {s.name: s.argv for s in build_services(1883, 3000, 8080, 2.0, 7, dagster=False, prefixes=prefixes,
                                                       ingest_shards=2)}
    assert "ingester" not in services
    for k in (0, 1):
        argv = services[f"ingester-{k}"]
        assert argv[argv.index("--shards") + 1:argv.index("--shards") + 4] == ["2", "--shard", str(k)]
        assert [argv[i + 1] for i, a in enumerate(argv) if a == "--prefix"] == prefixes  # the whole fleet each
    simulators = [services[f"simulator-{j}"] for j in range(3)]
    assert [s[s.index("--prefix") + 1] for s in simulators] == ["/plant/line0/", "/plant/line1/", "/plant/line2/"]
    assert [s[s.index("--seed") + 1] for s in simulators] == ["7", "8", "9"]
    assert [s[s.index("--factory-id") + 1] for s in simulators] == ["factory-0", "factory-1", "factory-2"]
    with pytest.raises(ValueError, match="3 ingester shards need at least 3 factories"):
        build_services(1883, 3000, 8080, 2.0, 7, dagster=False, prefixes=prefixes[:2], ingest_shards=3)


def test_up_refuses_more_ingester_shards_than_factories_before_starting_anything(tmp_path):
    done = subprocess.run([sys.executable, "-m", "factory_assets.cli", "up", "--ingest-shards", "2", "--no-dagster"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "FACTORY_HOME": str(tmp_path / "home")})
    assert done.returncode == 2
    assert "--ingest-shards 2: 2 ingester shards need at least 2 factories" in done.stdout
    assert not (tmp_path / "home" / "mongodb").exists()  # nothing was started
