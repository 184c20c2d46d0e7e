"""The shipped example client (examples/follow_twin.py) against the real API."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from factory_assets_tests.api.conftest import report

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "follow_twin.py"


def test_the_example_client_resumes_from_its_last_version(api, fdb):
    spec = importlib.util.spec_from_file_location("follow_twin", EXAMPLE)
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    url = f"{api.url}/api/factories/factory-1/twin/events"
    first = client.events(url, None, None)
    assert next(first)[:2] == (1, "snapshot")
    first.close()  # disconnect
    for k in range(1, 4):
        report(fdb, k)
    resumed = client.events(url, 1, None)
    got = [next(resumed)[:2] for _ in range(3)]
    resumed.close()
    assert got == [(2, "change"), (3, "change"), (4, "update")]
