"""The per-slot stock model: chosen from the dataset, accurate per slot on frames it did
not train on, slot geometry learned from labelled frames, colours never seen in training,
persistence and the details a verbose response needs."""
from __future__ import annotations

import numpy as np
import pytest

from factory_assets.backends.local import LocalTrainer, evaluate
from factory_assets.datasets.lst import ManifestError
from factory_assets.datasets.reading import load_image, read_split
from factory_assets.vocabulary import SLOTS
from factory_assets.vision.model import StockModel
from factory_assets.vision.slots import SlotStockModel
from factory_assets_tests.vision.synthetic import write_simulated_slot_dataset

SLOT_BAR = 0.97


@pytest.fixture(scope="module")
def slot_dataset(tmp_path_factory):
    return write_simulated_slot_dataset(tmp_path_factory.mktemp("slots") / "ds", n_train=80, n_valid=40, seed=3)


@pytest.fixture(scope="module")
def slot_result(slot_dataset, tmp_path_factory):
    return LocalTrainer().train(slot_dataset, tmp_path_factory.mktemp("slot_model"), seed=0)


def test_a_dataset_with_slot_labels_trains_the_per_slot_model(slot_result):
    assert isinstance(slot_result.model, SlotStockModel)
    assert slot_result.metrics["model_kind"] == "slots"
    assert (slot_result.model_dir / "MODEL_CARD.md").read_text().count("per slot") >= 1


def test_per_slot_accuracy_on_frames_it_did_not_train_on_meets_the_bar(slot_result, slot_dataset):
    report = evaluate(slot_result.model, slot_dataset, "valid")
    assert report["model_kind"] == "slots"
    assert report["slots"]["n_images"] == 40
    assert report["slots"]["slot_accuracy"] >= SLOT_BAR
    # presence derived from the slots keeps the presence consumers' bar
    assert report["per_label_accuracy"] >= 0.97


def test_slot_geometry_is_learned_where_the_renderer_puts_the_workpieces(slot_result):
    from factory_assets.simulation.render import workpiece_box

    # the test may know the simulator's geometry; the model only saw labelled frames
    for slot, (x, y) in slot_result.model.geometry.in_image().items():
        x0, y0, x1, y1 = workpiece_box(slot)
        assert abs(x - (x0 + x1) / 2) <= 6 and abs(y - (y0 + y1) / 2) <= 8, slot


def test_a_colour_never_stored_during_training_is_still_recognised_slot_by_slot(tmp_path):
    # the simulated factory can take minutes to store its first red piece
    ds = write_simulated_slot_dataset(tmp_path / "ds", n_train=60, n_valid=30, seed=5, train_types=("BLUE", "WHITE"))
    result = LocalTrainer().train(ds, tmp_path / "m", seed=0)
    assert result.metrics["slot_states_seen"] == ["empty", "blue", "white"]
    report = evaluate(result.model, ds, "valid")
    assert report["slots"]["confusion"]["red"]["red"] >= 0.95 * sum(report["slots"]["confusion"]["red"].values())
    assert report["slots"]["slot_accuracy"] >= SLOT_BAR


def test_a_small_camera_shift_keeps_the_slots_right(slot_result, slot_dataset):
    import cv2

    image_dir, rows = read_split(slot_dataset, "valid")
    truth = evaluate(slot_result.model, slot_dataset, "valid")
    images = []
    for r in rows[:20]:
        img = load_image(image_dir / r.path)
        m = np.float32([[1, 0, 6], [0, 1, -4]])
        images.append(cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), borderMode=cv2.BORDER_REFLECT))
    shifted = slot_result.model.predict_slot_proba(images).argmax(axis=-1)
    unshifted = slot_result.model.predict_slot_proba([load_image(image_dir / r.path) for r in rows[:20]]).argmax(-1)
    assert (shifted == unshifted).mean() >= SLOT_BAR
    assert truth["slots"]["slot_accuracy"] >= SLOT_BAR


def test_a_moved_camera_is_recalibrated_from_labelled_frames(slot_dataset, slot_result, tmp_path):
    import cv2

    from factory_assets.datasets.lst import read_slots, slots_path
    from factory_assets.vocabulary import TYPE_TO_STATE
    from factory_assets.vision.slots import fit_slot_model

    image_dir, rows = read_split(slot_dataset, "train")
    slots = read_slots(slots_path(slot_dataset / "train-annots" / "train.lst"))
    m = np.float32([[1, 0, 24], [0, 1, 12]])  # far beyond what alignment to the old view tolerates
    images = [cv2.warpAffine(load_image(image_dir / r.path), m, (320, 240), borderMode=cv2.BORDER_REFLECT)
              for r in rows[:40]]
    states = np.array([[TYPE_TO_STATE.get(slots[r.index][s] or "", 0) for s in SLOTS] for r in rows[:40]])
    moved, _ = fit_slot_model(images, states, seed=0)
    old, new = slot_result.model.geometry.in_image()["B2"], moved.geometry.in_image()["B2"]
    assert abs(new[0] - old[0] - 24) <= 4 and abs(new[1] - old[1] - 12) <= 4


def test_artifact_round_trips_through_the_presence_model_loader(slot_result, slot_dataset):
    data = slot_result.model.to_bytes()
    loaded = StockModel.from_bytes(data)
    assert isinstance(loaded, SlotStockModel) and loaded.version == slot_result.version
    assert StockModel.load(slot_result.model_dir).version == slot_result.version
    jpeg = sorted((slot_dataset / "valid-imgs").glob("*.jpeg"))[0].read_bytes()
    assert loaded.predict_proba_bytes(jpeg) == slot_result.model.predict_proba_bytes(jpeg)
    assert loaded.to_bytes() == data


def test_training_twice_with_the_same_seed_gives_the_same_slot_model(slot_dataset, slot_result, tmp_path):
    assert LocalTrainer().train(slot_dataset, tmp_path / "again", seed=0).version == slot_result.version


def test_details_give_presence_in_class_order_and_every_slot(slot_result, slot_dataset):
    jpeg = sorted((slot_dataset / "valid-imgs").glob("*.jpeg"))[0].read_bytes()
    d = slot_result.model.predict_details(jpeg)
    assert d["labels"] == ["blue", "red", "white"] and d["model_kind"] == "slots"
    assert d["probabilities"] == slot_result.model.predict_proba_bytes(jpeg)
    assert set(d["slots"]) == set(SLOTS)
    assert all(s["state"] in ("empty", "blue", "red", "white") and 0 <= s["probability"] <= 1 for s in d["slots"].values())
    present_from_slots = {c: any(s["state"] == c for s in d["slots"].values()) for c in ("blue", "red", "white")}
    assert d["present"] == present_from_slots


def test_a_dataset_without_slot_labels_trains_the_presence_model(slot_dataset, tmp_path):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(slot_dataset, ds)
    (ds / "train-annots" / "train.slots").unlink()
    result = LocalTrainer(n_augment=1).train(ds, tmp_path / "m", seed=0)
    assert isinstance(result.model, StockModel) and result.metrics["model_kind"] == "presence"
    jpeg = sorted((ds / "valid-imgs").glob("*.jpeg"))[0].read_bytes()
    assert result.model.predict_details(jpeg)["slots"] is None


def test_a_slot_sidecar_naming_an_unknown_line_is_refused(slot_dataset, tmp_path):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(slot_dataset, ds)
    sidecar = ds / "train-annots" / "train.slots"
    sidecar.write_text(sidecar.read_text() + "9999\t" + "\t".join("-" * 9) + "\tnowhere.jpeg\n")
    with pytest.raises(ManifestError, match="9999"):
        LocalTrainer().train(ds, tmp_path / "m", seed=0)


def test_cli_trains_the_slot_model_and_evaluate_prints_slot_accuracy(slot_dataset, tmp_path, capsys):
    from factory_assets.cli.model import main

    assert main(["train", "--dataset", str(slot_dataset), "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "(slots)" in out and "slot geometry learned" in out
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--dataset", str(slot_dataset)]) == 0
    assert "slots: accuracy" in capsys.readouterr().out


def test_the_slot_overlay_shows_the_frame_with_the_boxes_the_model_reads(slot_result, slot_dataset):
    import cv2

    from factory_assets.vision.preview import slot_overlay_png

    jpeg = sorted((slot_dataset / "valid-imgs").glob("*.jpeg"))[0].read_bytes()
    frame = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    overlay = cv2.imdecode(np.frombuffer(slot_overlay_png(slot_result.model, jpeg), np.uint8), cv2.IMREAD_COLOR)
    assert overlay.shape == frame.shape and (overlay != frame).any()
