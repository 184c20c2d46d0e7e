"""The local stock model: quality on the real photos, robustness, persistence,
determinism, where thresholds come from, and training without the real photos."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from factory_assets.backends import Trainer
from factory_assets.backends.local import LocalTrainer, evaluate
from factory_assets.datasets.reading import scene_of
from factory_assets.vocabulary import CLASSES
from factory_assets.vision.fit import choose_threshold
from factory_assets.vision.model import ARTIFACT_NAME, ModelFormatError, StockModel
from factory_assets_tests.vision.synthetic import write_synthetic_dataset

# read in place from /work/shared, never copied into the project
REAL_DATASET = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "fischertechnik-warehouse"

PER_LABEL_BAR = 0.90
EXACT_MATCH_BAR = 0.75
PERTURBED_BAR = 0.85

# The design (features, per-class hyper-parameters, thresholds) was chosen by
# leave-one-scene-out CV on the train split and perturbed copies of train photos
# only; the valid split was then evaluated once: per-label 1.000, exact 1.000.


def _real_dataset() -> Path:
    if not (REAL_DATASET / "train-annots" / "train.lst").is_file():
        pytest.skip(f"the shared real-photo dataset is absent ({REAL_DATASET.resolve()}); "
                    "it is read in place and never copied into the project")
    return REAL_DATASET


@pytest.fixture(scope="module")
def real_model(tmp_path_factory):
    dataset = _real_dataset()
    out = tmp_path_factory.mktemp("real_model")
    return LocalTrainer().train(dataset, out, seed=0)


@pytest.fixture(scope="module")
def synthetic_dataset(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"))


# ---- quality on the real photos ---------------------------------------------


def test_model_trained_on_train_split_meets_quality_bar_on_validation_photos(real_model):
    report = evaluate(real_model.model, _real_dataset(), split="valid")
    print("valid:", report["per_label_accuracy"], report["exact_match"], report["confusion"])
    assert report["n_images"] == 8
    assert report["per_label_accuracy"] >= PER_LABEL_BAR
    assert report["exact_match"] >= EXACT_MATCH_BAR


def test_evaluation_report_has_per_class_metrics_confusion_counts_and_model_identity(real_model):
    report = evaluate(real_model.model, _real_dataset())
    assert report["model_version"] == real_model.model.version
    assert set(report["thresholds"]) == set(CLASSES)
    for c in CLASSES:
        pc = report["per_class"][c]
        assert {"precision", "recall", "f1", "accuracy", "tp", "fp", "tn", "fn"} <= set(pc)
        assert pc["tp"] + pc["fp"] + pc["tn"] + pc["fn"] == report["n_images"]
        assert report["confusion"][c] == {k: pc[k] for k in ("tp", "fp", "tn", "fn")}


def test_cli_trains_and_evaluate_json_prints_one_object_that_meets_the_bar(tmp_path, capsys):
    from factory_assets.cli.model import main

    dataset = _real_dataset()
    assert main(["train", "--dataset", str(dataset), "--out", str(tmp_path / "m"), "--seed", "0"]) == 0
    assert "trained stock model" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--dataset", str(dataset), "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out)  # the whole of stdout is one JSON object
    assert report["per_label_accuracy"] >= PER_LABEL_BAR
    assert report["exact_match"] >= EXACT_MATCH_BAR


PERTURBATIONS = {
    "shift+4x": dict(dx=4), "shift-4x": dict(dx=-4), "shift+4y": dict(dy=4), "shift-4y": dict(dy=-4),
    "rot+2": dict(angle=2), "rot-2": dict(angle=-2), "bright0.6": dict(gain=0.6), "bright1.4": dict(gain=1.4),
    "contrast0.7": dict(contrast=0.7), "gamma0.7": dict(gamma=0.7), "gamma1.4": dict(gamma=1.4),
}


def _perturb(img: np.ndarray, p: dict) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), p.get("angle", 0.0), 1.0)
    m[:, 2] += (p.get("dx", 0), p.get("dy", 0))
    x = cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
    x = 255.0 * (x / 255.0) ** p.get("gamma", 1.0)
    x = (x - x.mean()) * p.get("contrast", 1.0) + x.mean()
    return np.clip(x * p.get("gain", 1.0), 0, 255).astype(np.uint8)


def test_model_holds_up_on_perturbed_copies_of_held_out_train_scenes():
    """Robustness without touching the validation split: fit on 6 of the 8 train
    scenes, then predict shifted / rotated / relit copies of the 2 held-out scenes."""
    from factory_assets.datasets.reading import load_image, read_split
    from factory_assets.vision.fit import fit_stock_model

    image_dir, rows = read_split(_real_dataset(), "train")
    held_out = {"blue, red, white", "only red"}
    fit_rows = [r for r in rows if scene_of(r.path) not in held_out]
    test_rows = [r for r in rows if scene_of(r.path) in held_out]
    assert len(test_rows) == 4
    model, _ = fit_stock_model([load_image(image_dir / r.path) for r in fit_rows],
                               np.array([r.labels for r in fit_rows]), [scene_of(r.path) for r in fit_rows], seed=0)
    images, y = [], []
    for r in test_rows:
        img = load_image(image_dir / r.path)
        for p in PERTURBATIONS.values():
            images.append(_perturb(img, p))
            y.append(r.labels)
    pred = np.array([[d[c] for c in CLASSES] for d in model.predict(images)]).astype(int)
    per_label = float((pred == np.array(y)).mean())
    print(f"perturbed held-out train scenes ({len(images)} images): per-label {per_label:.3f}, "
          f"exact {float((pred == np.array(y)).all(axis=1).mean()):.3f}")
    assert per_label >= PERTURBED_BAR


PERTURBED_COPIES_PER_LABEL_BAR = 0.97  # the bar for perturbed copies of the real photos
PERTURBED_COPIES_EXACT_BAR = 0.90


def test_model_meets_the_perturbed_copies_bar_on_held_out_train_scenes():
    """The issue's perturbations (``vision.perturb``, fixed seed), train split only: leave one
    train scene out, fit on the other seven, predict 10 perturbed copies of each held-out photo."""
    from factory_assets.backends.local import leave_one_scene_out
    from factory_assets.vision.perturb import perturbed_copies

    ok = leave_one_scene_out(_real_dataset(), lambda photos: [
        {"perturbed": c} for c in perturbed_copies(photos, 10, seed=7)], seed=0)["perturbed"]
    per_label, exact = float(ok.mean()), float(ok.all(axis=1).mean())
    print(f"perturbed copies of held-out train scenes ({len(ok)} images): per-label {per_label:.3f}, exact {exact:.3f}")
    assert len(ok) == 160
    assert per_label >= PERTURBED_COPIES_PER_LABEL_BAR
    assert exact >= PERTURBED_COPIES_EXACT_BAR


def test_model_holds_up_on_shifted_rotated_and_relit_copies_of_validation_photos(real_model, tmp_path):
    import cv2
    from factory_assets.datasets.lst import read_lst

    dataset = _real_dataset()
    rows = read_lst(dataset / "valid-annots" / "valid.lst")
    out = tmp_path / "perturbed"
    (out / "valid-imgs").mkdir(parents=True)
    (out / "valid-annots").mkdir()
    lines, i = [], 0
    for r in rows:
        img = cv2.imread(str(dataset / "valid-imgs" / r.path))
        for tag, p in PERTURBATIONS.items():
            i += 1
            name = f"{i:03d} {tag}.jpeg"
            cv2.imwrite(str(out / "valid-imgs" / name), _perturb(img, p))
            lines.append(f"{i}\t" + "\t".join(map(str, r.labels)) + f"\t{name}\n")
    (out / "valid-annots" / "valid.lst").write_text("".join(lines))
    report = evaluate(real_model.model, out)
    print(f"perturbed valid ({report['n_images']} images): per-label {report['per_label_accuracy']:.3f}, "
          f"exact {report['exact_match']:.3f}")
    assert report["n_images"] == 8 * len(PERTURBATIONS)
    assert report["per_label_accuracy"] >= PERTURBED_BAR


def test_predicting_one_jpeg_from_bytes_matches_predicting_its_decoded_array(real_model):
    # speed is measured in benchmarks/inference.py, not asserted here
    from factory_assets.vision.decode import decode_image

    data = (_real_dataset() / "valid-imgs" / "only blue.jpeg").read_bytes()
    model = real_model.model
    from_bytes = model.predict_proba_bytes(data)
    assert len(from_bytes) == 3 and all(0.0 <= p <= 1.0 for p in from_bytes)
    assert from_bytes == pytest.approx(list(model.predict_proba([decode_image(data)])[0]))
    assert model.decide(np.array(from_bytes))[0]["blue"]


def test_cli_evaluate_json_prints_exactly_one_json_object(real_model, capsys):
    from factory_assets.cli.model import main

    assert main(["evaluate", "--model", str(real_model.model_dir), "--dataset", str(_real_dataset()), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_version"] == real_model.model.version
    assert {"per_label_accuracy", "exact_match", "n_images", "per_class", "thresholds"} <= set(report)


# ---- artifact, determinism, thresholds ----------------------------------------


def test_saved_and_loaded_model_gives_identical_probabilities_and_version(real_model, tmp_path):
    import cv2

    model = real_model.model
    images = [cv2.imread(str(p)) for p in sorted((_real_dataset() / "valid-imgs").glob("*.jpeg"))]
    expected = model.predict_proba(images)
    model.save(tmp_path / "saved")
    loaded = StockModel.load(tmp_path / "saved")
    from_bytes = StockModel.from_bytes(model.to_bytes())
    for other in (loaded, from_bytes):
        assert other.version == model.version
        assert other.thresholds == model.thresholds
        assert other.classes == CLASSES
        np.testing.assert_array_equal(other.predict_proba(images), expected)
    assert from_bytes.to_bytes() == model.to_bytes()


def test_artifact_is_a_plain_npz_without_pickled_objects(real_model):
    import io

    with np.load(io.BytesIO(real_model.model.to_bytes()), allow_pickle=False) as npz:
        assert {"model_json", "reference", "weights"} <= set(npz.files)
        assert all(npz[k].dtype != object for k in npz.files)


def test_garbage_bytes_are_rejected_as_model_or_image(real_model):
    with pytest.raises(ModelFormatError):
        StockModel.from_bytes(b"not a model")
    with pytest.raises(ValueError):
        real_model.model.predict_proba_bytes(b"not a jpeg")


def test_training_twice_with_the_same_seed_gives_the_same_model(real_model, tmp_path):
    again = LocalTrainer().train(_real_dataset(), tmp_path / "again", seed=0)
    assert again.model.version == real_model.model.version
    assert again.model.to_bytes() == real_model.model.to_bytes()


def test_thresholds_do_not_depend_on_the_validation_split(real_model, tmp_path):
    import cv2

    # same train split (symlinked, not copied), validation images replaced by black frames
    dataset = _real_dataset()
    alt = tmp_path / "alt"
    alt.mkdir()
    for name in ("train-imgs", "train-annots", "valid-annots"):
        os.symlink((dataset / name).resolve(), alt / name)
    (alt / "valid-imgs").mkdir()
    for p in (dataset / "valid-imgs").glob("*.jpeg"):
        cv2.imwrite(str(alt / "valid-imgs" / p.name), np.zeros((240, 320, 3), np.uint8))
    retrained = LocalTrainer().train(alt, tmp_path / "m", seed=0)
    assert retrained.model.thresholds == real_model.model.thresholds
    assert retrained.model.version == real_model.model.version
    assert "cross-validation" in retrained.metrics["thresholds_source"]


def test_training_writes_artifact_metrics_and_model_card(real_model):
    out = real_model.model_dir
    assert (out / ARTIFACT_NAME).is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 16 and metrics["seed"] == 0
    assert set(metrics["thresholds"]) == set(CLASSES)
    assert metrics["cv"]["out_of_fold"]["n_images"] == 16
    # recorded for the model card; how long training takes is benchmarks/train_eval.py's figure, not a test's
    assert isinstance(metrics["timing_seconds"]["total"], float) and metrics["timing_seconds"]["total"] > 0
    card = (out / "MODEL_CARD.md").read_text()
    assert real_model.model.version in card and "Limits" in card


# ---- without the real photos ------------------------------------------------


def test_local_trainer_satisfies_the_trainer_protocol():
    assert isinstance(LocalTrainer(), Trainer)


def test_trainer_learns_coloured_blobs_from_a_synthetic_dataset(synthetic_dataset, tmp_path):
    result = LocalTrainer().train(synthetic_dataset, tmp_path / "m", seed=0)
    report = evaluate(result.model, synthetic_dataset, split="valid")
    assert report["per_label_accuracy"] == 1.0, report["images"]
    # and single frames through predict(): each blob alone is recognised as its class
    from factory_assets_tests.vision.synthetic import draw_frame

    for k, c in enumerate(CLASSES):
        labels = tuple(int(i == k) for i in range(3))
        assert result.model.predict([draw_frame(labels, 1.1, shift=(-3, 2), seed=99)]) == [
            {cc: cc == c for cc in CLASSES}]


def test_synthetic_training_is_deterministic_and_seed_sensitive(synthetic_dataset, tmp_path):
    a = LocalTrainer().train(synthetic_dataset, tmp_path / "a", seed=3).model
    b = LocalTrainer().train(synthetic_dataset, tmp_path / "b", seed=3).model
    c = LocalTrainer().train(synthetic_dataset, tmp_path / "c", seed=4).model
    assert a.version == b.version and a.to_bytes() == b.to_bytes()
    assert c.version != a.version  # the seed drives the augmentation


def test_variants_of_one_scene_share_a_cross_validation_group():
    assert scene_of("blue, red - dark.jpeg") == scene_of("blue, red - light.jpeg") == "blue, red"
    assert scene_of("no pieces.jpeg") == "no pieces"


def test_threshold_maximises_accuracy_and_prefers_the_middle_when_tied():
    p = np.array([0.1, 0.2, 0.8, 0.9])
    assert choose_threshold(p, np.array([0, 0, 1, 1])) == 0.5
    assert choose_threshold(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 0, 1, 1])) == pytest.approx(0.25)


def test_evaluate_cli_reports_a_missing_model_as_one_json_error(tmp_path, capsys, synthetic_dataset):
    from factory_assets.cli.model import main

    assert main(["evaluate", "--model", str(tmp_path / "none"), "--dataset", str(synthetic_dataset), "--json"]) == 2
    assert "error" in json.loads(capsys.readouterr().out)


def test_trainer_reaches_the_bootstrap_bar_on_the_simulated_factory(tmp_path):
    """The simulated factory bootstraps the first model from rendered frames: 300
    training frames must give >= 0.95 per-label accuracy on 100 held-out ones."""
    from factory_assets.simulation.datasets import write_simulated_dataset

    dataset = write_simulated_dataset(tmp_path / "sim", n_train=300, n_valid=100, seed=0)
    result = LocalTrainer().train(dataset, tmp_path / "m", seed=0)
    report = evaluate(result.model, dataset, split="valid")
    print(f"simulated valid: per-label {report['per_label_accuracy']:.3f}, exact {report['exact_match']:.3f}")
    assert report["per_label_accuracy"] >= 0.95


def test_feature_hyperparameters_are_chosen_by_cross_validation_on_the_train_split(real_model):
    sel = real_model.metrics["hyperparameter_selection"]
    assert set(sel) == set(CLASSES)
    assert all(0.0 <= v["cv_score"] <= 1.0 for v in sel.values())
    assert real_model.model.config.pools == tuple(sel[c]["pool"] for c in CLASSES)


def test_far_design_is_opt_in_loadable_in_format_1_and_exclusive_with_robust(real_model, synthetic_dataset):
    """``fit_stock_model(far=True)`` (red evidence without its offset; chosen on the
    train-only ``--far-cv`` harness, NOT the default: on its one look at the validation
    split it read per-label 0.833 / exact 0.5 on the original photos): the default keeps
    the first models' red offset, the far model is a plain format-1 artifact, and
    robust / far do not mix."""
    from factory_assets.datasets.reading import load_image, read_split
    from factory_assets.vision.fit import FAR_FEATURES, fit_stock_model

    assert real_model.model.config.red_a == 4.0 and FAR_FEATURES.red_a == 0.0
    image_dir, rows = read_split(synthetic_dataset, "train")
    images = [load_image(image_dir / r.path) for r in rows]
    labels = np.array([r.labels for r in rows])
    groups = [scene_of(r.path) for r in rows]
    model, _ = fit_stock_model(images, labels, groups, seed=0, far=True, n_augment=2)
    assert model.config.red_a == 0.0 and model.config.is_v1
    again = StockModel.from_bytes(model.to_bytes())
    assert again.version == model.version
    np.testing.assert_array_equal(again.predict_proba(images[:2]), model.predict_proba(images[:2]))
    with pytest.raises(ValueError):
        fit_stock_model(images, labels, groups, seed=0, robust=True, far=True)
