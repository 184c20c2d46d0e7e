"""Partitions shared by the camera, dataset, model and inference assets: factories and UTC days.

Every factory is its own tenant (docs/fleet.md): ``factory_partitions`` is a dynamic partitions
definition named ``factory`` whose keys are the ``factory_id`` s seen in MongoDB, registered by
``factory_discovery_sensor`` (nobody configures them); ``factory_days`` crosses it with the
days (``MultiPartitionsDefinition``, keys ``<day>|<factory_id>``) for frames, labels, manifests
and inferences; the model and its deployment are partitioned by ``factory_partitions`` alone.

The first day is ``FACTORY_PARTITIONS_START`` (``YYYY-MM-DD``), read once when the code
location is loaded. ``factory-assets up`` (``make run``) sets it for Dagster to the day of the
first frame stored in the database, or today when the database holds no frame yet, so a
fresh stack shows one day, not years of "missing" partitions. Without it (``dagster dev``
on its own, the tests, the CLI), the days start at ``DEFAULT_PARTITIONS_START``.

Deliberately not read from the database here, nor derived from today's date: every process
that loads the definitions (webserver, daemon, each run worker) must agree on the days, also
when the database is down or its first frame changes, and a start that moves with the
calendar would drop a day in the middle of a run that targets it.
"""
from __future__ import annotations

import os

import dagster as dg

from factory_assets.vocabulary.clock import day_key, parse_day

START_ENV = "FACTORY_PARTITIONS_START"
# The first day of the camera history this code base has known (the earliest test data);
# a deployment with older frames sets FACTORY_PARTITIONS_START.
DEFAULT_PARTITIONS_START = "2026-11-01"


def partitions_start(environ=None) -> str:
    """The first partition day: ``FACTORY_PARTITIONS_START`` when set, else the default.
    A value that is not a day raises ``ValueError`` naming the variable (the code location
    then fails to load with that message instead of guessing)."""
    value = (os.environ if environ is None else environ).get(START_ENV, "").strip()
    if not value:
        return DEFAULT_PARTITIONS_START
    try:
        return day_key(parse_day(value))
    except ValueError:
        raise ValueError(f"{START_ENV} must be a day (YYYY-MM-DD), not {value!r}") from None


def daily_partitions_from(start: str) -> dg.DailyPartitionsDefinition:
    # end_offset=1: today's partition exists while frames for it are still arriving.
    return dg.DailyPartitionsDefinition(start_date=start, timezone="UTC", end_offset=1)


daily_partitions = daily_partitions_from(partitions_start())
FIRST_DAY = partitions_start()

FACTORY_DIMENSION = "factory"
DAY_DIMENSION = "day"
# the factories seen in MongoDB (factory_discovery_sensor adds them; nothing removes them)
factory_partitions = dg.DynamicPartitionsDefinition(name=FACTORY_DIMENSION)
# one factory's day: the dimensions are ordered by name, so keys read "<day>|<factory_id>"
factory_days = dg.MultiPartitionsDefinition({FACTORY_DIMENSION: factory_partitions, DAY_DIMENSION: daily_partitions})


def factory_day_key(factory_id: str, day: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({FACTORY_DIMENSION: factory_id, DAY_DIMENSION: day})


def factory_day_range_tags(factory_id: str, days: list[str]) -> dict[str, str]:
    """The run tags of one run over ``days`` of one factory (a single-run range of ``factory_days``:
    Dagster takes the cross product of each dimension's range, here one factory)."""
    return {"dagster/asset_partition_range_start": str(factory_day_key(factory_id, days[0])),
            "dagster/asset_partition_range_end": str(factory_day_key(factory_id, days[-1]))}


def days_by_factory(partition_keys) -> dict[str, list[str]]:
    """``factory_id -> [day, ...]`` (sorted) of the ``factory_days`` keys of a run (one key, or a range)."""
    out: dict[str, set] = {}
    for key in partition_keys:
        dims = key.keys_by_dimension if isinstance(key, dg.MultiPartitionKey) else \
            factory_days.get_partition_key_from_str(str(key)).keys_by_dimension
        out.setdefault(dims[FACTORY_DIMENSION], set()).add(dims[DAY_DIMENSION])
    return {f: sorted(days) for f, days in sorted(out.items())}


def within_partitions(days: list[str], first_day: str | None = None) -> list[str]:
    """The days of ``days`` that are partitions (on or after the first day), in order."""
    first = first_day or FIRST_DAY
    return [d for d in days if d >= first]
