"""Test helpers for the fleet's partitions: an instance that knows its factories, and their keys."""
from __future__ import annotations

import dagster as dg

from factory_assets.defs.partitions import FACTORY_DIMENSION, factory_day_key, factory_day_range_tags


def instance_with(*factories: str) -> dg.DagsterInstance:
    """An ephemeral instance where ``factories`` are registered partitions (as factory_discovery_sensor does)."""
    instance = dg.DagsterInstance.ephemeral()
    if factories:
        instance.add_dynamic_partitions(FACTORY_DIMENSION, list(factories))
    return instance


def key(factory_id: str, day: str) -> dg.MultiPartitionKey:
    return factory_day_key(factory_id, day)


def range_tags(factory_id: str, first: str, last: str) -> dict:
    return factory_day_range_tags(factory_id, [first, last])
