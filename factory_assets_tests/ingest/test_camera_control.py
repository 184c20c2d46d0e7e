"""The TXT publishes no frame until ``c/cam`` ``{"on": true, "fps": N}``: the ingester switches
the camera on, on every (re)connection and when a factory announces itself. Real Mosquitto
(else amqtt), real MongoDB, the simulated factory through its public ``run_in_background``."""
from __future__ import annotations

import json

import paho.mqtt.client as mqtt

from factory_assets.ingest.mqtt import MqttIngester
from factory_assets.ingest.service import Ingestor
from factory_assets.simulation.publisher import run_in_background
from factory_assets.storage.frames import wait_until
from factory_assets_tests.fixtures.mqtt import MqttRecorder


def send(broker, topic: str, payload: bytes) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_after_subscribing_the_ingester_switches_the_camera_on_and_a_controller_connecting_later_gets_it(
        fdb, mqtt_broker):
    ingester = MqttIngester(Ingestor(fdb), mqtt_broker.url, progress_every=0, camera_fps=4).start()
    try:
        assert ingester.camera_switched.wait(20)  # the broker acknowledged c/cam (QoS 1)
        # a controller that subscribes only now (the TXT booting later) still gets the command: it is retained
        with MqttRecorder(mqtt_broker.url, topics=("c/cam",)) as controller:
            assert controller.wait_until(lambda: controller.count("c/cam") >= 1, 10)
        assert controller.payloads("c/cam")[0] == {"on": True, "fps": 4.0}
        # the ingester's own command comes back on '#': stored as a message at its arrival, not quarantined
        assert wait_until(lambda: fdb.mqtt.count_documents({"topic": "c/cam"}) == 1, 10)
        stored = fdb.mqtt.find_one({"topic": "c/cam"})
        assert stored["payload"] == {"on": True, "fps": 4.0} and stored["ts_source"] == "received_at"
        assert fdb.quarantine.count_documents({}) == 0
    finally:
        ingester.stop()


def test_the_camera_command_goes_out_again_after_every_reconnection(fdb, mqtt_broker):
    ingester = MqttIngester(Ingestor(fdb), mqtt_broker.url, progress_every=0).start()
    try:
        assert wait_until(lambda: ingester.camera_commands == 1, 20)
        mqtt_broker.restart()
        assert wait_until(lambda: ingester.connects == 2 and ingester.camera_commands == 2, 30)
        mqtt_broker.restart()
        assert wait_until(lambda: ingester.connects == 3 and ingester.camera_commands == 3, 30)
    finally:
        ingester.stop()


def test_a_factory_announcing_itself_on_i_broadcast_is_answered_with_the_camera_command(fdb, mqtt_broker):
    with MqttRecorder(mqtt_broker.url, topics=("c/cam",)) as controller:
        ingester = MqttIngester(Ingestor(fdb), mqtt_broker.url, progress_every=0).start()
        try:
            assert controller.wait_until(lambda: controller.count("c/cam") == 1, 20)
            # the TXT at start: "init" every 5 s until a message for it arrives
            send(mqtt_broker, "i/broadcast", json.dumps({
                "ts": "2026-11-23T10:00:00.000Z", "hardwareId": "0C1C57A1B2C3", "hardwareModel": "TXT",
                "softwareName": "TxtFactoryMain", "softwareVersion": "0.8.1", "message": "init"}).encode())
            assert controller.wait_until(lambda: controller.count("c/cam") == 2, 20)
            assert ingester.broadcast_answers == 1
        finally:
            ingester.stop()
    assert [json.loads(p) for p, _ in controller.on("c/cam")] == [{"on": True, "fps": 2.0}] * 2


def test_a_simulated_factory_started_before_the_ingester_sends_frames_once_the_ingester_switches_its_camera_on(
        fdb, mqtt_broker):
    # the simulator, like the TXT, publishes no frame until c/cam; it is up before the ingester (make run's order
    # after a restart of the ingester alone)
    stop, thread, out = run_in_background(mqtt_broker.url, fps=None, seed=5, change_every_s=5.0,
                                          customer=False, arrivals=False)
    ingester = None
    try:
        with MqttRecorder(mqtt_broker.url, topics=("i/broadcast",)) as rec:
            assert rec.wait_until(lambda: rec.count("i/broadcast") >= 1, 20), out.get("error")
        ingester = MqttIngester(Ingestor(fdb), mqtt_broker.url, progress_every=0, camera_fps=10).start()
        assert wait_until(lambda: fdb.frames.count_documents({}) >= 5, 30), out.get("error")
    finally:
        stop.set()
        thread.join(30)
        if ingester is not None:
            ingester.stop()
    assert "error" not in out, out.get("error")
    assert out["result"].camera_switches >= 1
