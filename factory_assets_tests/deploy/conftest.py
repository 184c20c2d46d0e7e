from factory_assets_tests.fixtures.postgres import postgres_cluster, postgres_database  # noqa: F401
