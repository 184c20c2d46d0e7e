"""Import a dataset in the original layout, rebuild manifests, and every bad input."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from factory_assets.datasets.importer import DatasetImportError, import_dataset
from factory_assets.datasets.lst import read_lst
from factory_assets.datasets.manifests import DatasetBuildError, build_dataset, current_dataset
from factory_assets.simulation.datasets import write_simulated_dataset

LAYOUT = ["all-imgs", "train-imgs", "valid-imgs", "train-annots/train.lst", "valid-annots/valid.lst"]


def labels_by_image(root: Path, split: str) -> dict:
    """sha256 of each image -> its labels, as the manifest says."""
    rows = read_lst(root / f"{split}-annots" / f"{split}.lst", image_dir=root / f"{split}-imgs")
    return {hashlib.sha256((root / f"{split}-imgs" / r.path).read_bytes()).hexdigest(): r.labels for r in rows}


@pytest.fixture
def small_dataset(tmp_path):
    return write_simulated_dataset(tmp_path / "original", n_train=12, n_valid=5, seed=7)


def test_an_imported_dataset_rebuilds_to_the_same_labels_splits_and_bytes(fdb, small_dataset, tmp_path):
    summary = import_dataset(fdb, small_dataset)
    assert summary.frames_new == 17 and summary.by_split == {"train": 12, "valid": 5}
    built = build_dataset(fdb, tmp_path / "datasets")
    for entry in LAYOUT:
        assert (built.path / entry).exists(), entry
    for split in ("train", "valid"):
        assert labels_by_image(built.path, split) == labels_by_image(small_dataset, split)
    assert len(list((built.path / "all-imgs").iterdir())) == 17
    assert current_dataset(fdb)["version"] == built.version and current_dataset(fdb)["path"] == str(built.path)
    assert built.counts["train"]["images"] == 12 and built.counts["valid"]["images"] == 5


def test_importing_twice_stores_nothing_new_and_the_version_is_stable(fdb, small_dataset, tmp_path):
    import_dataset(fdb, small_dataset)
    first = build_dataset(fdb, tmp_path / "datasets")
    again = import_dataset(fdb, small_dataset)
    assert again.frames_new == 0 and again.frames_existing == 17 and again.labels["new"] == 0
    assert fdb.frames.count_documents({}) == 17 and fdb.labels.count_documents({}) == 17
    second = build_dataset(fdb, tmp_path / "datasets")
    assert second.version == first.version and second.reused
    assert [p.name for p in (tmp_path / "datasets").iterdir()] == [first.version]  # no staging left behind


def test_the_shared_real_photos_import_with_their_original_labels(fdb, shared_dataset, tmp_path):
    summary = import_dataset(fdb, shared_dataset)
    assert summary.by_split == {"train": 16, "valid": 8}
    built = build_dataset(fdb, tmp_path / "datasets")
    for split in ("train", "valid"):
        assert labels_by_image(built.path, split) == labels_by_image(shared_dataset, split)


def _corrupt(root: Path, split: str, line: str) -> None:
    lst = root / f"{split}-annots" / f"{split}.lst"
    lines = lst.read_text().splitlines()
    lines[1] = line
    lst.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("bad_line, message", [
    ("2\t1\t0\t/etc/passwd", "columns"),
    ("2\t1\t0\t2\ttrain-00001.jpeg", "not 0 or 1"),
    ("1\t1\t0\t0\ttrain-00001.jpeg", "duplicate index"),
    ("2\t1\t0\t0\tmissing.jpeg", "does not exist"),
    ("2\t1\t0\t0\t../valid-imgs/valid-00000.jpeg", "escapes"),
], ids=["columns", "non-binary", "duplicate-index", "missing-file", "escaping-path"])
def test_a_bad_manifest_line_is_refused_with_file_and_line_and_nothing_is_written(fdb, small_dataset, bad_line,
                                                                                  message):
    _corrupt(small_dataset, "train", bad_line)
    with pytest.raises(DatasetImportError, match=message) as err:
        import_dataset(fdb, small_dataset)
    assert "train.lst:2" in str(err.value)
    assert fdb.frames.count_documents({}) == 0 and fdb.labels.count_documents({}) == 0


def test_an_undecodable_image_is_refused_naming_the_manifest_line(fdb, small_dataset):
    rows = read_lst(small_dataset / "valid-annots" / "valid.lst")
    (small_dataset / "valid-imgs" / rows[2].path).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DatasetImportError, match=r"valid.lst:3: image .* is not usable"):
        import_dataset(fdb, small_dataset)
    assert fdb.frames.count_documents({}) == 0


def test_an_empty_split_is_refused(fdb, small_dataset):
    (small_dataset / "valid-annots" / "valid.lst").write_text("")
    with pytest.raises(DatasetImportError, match="valid split is empty"):
        import_dataset(fdb, small_dataset)


def test_building_without_labels_or_with_an_empty_split_fails_clearly(fdb, tmp_path):
    with pytest.raises(DatasetBuildError, match="no labelled frames"):
        build_dataset(fdb, tmp_path / "datasets")
    assert not any((tmp_path / "datasets").glob("*")) if (tmp_path / "datasets").exists() else True


def test_a_label_for_a_frame_that_no_longer_exists_is_reported(fdb, small_dataset, tmp_path):
    import_dataset(fdb, small_dataset)
    victim = fdb.labels.find_one({"split": "train"})
    fdb.frames.delete_one({"_id": victim["frame_id"]})
    with pytest.raises(DatasetBuildError, match="does not exist"):
        build_dataset(fdb, tmp_path / "datasets")
    assert [p for p in (tmp_path / "datasets").iterdir()] == []  # the staging folder was removed


def test_fetching_images_in_small_batches_writes_the_same_dataset(fdb, small_dataset, tmp_path, monkeypatch):
    import factory_assets.datasets.manifests as manifests

    import_dataset(fdb, small_dataset)
    whole = build_dataset(fdb, tmp_path / "a")
    monkeypatch.setattr(manifests, "FETCH_BATCH", 3)
    batched = build_dataset(fdb, tmp_path / "b")
    assert batched.version == whole.version
    for split in ("train", "valid"):
        lst = f"{split}-annots/{split}.lst"
        assert (batched.path / lst).read_bytes() == (whole.path / lst).read_bytes()
