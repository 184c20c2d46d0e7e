from factory_assets_tests.fixtures.mongo import database_name, fdb, mongo_uri, shared_dataset  # noqa: F401

try:  # the MQTT broker fixture (real amqtt broker in a subprocess)
    from factory_assets_tests.fixtures.mqtt import mqtt_broker  # noqa: F401
except ImportError:  # pragma: no cover - while the fixture module is being written
    pass
