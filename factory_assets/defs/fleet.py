"""The fleet in Dagster: which factories exist, and the MongoDB queries of one factory's day.

Factories are discovered, not configured: ``factory_discovery_sensor`` registers every
``factory_id`` the ingesters stamped on a frame as a key of the dynamic ``factory`` partitions
(``SensorResult(dynamic_partitions_requests=[AddDynamicPartitionsRequest(...)])``), so a new
factory appears in the UI, and its assets can run, by itself. Its cursor is the frame ``seq``:
a tick asks MongoDB for the distinct factories of the frames stored since the last one (one
``distinct`` over an index range of what arrived, whatever the history or the number of
factories) and the instance only about those factories. The very first tick (no cursor) reads
the factories already in the database from the ``factories`` collection (one small document per
factory), after the frame horizon: the ingester records a factory before it stores its frames.

A factory id must be usable as a partition key, in a run tag and in a model name
(``<factory_id>--<camera_id>--<version>``): letters, digits, ``_``, and ``.`` or ``-`` between
them. Another id is not registered; the tick says which and why (rename the prefix mapping).
"""
from __future__ import annotations

import json
import logging
from datetime import datetime

import dagster as dg

from factory_assets.defs.partitions import FACTORY_DIMENSION, factory_partitions
from factory_assets.defs.resources import MongoResource
from factory_assets.vocabulary import DEFAULT_FACTORY_ID

logger = logging.getLogger(__name__)

DISCOVERY_INTERVAL_S = 15
SEQ_WINDOW = 200_000  # frame seqs one tick looks at; a longer backlog is read over the next ticks


def valid_factory_id(factory_id) -> bool:
    """Whether ``factory_id`` can be a partition key and part of a model name."""
    from factory_assets.serving.models import InvalidModelName, model_name

    try:
        model_name(factory_id, "c", "v")
    except InvalidModelName:
        return False
    return True


def factory_of(doc: dict) -> str:
    """The factory of a frame or inference (documents written before factories had ids: the default one)."""
    return doc.get("factory_id") or DEFAULT_FACTORY_ID


def factory_queries(factory_id: str, start: datetime, end: datetime, field: str = "ts") -> list[dict]:
    """The frames of ``factory_id`` captured in [start, end): each query an index range
    (``factory_ts``: factory first). The default factory also owns frames stored without a
    ``factory_id``; ``ts`` stored as ISO text in original documents is a second branch (a range
    on text matches text only; SecantusDB plans no index for a top-level ``$or``)."""
    iso = {"$gte": start.strftime("%Y-%m-%dT%H:%M:%S"), "$lt": end.strftime("%Y-%m-%dT%H:%M:%S")}
    owners = [factory_id, None] if factory_id == DEFAULT_FACTORY_ID else [factory_id]
    return [{"factory_id": owner, field: window} for owner in owners
            for window in ({"$gte": start, "$lt": end}, iso)]


def registered_factories(instance) -> list[str]:
    return list(instance.get_dynamic_partitions(FACTORY_DIMENSION))


def unregistered(instance, factory_ids) -> list[str]:
    """The valid ids among ``factory_ids`` that are not partitions yet (one lookup per id asked about)."""
    return [f for f in sorted({str(f) for f in factory_ids if f is not None})
            if valid_factory_id(f) and not instance.has_dynamic_partition(FACTORY_DIMENSION, f)]


def factories_in_database(fdb) -> set[str]:
    """Every factory with a frame: one read of the ``factories`` collection (one small document
    per factory, written by the ingester before it stores a factory's first frame;
    ``storage.factories``), whatever the history."""
    from factory_assets.storage.factories import factories_with_frames

    return factories_with_frames(fdb)


def factories_between(fdb, after: int, upto: int) -> set[str]:
    """The factories of the frames with ``after < seq <= upto``: one ``distinct`` over that index
    range, and one look for frames stored without a factory (the default factory's)."""
    window = {"seq": {"$gt": after, "$lte": upto}}
    ids = {f for f in fdb.frames.distinct("factory_id", window) if isinstance(f, str)}
    if fdb.frames.find_one({**window, "factory_id": None}, {"_id": 1}) is not None:
        ids.add(DEFAULT_FACTORY_ID)
    return ids


@dg.sensor(minimum_interval_seconds=DISCOVERY_INTERVAL_S, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Registers every factory_id seen on a stored frame as a partition of the dynamic "
                       "'factory' dimension (frames, labels, manifests, inferences per factory and day; the "
                       "model and its deployment per factory).")
def factory_discovery_sensor(context: dg.SensorEvaluationContext, mongo: MongoResource):
    """A new factory becomes a ``factory`` partition on the tick after its first frame is stored.
    Cursor: the frame ``seq`` read up to. Cost per tick: the counter, one ``distinct`` over the
    frames stored since the last tick, one look for frames without a factory, and one instance
    lookup per factory among those frames, whatever the history and however many factories are
    registered."""
    from factory_assets.storage.frames import FrameSequence

    fdb = mongo.fdb()
    cursor = json.loads(context.cursor) if context.cursor else None
    horizon = FrameSequence(fdb).horizon()
    if cursor is None:  # the first tick: the factories already stored (read after the horizon)
        seen, upto = factories_in_database(fdb), horizon
    else:
        after = int(cursor["seq"])
        upto = min(horizon, after + SEQ_WINDOW)
        seen = factories_between(fdb, after, upto) if upto > after else set()
    bad = sorted(f for f in seen if not valid_factory_id(f))
    if bad:
        context.log.warning(f"not registered (a factory id must be letters, digits, '_', with '.' or '-' between "
                            f"them): {', '.join(map(repr, bad))}")
    new = unregistered(context.instance, seen)
    next_cursor = json.dumps({"seq": upto})
    if not new:
        return dg.SensorResult(cursor=next_cursor, skip_reason=dg.SkipReason(
            f"No new factory among the frames up to seq {upto}" + (f" ({len(seen)} factories sent frames)."
                                                                    if seen else ".")))
    context.log.info(f"new factories: {', '.join(new)}")
    return dg.SensorResult(cursor=next_cursor,
                           dynamic_partitions_requests=[factory_partitions.build_add_request(new)])
