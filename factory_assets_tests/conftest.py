from factory_assets_tests.fixtures.models import model_server, sim_dataset, sim_jpeg, trained_models  # noqa: F401
from factory_assets_tests.fixtures.mongo import database_name, fdb, mongo_uri, shared_dataset  # noqa: F401
from factory_assets_tests.fixtures.mqtt import mqtt_broker  # noqa: F401
