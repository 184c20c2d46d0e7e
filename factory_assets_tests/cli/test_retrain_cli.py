"""``factory-assets retrain --from D --to D`` runs retrain_job on a Dagster instance."""
from __future__ import annotations

from datetime import timedelta

from factory_assets.cli import main
from factory_assets_tests.datasets.test_labels import T0, simulate_day


def test_retrain_builds_from_exactly_the_days_given_and_deploys_only_a_model_that_passed(
        fdb, tmp_path, monkeypatch, mongo_uri, database_name, capsys):
    from factory_assets.serving.server import InferenceServer

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    monkeypatch.setenv("FACTORY_HOME", str(tmp_path / "home"))
    simulate_day(fdb, seconds=100, seed=1, change_every=8)
    simulate_day(fdb, seconds=400, start=T0 + timedelta(days=1), seed=2, change_every=8)
    srv = InferenceServer("127.0.0.1", 0, endpoint_name="factory-stock", log=lambda *_: None)
    srv.follow(mongo_uri, database_name, poll_seconds=0.1)
    srv.start()
    monkeypatch.setenv("FACTORY_ENDPOINT_URL", srv.url)
    day2 = (T0 + timedelta(days=1)).strftime("%Y-%m-%d")
    try:
        code = main(["retrain", "--factory", "factory-1", "--from", day2, "--to", day2])
    finally:
        srv.stop()
    out = capsys.readouterr().out
    # only day 2 was labelled and used
    assert fdb.labels.count_documents({"frame_ts": {"$lt": T0 + timedelta(days=1)}}) == 0
    dataset = fdb.datasets.find_one()
    n = dataset["counts"]["train"]["images"] + dataset["counts"]["valid"]["images"]
    assert n == fdb.labels.count_documents({})
    model = fdb.models.find_one()
    assert model is not None and model["dataset_version"] == dataset["version"]
    endpoint = fdb.endpoints.find_one({"name": "factory-stock/factory-1/txt-cam"})  # the factory's camera's
    if model["passed_checks"]:
        assert code == 0 and "deployed model" in out and endpoint["model_version"] == model["_id"]
    else:
        assert "failed a blocking check" in out and endpoint is None
    assert list((tmp_path / "dagster_home").iterdir())  # the run is recorded on the instance


def test_retrain_refuses_a_misspelt_day_or_a_reversed_range_before_touching_dagster(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    assert main(["retrain", "--from", "2026-13-01", "--to", "2026-11-02"]) == 1
    assert main(["retrain", "--from", "2026-11-03", "--to", "2026-11-02"]) == 1
    err = capsys.readouterr().err
    assert "'2026-13-01' is not a day (YYYY-MM-DD)" in err and "2026-11-03 is after 2026-11-02" in err
    assert not (tmp_path / "dagster_home").exists()  # no run was started


def test_one_day_parser_and_window_of_recent_days():
    from datetime import datetime, timezone

    from factory_assets.vocabulary.clock import day_range, parse_day, recent_days

    assert parse_day("2026-11-22") == datetime(2026, 11, 22, tzinfo=timezone.utc)
    assert day_range("2026-11-29", "2026-12-01") == ["2026-11-29", "2026-11-30", "2026-12-01"]
    assert recent_days(3, now=datetime(2026, 3, 1, 5, tzinfo=timezone.utc)) == ["2026-02-27", "2026-02-28",
                                                                                  "2026-03-01"]
