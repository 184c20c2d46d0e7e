"""No frame lost, ever: faults injected into real processes mid-stream, exact counts asserted.

The ingester is the real ``python -m factory_assets.cli ingest mqtt`` process, the broker
the one ``start_broker`` runs (Mosquitto when installed), MongoDB a SecantusDB process.
Every test publishes numbered frames with QoS 1 and asserts that each one is stored
exactly once (one document per published frame, no document twice).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from factory_assets.simulation.broker import start_broker
from factory_assets.storage.frames import wait_until
from factory_assets_tests.helpers import cam_payload, jpeg_bytes

N_FRAMES = 60
IMAGES = [jpeg_bytes(size=(64, 48), seed=i) for i in range(N_FRAMES)]  # small frames, distinct bytes

NEEDS_MOSQUITTO = ("needs Mosquitto (apt-get install mosquitto; .ci/run installs it): amqtt 0.12 does not keep "
                   "QoS 1 messages for an offline persistent session nor across its own restart")


def frame_ts(i: int) -> str:
    return f"2026-11-23T10:{i // 60:02d}:{i % 60:02d}.000Z"


class Output:
    """Lines a subprocess writes, collected by a thread, waited on without sleeping."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream):
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def count(self, text: str) -> int:
        with self._cond:
            return sum(text in line for line in self.lines)

    def wait_for(self, text: str, timeout: float, at_least: int = 1) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.count(text) >= at_least, timeout)

    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines[-60:])


class IngesterProcess:
    """``factory-assets ingest mqtt`` as a subprocess with a fixed client id (its persistent session)."""

    def __init__(self, url: str, env: dict, client_id: str):
        self.cmd = [sys.executable, "-m", "factory_assets.cli", "ingest", "mqtt", "--url", url,
                    "--client-id", client_id, "--progress-every", "0"]
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.out: Output | None = None
        self.runs = 0

    def start(self) -> "IngesterProcess":
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True)
        self.out = Output(self.proc.stdout)
        self.runs += 1
        assert self.out.wait_for("MQTT subscribed", 60), f"the ingester never subscribed:\n{self.out.text()}"
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> str:
        """SIGTERM: a clean stop; returns what it printed."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.out.text() if self.out else ""


class Publisher:
    """A QoS 1 publisher that survives broker restarts (paho resends what was not acknowledged)."""

    def __init__(self, broker):
        import paho.mqtt.client as mqtt

        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
        self.client.reconnect_delay_set(0.1, 1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.infos = []

    def publish(self, i: int) -> None:
        # like the TXT controller, wait for the broker while it restarts (paho flags a publish
        # made while disconnected as failed even though it queues it)
        assert wait_until(self.client.is_connected, 60), "the publisher never got back to the broker"
        self.infos.append(self.client.publish("i/cam", cam_payload(IMAGES[i], frame_ts(i)), qos=1))

    def wait_all_acknowledged(self, timeout: float) -> bool:
        return wait_until(lambda: all(info.is_published() for info in self.infos), timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def assert_every_frame_stored_exactly_once(fdb) -> None:
    docs = list(fdb.frames.find({}, {"ts": 1, "sha256": 1, "seq": 1}))
    assert len(docs) == N_FRAMES, f"{len(docs)} frame documents for {N_FRAMES} published frames"
    assert len({d["sha256"] for d in docs}) == N_FRAMES  # no frame twice
    assert len({d["seq"] for d in docs}) == N_FRAMES
    stored = sorted(d["ts"].strftime("%Y-%m-%dT%H:%M:%S.000Z") for d in docs)
    assert stored == [frame_ts(i) for i in range(N_FRAMES)]  # every published frame


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class KillableMongo:
    """A SecantusDB process of its own (the session one must survive), restartable on the same data and port."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.data, self.state, self.log = root / "data", root / "daemon.json", root / "secantus.log"
        self.port = _free_port()
        self.uri = f"mongodb://127.0.0.1:{self.port}/?directConnection=true"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "KillableMongo":
        self.state.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "factory_assets.storage.embedded", "serve", "--data", str(self.data),
                 "--port", str(self.port), "--state", str(self.state)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        assert wait_until(lambda: self.state.exists() or self.proc.poll() is not None, 60)
        assert self.proc.poll() is None, self.log.read_text()[-2000:]
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def broker(tmp_path):
    b = start_broker(port=0)  # Mosquitto when installed (FACTORY_MQTT_BROKER), its data kept across restart()
    try:
        yield b
    finally:
        b.close()


def ingester_env(uri: str, database: str) -> dict:
    return dict(os.environ, MONGODB_URI=uri, MONGODB_DATABASE=database, PYTHONUNBUFFERED="1")


def publish_in_background(pub: Publisher, gate_at: dict[int, threading.Event]) -> threading.Thread:
    """Publish frames 0..N-1; before frame i, wait for ``gate_at[i]`` (set by the test at a fault)."""
    def run():
        for i in range(N_FRAMES):
            if i in gate_at:
                gate_at[i].wait(120)
            pub.publish(i)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_every_frame_is_stored_once_when_mongodb_is_killed_and_restarted_mid_stream(tmp_path, broker):
    from factory_assets.storage.mongo import connect

    mongo = KillableMongo(tmp_path / "mongo").start()
    database = f"test_{uuid.uuid4().hex[:12]}"
    ingester = IngesterProcess(broker.url, ingester_env(mongo.uri, database), f"fault-db-{uuid.uuid4().hex[:6]}")
    pub = None
    try:
        fdb = connect(mongo.uri, database)
        ingester.start()
        pub = Publisher(broker)
        killed, restarted = threading.Event(), threading.Event()
        publisher = publish_in_background(pub, {20: killed, 40: restarted})
        assert wait_until(lambda: fdb.frames.count_documents({}) == 20, 30)
        mongo.kill()
        killed.set()  # frames 20..39 are published while MongoDB is down
        assert ingester.out.wait_for("store failed", 60), ingester.out.text()
        assert wait_until(lambda: len(pub.infos) == 40, 30) and pub.wait_all_acknowledged(30)
        # a bad message during the outage: its quarantine write is retried like the frames
        pub.client.publish("i/cam", b"{not json", qos=1).wait_for_publish(30)
        mongo.start()  # same data, same port
        restarted.set()
        publisher.join(60)
        assert pub.wait_all_acknowledged(30)
        assert wait_until(lambda: fdb.frames.count_documents({}) >= N_FRAMES, 60), ingester.out.text()
        assert ingester.out.wait_for("store recovered", 10)
        assert_every_frame_stored_exactly_once(fdb)
        assert wait_until(lambda: fdb.quarantine.count_documents({"reason": "malformed_json"}) == 1, 30)
    finally:
        if pub:
            pub.close()
        output = ingester.stop()
        mongo.stop()
    assert ingester.proc.returncode == 0, output


def test_every_frame_is_stored_once_when_the_ingester_is_killed_and_restarted_mid_stream(fdb, mongo_uri, database_name, broker):
    if broker.kind != "mosquitto":
        pytest.skip(NEEDS_MOSQUITTO)
    ingester = IngesterProcess(broker.url, ingester_env(mongo_uri, database_name), f"fault-kill-{uuid.uuid4().hex[:6]}")
    pub = None
    try:
        ingester.start()
        pub = Publisher(broker)
        killed, restarted = threading.Event(), threading.Event()
        publisher = publish_in_background(pub, {30: killed, 50: restarted})
        assert wait_until(lambda: fdb.frames.count_documents({}) >= 10, 30)
        ingester.kill()  # SIGKILL mid-stream: frames in flight were received but maybe not stored
        killed.set()
        # frames 30..49 are published while no ingester runs: the broker queues them for its session
        assert wait_until(lambda: len(pub.infos) == 50, 30) and pub.wait_all_acknowledged(30)
        stored_while_down = fdb.frames.count_documents({})
        assert stored_while_down < 50
        ingester.start()
        restarted.set()
        publisher.join(60)
        assert pub.wait_all_acknowledged(30)
        assert wait_until(lambda: fdb.frames.count_documents({}) >= N_FRAMES, 60), ingester.out.text()
        assert_every_frame_stored_exactly_once(fdb)
    finally:
        if pub:
            pub.close()
        output = ingester.stop()
    assert ingester.proc.returncode == 0, output


def test_every_frame_is_stored_once_when_the_broker_restarts_mid_stream(fdb, mongo_uri, database_name, broker):
    if broker.kind != "mosquitto":
        pytest.skip(NEEDS_MOSQUITTO)
    ingester = IngesterProcess(broker.url, ingester_env(mongo_uri, database_name), f"fault-broker-{uuid.uuid4().hex[:6]}")
    pub = None
    try:
        ingester.start()
        pub = Publisher(broker)
        restarted = threading.Event()
        publisher = publish_in_background(pub, {30: restarted})
        assert wait_until(lambda: len(pub.infos) == 30, 30)
        broker.restart()  # clean stop: Mosquitto saves queued and in-flight messages of persistent sessions
        restarted.set()
        publisher.join(60)
        assert pub.wait_all_acknowledged(60)
        assert wait_until(lambda: fdb.frames.count_documents({}) >= N_FRAMES, 60), ingester.out.text()
        assert ingester.out.count("MQTT connected") >= 2
        assert_every_frame_stored_exactly_once(fdb)
    finally:
        if pub:
            pub.close()
        output = ingester.stop()
    assert ingester.proc.returncode == 0, output


def test_while_mongodb_is_down_the_ingester_holds_at_most_its_byte_limit_and_the_broker_keeps_the_rest(tmp_path, broker):
    from factory_assets.ingest.mqtt import MqttIngester
    from factory_assets.ingest.service import Ingestor
    from factory_assets.storage.mongo import connect

    mongo = KillableMongo(tmp_path / "mongo").start()
    fdb = connect(mongo.uri, f"test_{uuid.uuid4().hex[:12]}")
    payloads = [cam_payload(IMAGES[i], frame_ts(i)) for i in range(N_FRAMES)]
    limit = 3 * max(len(p) for p in payloads)
    ingester = MqttIngester(Ingestor(fdb, batch_size=2), broker.url, client_id=f"bounded-{uuid.uuid4().hex[:6]}",
                            progress_every=0, max_buffer_bytes=limit).start()
    pub = None
    try:
        assert ingester.subscribed.wait(30)
        mongo.kill()
        pub = Publisher(broker)
        for i in range(N_FRAMES):
            pub.publish(i)
        assert pub.wait_all_acknowledged(30)
        assert wait_until(lambda: ingester.throttled >= 1 and ingester.store_failures >= 1, 60)
        assert ingester.held_bytes <= limit  # 60 frames published, at most 3 frames' bytes in memory
        mongo.start()
        assert wait_until(lambda: fdb.frames.count_documents({}) >= N_FRAMES, 90)
        assert_every_frame_stored_exactly_once(fdb)
        assert wait_until(lambda: ingester.held_bytes == 0, 10)
    finally:
        if pub:
            pub.close()
        ingester.stop()
        mongo.stop()


def test_readers_resume_at_once_after_mongodb_goes_down_between_allocating_and_inserting_a_batch(tmp_path):
    # The block allocated before the outage used to stay pending for its whole lease (120 s),
    # holding the live updater and the frame sensor below it although nothing was in flight.
    from pymongo.errors import PyMongoError

    from factory_assets.ingest.service import Ingestor
    from factory_assets.storage.frames import FrameSequence, read_frames_after
    from factory_assets.storage.mongo import connect

    mongo = KillableMongo(tmp_path / "mongo").start()
    try:
        fdb = connect(mongo.uri, "resume")

        class OutageAfterAllocating(FrameSequence):
            """Stops the real server right after the first block is allocated: the outage lands mid-flush."""
            outages = 1

            def allocate(self, n):
                alloc = super().allocate(n)
                if self.outages:
                    self.outages -= 1
                    mongo.stop()
                return alloc

        ingestor = Ingestor(fdb, batch_size=1000, auto_flush=False)
        ingestor.sequence = OutageAfterAllocating(ingestor.fdb)
        for i in range(10):
            ingestor.handle_mqtt("i/cam", cam_payload(IMAGES[i], ts=frame_ts(i)))
        with pytest.raises(PyMongoError):
            ingestor.flush()
        assert ingestor.pending == 10  # nothing left memory
        mongo.start()

        def flushed() -> bool:
            try:
                ingestor.flush()
                return True
            except PyMongoError:  # the client is still reconnecting
                return False

        assert wait_until(flushed, 60)
        page = read_frames_after(fdb, 0, limit=100)
        assert len(page.frames) == 10  # readable now, not after the lease
        assert fdb.counters.find_one({"_id": ingestor.sequence.key})["pending"] == []
        assert ingestor.sequence.unsettled == []
    finally:
        mongo.stop()
