"""The figures benchmarks/fleet.py reports: a frame the twin never showed is never hidden by the percentiles,
and a cheaper fleet counts only when it kept up."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fleet.py"


@pytest.fixture(scope="module")
def fleet():
    spec = importlib.util.spec_from_file_location("benchmark_fleet", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_percentiles_are_nearest_rank_over_the_frames_shown(fleet):
    summary = fleet.latency_summary([float(v) for v in range(1, 101)])
    assert summary == {"frames": 100, "not_shown": 0, "p50_ms": 50.0, "p95_ms": 95.0, "max_ms": 100.0}


def test_a_frame_the_twin_never_showed_counts_as_infinitely_late(fleet):
    few = fleet.latency_summary([10.0] * 97, missing=3)
    assert (few["p50_ms"], few["p95_ms"], few["max_ms"], few["not_shown"]) == (10.0, 10.0, None, 3)
    many = fleet.latency_summary([10.0] * 90, missing=10)
    assert (many["p50_ms"], many["p95_ms"]) == (10.0, None)
    assert fleet.latency_summary([], missing=0)["p95_ms"] is None


def test_the_live_path_kept_up_only_when_it_showed_every_frame_and_stayed_within_five_seconds(fleet):
    assert fleet.kept_up(0, 40, n=10, fps=1.0)
    assert not fleet.kept_up(0, 60, n=10, fps=1.0)
    assert not fleet.kept_up(1, 0, n=10, fps=1.0)
    assert not fleet.kept_up(0, None, n=10, fps=1.0)


def test_the_cost_ratio_is_per_factory_at_n_over_per_factory_at_one(fleet):
    assert fleet.cost_ratio(0.13, 0.10) == 1.3
    assert fleet.cost_ratio(None, 0.10) is None and fleet.cost_ratio(0.1, 0.0) is None


def test_a_cheaper_fleet_that_fell_behind_does_not_meet_the_cost_target(fleet):
    def result(n, share, kept):
        return {"factories": n, "cpu": {"platform_per_factory_share_of_a_core": share},
                "frames": {"live_path_kept_up": kept},
                "frame_to_twin": {"per_factory_p95_ms_max": None, "p95_ms": None},
                "agreement": {"min": 1.0, "factories_at_or_above_98pct": n}}

    behind = fleet.targets([result(1, 0.10, True), result(50, 0.04, False)])
    assert behind["cost_per_factory_50_over_1"]["value"] == 0.4
    assert behind["cost_per_factory_50_over_1"]["met"] is False
    assert behind["frame_to_twin_p95_ms_at_50"]["met"] is False
    assert fleet.targets([result(1, 0.10, True), result(50, 0.12, True)])["cost_per_factory_50_over_1"]["met"]
