"""``factory-assets dataset import|autolabel|build`` and ``factory-assets label`` against a real MongoDB."""
from __future__ import annotations

import json
from datetime import timedelta

from factory_assets.cli import main
from factory_assets.datasets.labels import effective_labels
from factory_assets.simulation.datasets import write_simulated_dataset
from factory_assets_tests.datasets.test_labels import T0, simulate_day


def _json_out(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_dataset_import_then_build_from_the_command_line(fdb, tmp_path, capsys):
    src = write_simulated_dataset(tmp_path / "original", n_train=6, n_valid=3, seed=2)
    assert main(["dataset", "import", str(src)]) == 0
    assert _json_out(capsys)["rows_by_split"] == {"train": 6, "valid": 3}
    assert main(["dataset", "import", str(src)]) == 0
    assert _json_out(capsys)["frames_new"] == 0
    assert main(["dataset", "build", "--out", str(tmp_path / "ds")]) == 0
    built = _json_out(capsys)
    assert built["counts"]["train"]["images"] == 6 and built["counts"]["valid"]["images"] == 3
    assert fdb.datasets.find_one({"_id": built["version"]})["path"] == built["path"]


def test_a_bad_dataset_is_refused_with_the_file_and_line_and_exit_code_1(fdb, tmp_path, capsys):
    src = write_simulated_dataset(tmp_path / "original", n_train=4, n_valid=2, seed=2)
    lst = src / "valid-annots" / "valid.lst"
    lst.write_text(lst.read_text() + "99\t1\t0\n")
    assert main(["dataset", "import", str(src)]) == 1
    err = capsys.readouterr().err
    assert "valid.lst:3" in err and "columns" in err
    assert fdb.frames.count_documents({}) == 0


def test_labelling_a_frame_by_hand_and_from_a_csv(fdb, tmp_path, capsys):
    simulate_day(fdb, seconds=4)
    ids = [str(f["_id"]) for f in fdb.frames.find({}, {"_id": 1}).sort("ts", 1)]
    assert main(["label", ids[0], "--present", "blue,red", "--user", "alice"]) == 0
    assert "blue, red (manual)" in capsys.readouterr().out
    assert main(["label", ids[1], "--empty"]) == 0
    csv = tmp_path / "labels.csv"
    csv.write_text(f"frame_id,blue,red,white\n{ids[2]},0,0,1\n")
    assert main(["label", "--csv", str(csv)]) == 0
    manual = {str(d["frame_id"]): d for d in effective_labels(fdb) if d["source"] == "manual"}
    assert manual[ids[0]]["present"] == {"blue": True, "red": True, "white": False}
    assert manual[ids[0]]["provenance"]["user"] == "alice"
    assert not any(manual[ids[1]]["present"].values())
    assert manual[ids[2]]["present"]["white"] and manual[ids[2]]["provenance"]["line"] == 2
    assert main(["label", "0123456789abcdef01234567", "--present", "blue"]) == 1
    assert "no frame" in capsys.readouterr().err


def test_autolabel_from_the_command_line_labels_the_selected_days(fdb, capsys):
    simulate_day(fdb, seconds=60)
    simulate_day(fdb, seconds=60, start=T0 + timedelta(days=1), seed=5)
    day = T0.strftime("%Y-%m-%d")
    assert main(["dataset", "autolabel", "--from", day, "--to", day]) == 0
    summary = _json_out(capsys)
    assert summary["frames"] == 60 and summary["labelled"] > 20
    assert all(lab["frame_ts"] < T0 + timedelta(days=1) for lab in effective_labels(fdb))
