"""No frame lost, ever: faults injected into real processes mid-stream, exact counts asserted.

The ingester is the real ``python -m factory_assets.cli ingest mqtt`` process, the broker
the one ``start_broker`` runs (Mosquitto when installed, configured as ``up`` configures
it: QoS 0 queued for offline sessions), MongoDB a SecantusDB process. Every test publishes
numbered frames at **QoS 0**, as the TXT controller publishes ``i/cam``, each followed by an
``i/bme680`` reading at QoS 1, and asserts that each frame and each reading is stored
exactly once (one document each, none twice).

QoS 0 is never sent twice, so where a fault would destroy a frame that was already sent
(inside a killed process, or published while the broker is down) the test waits for that
window to be empty before the fault, as a one-line comment says; QoS 1 readings are
published into the fault itself and must all arrive.
"""
from __future__ import annotations

import json
import re
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
from factory_assets_tests.fixtures.mqtt import IngesterProcess, ingester_env
from factory_assets_tests.helpers import cam_payload, jpeg_bytes

N_FRAMES = 60
IMAGES = [jpeg_bytes(size=(64, 48), seed=i) for i in range(N_FRAMES)]  # small frames, distinct bytes

NEEDS_MOSQUITTO = ("needs Mosquitto (apt-get install mosquitto; .ci/run installs it): amqtt 0.12 does not keep "
                   "messages for an offline persistent session nor across its own restart")


def frame_ts(i: int) -> str:
    return f"2026-11-23T10:{i // 60:02d}:{i % 60:02d}.000Z"


def reading(i: int, burst: int = 0) -> bytes:
    return json.dumps({"ts": f"2026-11-23T11:{i // 60:02d}:{i % 60:02d}.{burst:03d}Z", "t": 20.0 + i / 10,
                       "rt": 20.5, "h": 40.0, "rh": 40.5, "p": 1000.0, "iaq": 50, "aq": 3, "gr": 150000}).encode()


class Publisher:
    """The controller: frames at QoS 0, readings at QoS 1. Survives broker restarts (paho resends
    unacknowledged QoS 1; a QoS 0 frame published while disconnected is gone, as on the TXT)."""

    def __init__(self, broker):
        import paho.mqtt.client as mqtt

        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
        self.connects = 0
        self.client.on_connect = self._on_connect
        self.client.reconnect_delay_set(0.1, 1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.infos = []
        self.readings = 0

    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        if not reason_code.is_failure:
            self.connects += 1

    def publish(self, i: int) -> None:
        assert wait_until(self.client.is_connected, 60), "the publisher never got back to the broker"
        self.infos.append(self.client.publish("i/cam", cam_payload(IMAGES[i], frame_ts(i)), qos=0))
        self.reading(i)

    def reading(self, i: int, burst: int = 0) -> None:
        self.infos.append(self.client.publish("i/bme680", reading(i, burst), qos=1))
        self.readings += 1

    def wait_all_acknowledged(self, timeout: float) -> bool:
        """QoS 1: the broker acknowledged it; QoS 0: it is written to the socket."""
        return wait_until(lambda: all(info.is_published() for info in self.infos), timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def frames_stored(fdb) -> int:
    return fdb.frames.count_documents({})


def assert_every_frame_and_reading_stored_exactly_once(fdb, readings: int = N_FRAMES) -> None:
    docs = list(fdb.frames.find({}, {"ts": 1, "sha256": 1, "seq": 1}))
    assert len(docs) == N_FRAMES, f"{len(docs)} frame documents for {N_FRAMES} published frames"
    assert len({d["sha256"] for d in docs}) == N_FRAMES  # no frame twice
    assert len({d["seq"] for d in docs}) == N_FRAMES
    stored = sorted(d["ts"].strftime("%Y-%m-%dT%H:%M:%S.000Z") for d in docs)
    assert stored == [frame_ts(i) for i in range(N_FRAMES)]  # every published frame
    sensors = list(fdb.sensors.find({"topic": "i/bme680"}, {"ts": 1}))
    assert len(sensors) == readings and len({d["ts"] for d in sensors}) == readings


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
    # Mosquitto when installed (FACTORY_MQTT_BROKER), its data kept across restart(), configured as `up` does;
    # connection messages on: the tests wait for the broker to have seen a killed ingester go
    b = start_broker(port=0, connection_messages=True) if _mosquitto() else start_broker(port=0)
    try:
        yield b
    finally:
        b.close()


def _mosquitto() -> bool:
    from factory_assets.simulation.broker import broker_kind

    return broker_kind() == "mosquitto"


def publish_in_background(pub: Publisher, gate_at: dict[int, threading.Event]) -> threading.Thread:
    """Publish frames (and readings) 0..N-1; before frame i, wait for ``gate_at[i]`` (set by the test)."""
    def run():
        for i in range(N_FRAMES):
            if i in gate_at:
                gate_at[i].wait(120)
            pub.publish(i)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def broker_saw_it_go(broker, client_id: str) -> bool:
    """The broker logged the client's connection as gone: from now on it queues for the session."""
    gone = re.compile(rf"Client {re.escape(client_id)} (closed its connection|disconnected|has exceeded)")
    return wait_until(lambda: bool(gone.search(broker.log_text())), 30)


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
        assert wait_until(lambda: frames_stored(fdb) == 20, 30)
        mongo.kill()
        killed.set()  # frames 20..39 (QoS 0) are published while MongoDB is down: they wait in the ingester
        assert ingester.out.wait_for("store failed", 60), ingester.out.text()
        assert wait_until(lambda: len(pub.infos) == 80, 30) and pub.wait_all_acknowledged(30)
        # a bad message during the outage: its quarantine write is retried like the frames
        pub.client.publish("i/cam", b"{not json", qos=0).wait_for_publish(30)
        mongo.start()  # same data, same port
        restarted.set()
        publisher.join(60)
        assert pub.wait_all_acknowledged(30)
        assert wait_until(lambda: frames_stored(fdb) >= N_FRAMES and fdb.sensors.count_documents({}) >= N_FRAMES,
                          60), ingester.out.text()
        assert ingester.out.wait_for("store recovered", 10)
        assert_every_frame_and_reading_stored_exactly_once(fdb)
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
    client_id = f"fault-kill-{uuid.uuid4().hex[:6]}"
    ingester = IngesterProcess(broker.url, ingester_env(mongo_uri, database_name), client_id)
    pub = None
    try:
        ingester.start()
        pub = Publisher(broker)
        killed, restarted = threading.Event(), threading.Event()
        publisher = publish_in_background(pub, {30: killed, 50: restarted})
        # QoS 0 cannot be saved from inside a killed process: the kill comes once frames 0..29 are stored
        assert wait_until(lambda: len(pub.infos) == 60 and frames_stored(fdb) == 30, 30)
        for burst in range(1, 21):  # ... while QoS 1 readings are in flight: received, maybe not stored yet
            pub.reading(29, burst)
        assert pub.wait_all_acknowledged(30)
        ingester.kill()  # SIGKILL mid-stream
        assert broker_saw_it_go(broker, client_id), broker.log_text()[-2000:]
        killed.set()
        # frames 30..49 are published while no ingester runs: the broker queues them (QoS 0 too) for its session
        assert wait_until(lambda: len(pub.infos) == 120, 30) and pub.wait_all_acknowledged(30)
        assert frames_stored(fdb) == 30
        ingester.start()
        restarted.set()
        publisher.join(60)
        assert pub.wait_all_acknowledged(30)
        assert wait_until(lambda: frames_stored(fdb) >= N_FRAMES and fdb.sensors.count_documents({}) >= N_FRAMES + 20,
                          60), ingester.out.text()
        assert_every_frame_and_reading_stored_exactly_once(fdb, readings=N_FRAMES + 20)
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
        # QoS 0 frames the broker already wrote into the ingester's connection are lost with it if the ingester
        # has not read them when the broker stops (a loaded machine): the restart comes once frames 0..29 are stored
        assert wait_until(lambda: len(pub.infos) == 60 and frames_stored(fdb) == 30, 30)
        for burst in range(1, 21):  # QoS 1 readings in flight while the broker stops
            pub.reading(29, burst)
        broker.restart()  # clean stop: Mosquitto saves queued and in-flight messages of persistent sessions
        # QoS 0 frames published while the broker is down are lost at the publisher (on the TXT too):
        # the publisher resumes once it is back, maybe before the ingester (then the broker queues for it)
        assert wait_until(lambda: pub.connects >= 2, 30)
        restarted.set()
        publisher.join(60)
        assert pub.wait_all_acknowledged(60)
        assert wait_until(lambda: frames_stored(fdb) >= N_FRAMES and fdb.sensors.count_documents({}) >= N_FRAMES + 20,
                          60), ingester.out.text()
        assert ingester.out.count("MQTT connected") >= 2
        assert_every_frame_and_reading_stored_exactly_once(fdb, readings=N_FRAMES + 20)
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
                            progress_every=0, max_buffer_bytes=limit, camera_fps=None).start()
    pub = None
    try:
        assert ingester.subscribed.wait(30)
        mongo.kill()
        pub = Publisher(broker)
        for i in range(N_FRAMES):  # QoS 0 frames: the ingester stops reading, they wait in its socket and the broker
            pub.publish(i)
        assert pub.wait_all_acknowledged(30)
        assert wait_until(lambda: ingester.throttled >= 1 and ingester.store_failures >= 1, 60)
        assert ingester.held_bytes <= limit  # 60 frames published, at most 3 frames' bytes in memory
        mongo.start()
        assert wait_until(lambda: frames_stored(fdb) >= N_FRAMES and fdb.sensors.count_documents({}) >= N_FRAMES, 90)
        assert_every_frame_and_reading_stored_exactly_once(fdb)
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


def test_frames_arriving_while_the_ingester_stops_are_stored_and_the_next_one_gets_the_rest(tmp_path, broker):
    # QoS 0 is not sent again: a stopping ingester must keep reading until it disconnects (it used to
    # drop what arrived while it drained, leaving QoS 1 to redelivery), then the broker queues for the session
    from factory_assets.ingest.mqtt import MqttIngester
    from factory_assets.ingest.service import Ingestor
    from factory_assets.storage.mongo import connect

    if broker.kind != "mosquitto":
        pytest.skip(NEEDS_MOSQUITTO)
    mongo = KillableMongo(tmp_path / "mongo").start()
    fdb = connect(mongo.uri, f"test_{uuid.uuid4().hex[:12]}")
    client_id = f"stopping-{uuid.uuid4().hex[:6]}"
    first = MqttIngester(Ingestor(fdb), broker.url, client_id=client_id, progress_every=0, camera_fps=None,
                         stop_timeout=120).start()
    pub, second = None, None
    try:
        assert first.subscribed.wait(30)
        mongo.kill()  # the drain at stop takes as long as MongoDB is away
        pub = Publisher(broker)
        for i in range(20):
            pub.publish(i)
        assert wait_until(lambda: first._taken == 40, 30)
        stopping = threading.Thread(target=first.stop, daemon=True)
        stopping.start()
        assert wait_until(first._stopping.is_set, 10)
        for i in range(20, 40):  # published while it stops: it still reads them
            pub.publish(i)
        assert wait_until(lambda: first._taken == 80, 30)
        mongo.start()
        stopping.join(120)
        assert not stopping.is_alive() and frames_stored(fdb) == 40 and first.lost_on_stop == 0
        for i in range(40, N_FRAMES):  # nobody connected: queued for the session
            pub.publish(i)
        assert pub.wait_all_acknowledged(30)
        second = MqttIngester(Ingestor(fdb), broker.url, client_id=client_id, progress_every=0,
                              camera_fps=None).start()
        assert wait_until(lambda: frames_stored(fdb) >= N_FRAMES and fdb.sensors.count_documents({}) >= N_FRAMES, 60)
        assert_every_frame_and_reading_stored_exactly_once(fdb)
    finally:
        if pub:
            pub.close()
        if second:
            second.stop()
        mongo.stop()
