"""A per-slot model's answers reach the twin: frame in MongoDB -> real inference server
serving a per-slot model -> live updater (or the batch path) -> twin with ``observed.slots``
and a per-slot ``delta`` naming the slot the camera and the controller disagree on."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np

from factory_assets.serving.predictor import HttpEndpointPredictor
from factory_assets.simulation.render import encode_jpeg, render_warehouse
from factory_assets.storage.frames import build_frame, insert_frames
from factory_assets.twin.batch import infer_frames
from factory_assets.twin.live import LiveTwinUpdater
from factory_assets.twin.store import get_twin
from factory_assets.vocabulary import SLOTS, STOCK_TOPIC
from factory_assets_tests.twin.slot_model import slot_model, slot_model_server  # noqa: F401

T0 = datetime(2026, 11, 24, 8, 0, tzinfo=timezone.utc)
SHOWN = {s: None for s in SLOTS} | {"A1": "BLUE", "B2": "WHITE", "C3": "RED"}
SAID = SHOWN | {"A2": "RED"}  # the controller believes A2 holds a red piece; the camera shows it empty


def insert_rack_frames(fdb, n: int, stock: dict = SHOWN) -> list:
    rng = np.random.default_rng(7)
    docs = [build_frame(encode_jpeg(render_warehouse(stock, rng=rng)), ts=T0 + timedelta(seconds=i + 1),
                        camera_id="cam-1", factory_id="factory-1", content_type="image/jpeg", width=320,
                        height=240, source={"kind": "test"}) for i in range(n)]
    insert_frames(fdb, docs)
    return docs


def report_stock(fdb, slots: dict, ts: datetime = T0 - timedelta(seconds=60)) -> None:
    """The controller's report, a minute before the frames: the crane has long finished."""
    items = [{"location": s, "workpiece": {"type": t, "id": f"wp-{s}"} if t else None} for s, t in slots.items()]
    fdb.mqtt.insert_one({"topic": STOCK_TOPIC, "ts": ts, "factory_id": "factory-1", "message_id": "stock-1",
                         "payload": {"ts": ts.isoformat(), "stockItems": items}})


def assert_twin_sees_the_rack_and_names_a2(fdb):
    twin = get_twin(fdb)
    assert {s: v["type"] for s, v in twin["observed"]["slots"].items()} == SHOWN
    assert all(0.5 <= v["probability"] <= 1 for v in twin["observed"]["slots"].values())
    assert twin["reported"]["slots"] == SAID
    assert list(twin["delta"]["slots"]) == ["A2"]
    assert twin["delta"]["slots"]["A2"]["message"] == "controller says A2 holds RED, camera sees it empty"
    # red is still present elsewhere (C3): the colour delta alone would not have noticed
    assert "red" not in twin["delta"]


def test_the_live_updater_carries_a_per_slot_models_slots_to_the_twin(fdb, slot_model_server, slot_model):
    report_stock(fdb, SAID)
    insert_rack_frames(fdb, 3)
    updater = LiveTwinUpdater(fdb, HttpEndpointPredictor(slot_model_server.url))
    while updater.step():
        pass
    inferences = list(fdb.inferences.find())
    assert len(inferences) == 3
    assert all(d["model_kind"] == "slots" and d["model_version"] == slot_model.version for d in inferences)
    assert all({s: v["type"] for s, v in d["slots"].items()} == SHOWN for d in inferences)
    assert_twin_sees_the_rack_and_names_a2(fdb)


def test_the_batch_path_carries_the_slots_to_the_twin_too(fdb, slot_model_server, slot_model):
    report_stock(fdb, SAID)
    frames = insert_rack_frames(fdb, 3)
    from factory_assets.twin.live import apply_latest_stock

    apply_latest_stock(fdb)
    outcome = infer_frames(fdb, HttpEndpointPredictor(slot_model_server.url), frames, model_version=slot_model.version)
    assert outcome.inferred == 3
    assert fdb.inferences.count_documents({"source": "batch", "model_kind": "slots"}) == 3
    assert_twin_sees_the_rack_and_names_a2(fdb)


def test_a_presence_models_inference_keeps_its_shape(fdb, model_server):
    insert_rack_frames(fdb, 1)
    updater = LiveTwinUpdater(fdb, HttpEndpointPredictor(model_server.url))
    while updater.step():
        pass
    doc = fdb.inferences.find_one()
    assert "slots" not in doc and "model_kind" not in doc
    assert "slots" not in get_twin(fdb)["observed"]
