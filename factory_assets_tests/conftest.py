import os

import pytest

from factory_assets_tests.fixtures.models import model_server, sim_dataset, sim_jpeg, trained_models  # noqa: F401
from factory_assets_tests.fixtures.mongo import database_name, fdb, mongo_uri, shared_dataset  # noqa: F401
from factory_assets_tests.fixtures.mqtt import mqtt_broker  # noqa: F401


@pytest.fixture(scope="session", autouse=True)
def factory_home(tmp_path_factory):
    """Each test session (each pytest-xdist worker) has a FACTORY_HOME of its own, inherited by
    the processes the tests start: nothing a test runs writes into the project's `.factory`
    (Mosquitto's persistence, a Dagster home, models) or into another worker's."""
    saved = os.environ.get("FACTORY_HOME")
    home = tmp_path_factory.mktemp("factory_home_default")
    os.environ["FACTORY_HOME"] = str(home)
    try:
        yield home
    finally:
        if saved is None:
            os.environ.pop("FACTORY_HOME", None)
        else:
            os.environ["FACTORY_HOME"] = saved
