"""What the live updater logs while the first model is not trained yet (every normal start-up)."""
from __future__ import annotations

import logging
import threading

from factory_assets.serving.predictor import HttpEndpointPredictor
from factory_assets.serving.server import InferenceServer
from factory_assets.storage.frames import wait_until
from factory_assets.twin.live import LiveTwinUpdater
from factory_assets_tests.twin.test_live import insert_sim_frames


def test_waiting_for_the_first_model_is_info_and_its_arrival_is_one_info_line(fdb, trained_models, caplog):
    srv = InferenceServer("127.0.0.1", 0, log=lambda *_: None)  # up, no model loaded yet: answers 503
    srv.start()
    stop = threading.Event()
    updater = LiveTwinUpdater(fdb, HttpEndpointPredictor(srv.url, timeout=2), log=lambda *_: None)
    live = threading.Thread(target=updater.run, kwargs={"stop": stop})
    caplog.set_level(logging.INFO, logger="factory_assets.twin.live")
    try:
        insert_sim_frames(fdb, 3)
        live.start()
        assert wait_until(lambda: any("no model loaded yet" in r.getMessage() for r in caplog.records), 30)
        srv.slot.swap(trained_models[0].model)  # the first model is deployed
        assert wait_until(lambda: fdb.inferences.count_documents({}) == 3, 30)
    finally:
        stop.set()
        live.join(30)
        srv.stop()
    live_records = [r for r in caplog.records if r.name == "factory_assets.twin.live"]
    waiting = [r for r in live_records if "no model loaded yet" in r.getMessage()]
    assert waiting and {r.levelno for r in waiting} == {logging.INFO}
    assert not [r for r in live_records if r.levelno >= logging.WARNING]
    assert len([r for r in live_records if "available again" in r.getMessage()]) == 1
