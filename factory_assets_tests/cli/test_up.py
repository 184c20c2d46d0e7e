"""``factory-assets up``: the services it starts."""
from __future__ import annotations

import subprocess
import sys


def test_dagster_loads_the_definitions_up_names_from_outside_the_repository(tmp_path):
    # after `pip install .` the user runs `factory-assets up` anywhere: no workspace.yaml there
    from factory_assets.cli.up import DAGSTER_TARGET, build_services

    dagster = next(s for s in build_services(1883, 3000, 8080, 2.0, 0) if s.name == "dagster")
    assert dagster.argv[dagster.argv.index("dev") + 1:][:len(DAGSTER_TARGET)] == DAGSTER_TARGET
    result = subprocess.run([sys.executable, "-m", "dagster", "definitions", "validate", *DAGSTER_TARGET],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={"DAGSTER_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Validation successful" in result.stdout + result.stderr
