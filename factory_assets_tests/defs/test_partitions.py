"""Where the daily partitions start: FACTORY_PARTITIONS_START, read when the code location loads."""
import subprocess
import sys

import pytest

from factory_assets.defs.partitions import DEFAULT_PARTITIONS_START, partitions_start, within_partitions


def test_the_days_start_at_the_configured_day_or_the_default():
    assert partitions_start({"FACTORY_PARTITIONS_START": "2026-12-01"}) == "2026-12-01"
    assert partitions_start({"FACTORY_PARTITIONS_START": " "}) == partitions_start({}) == DEFAULT_PARTITIONS_START
    assert DEFAULT_PARTITIONS_START > "2024-01-01"  # not years of empty days


def test_a_start_that_is_not_a_day_fails_the_load_with_the_variables_name():
    with pytest.raises(ValueError, match="FACTORY_PARTITIONS_START must be a day .* not '2026-13-01'"):
        partitions_start({"FACTORY_PARTITIONS_START": "2026-13-01"})


def test_a_retraining_range_is_cut_to_the_days_that_are_partitions():
    assert within_partitions(["2026-11-30", "2026-12-01", "2026-12-02"], first_day="2026-12-01") \
        == ["2026-12-01", "2026-12-02"]


def test_every_factory_day_asset_of_the_code_location_starts_on_the_configured_day(tmp_path):
    # a fresh process, as dagster loads the code location: the variable is read at load
    code = ("import dagster as dg\n"
            "from factory_assets.definitions import defs\n"
            "keys = {str(a.key.path[-1]): a.partitions_def.get_partitions_def_for_dimension('day')\n"
            "        .get_first_partition_key() for a in defs.resolve_all_asset_specs()\n"
            "        if isinstance(a.partitions_def, dg.MultiPartitionsDefinition)}\n"
            "print(sorted(set(keys.values())), sorted(keys))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={"FACTORY_PARTITIONS_START": "2026-12-01", "PATH": "/usr/bin:/bin"}).stdout
    assert out.strip() == "['2026-12-01'] ['labeled_images', 'raw_frames', 'stock_inferences', 'training_manifests']"
