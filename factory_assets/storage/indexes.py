"""Indexes, created idempotently (create_index is a no-op when one exists).

For a fleet (docs/fleet.md): every query that concerns one factory leads with ``factory_id``
and is served by an index that starts with it (``factory_*`` below); these are also the
indexes behind the shard keys docs/fleet.md names. The few reads that span the fleet on
purpose (the frame ``seq`` cursor of the one live reader, a frame or inference by its id)
keep their own indexes. ``storage/test_hot_paths.py`` explains every hot-path query.
"""
from __future__ import annotations

import logging

from pymongo import ASCENDING, DESCENDING
from pymongo.errors import DuplicateKeyError, OperationFailure

log = logging.getLogger(__name__)

# Named here, not imported from datasets.manifests / twin.orders, so connect() stays light.
SPLITS_COLLECTION = "dataset_splits"
ORDERS_COLLECTION = "twin_orders"
CLOCKS_COLLECTION = "factory_clocks"  # storage.clocks

_done: set[tuple[int, str, str]] = set()


def ensure_indexes(fdb) -> None:
    key = (id(fdb.db.client), fdb.db.name, repr(fdb.names))
    if key in _done:
        return
    has_sha = {"sha256": {"$exists": True}}
    # One document per frame: duplicate deliveries (same camera, ts, bytes) collide here.
    fdb.frames.create_index([("camera_id", ASCENDING), ("ts", ASCENDING), ("sha256", ASCENDING)],
                            unique=True, partialFilterExpression=has_sha, name="frame_identity")
    # The never-skipping read cursor (see storage/frames.py).
    # sparse rather than partial: some servers (SecantusDB) only plan range scans on sparse ones
    fdb.frames.create_index([("seq", ASCENDING)], unique=True, sparse=True, name="frame_seq")
    # Frames without a seq (written by other tools) sit under the null key of this non-sparse
    # index, so ``{"seq": None}`` finds them without a collection scan (see frames.UNSEQUENCED).
    fdb.frames.create_index([("seq", ASCENDING), ("_id", ASCENDING)], name="frame_seq_id")
    fdb.frames.create_index([("ts", ASCENDING)], name="frame_ts")
    fdb.frames.create_index([("sha256", ASCENDING)], name="frame_sha")  # the importer's dedup lookup
    fdb.frames.create_index([("factory_id", ASCENDING), ("seq", DESCENDING)], name="factory_seq")
    # one factory's frames of a time range (a factory x day partition); the shard key's index
    fdb.frames.create_index([("factory_id", ASCENDING), ("ts", ASCENDING)], name="factory_ts")
    fdb.sensors.create_index([("topic", ASCENDING), ("ts", DESCENDING)], name="topic_ts")
    fdb.mqtt.create_index([("topic", ASCENDING), ("ts", DESCENDING)], name="topic_ts")
    # one factory's newest message on a topic (the twin's stock, station and order states)
    fdb.mqtt.create_index([("factory_id", ASCENDING), ("topic", ASCENDING), ("ts", DESCENDING)],
                          name="factory_topic_ts")
    fdb.mqtt.create_index([("message_id", ASCENDING)], unique=True, sparse=True, name="message_id")
    # What arrived since the live updater's last look is an ``_id`` range (storage.arrivals: the
    # ObjectId the ingester's write gets, on the ``_id`` index every collection has): fleet-wide on
    # purpose like the frames' seq, so not led by factory_id; each factory's reads that follow are.
    # Whose clock estimate moved since the last look: fleet-wide too (one document per factory).
    fdb.db[CLOCKS_COLLECTION].create_index([("updated_at", ASCENDING)], name="updated_at")
    fdb.sensors.create_index([("message_id", ASCENDING)], unique=True, sparse=True, name="message_id")
    # one factory's readings of a topic over time
    fdb.sensors.create_index([("factory_id", ASCENDING), ("topic", ASCENDING), ("ts", DESCENDING)],
                             name="factory_topic_ts")
    fdb.quarantine.create_index([("fingerprint", ASCENDING)], unique=True, sparse=True, name="fingerprint")
    fdb.quarantine.create_index([("received_at", DESCENDING)], name="received_at")
    # One inference per frame and model version: the live and batch paths share work through it.
    fdb.inferences.create_index([("frame_id", ASCENDING), ("model_version", ASCENDING)], unique=True,
                                name="frame_model")
    fdb.inferences.create_index([("frame_ts", DESCENDING)], name="frame_ts")
    fdb.inferences.create_index([("frame_seq", ASCENDING)], name="frame_seq")
    fdb.inferences.create_index([("model_version", ASCENDING), ("frame_ts", DESCENDING)], name="model_frame_ts")
    # one factory's inferences over time (the fleet page, a factory's drift and day); the shard key's index
    fdb.inferences.create_index([("factory_id", ASCENDING), ("frame_ts", ASCENDING)], name="factory_frame_ts")
    # One label per frame and source (manual, import, auto).
    fdb.labels.create_index([("frame_id", ASCENDING), ("source", ASCENDING)], unique=True, name="frame_source")
    fdb.labels.create_index([("frame_ts", ASCENDING)], name="frame_ts")
    # one factory's labels over a time range (its dataset of some days); the shard key's index.
    # Labels from before they carried factory_id sit under its null keys until adopted (datasets.labels)
    fdb.labels.create_index([("factory_id", ASCENDING), ("frame_ts", ASCENDING)], name="factory_frame_ts")
    fdb.models.create_index([("created_at", DESCENDING)], name="created_at")
    fdb.models.create_index([("version", ASCENDING)], name="version")
    fdb.models.create_index([("passed_checks", ASCENDING), ("created_at", DESCENDING)], name="passed_created")
    fdb.endpoints.create_index([("name", ASCENDING)], unique=True, name="name")
    # twin_live_sensor reads a factory's changes after the version it last saw.
    fdb.twin_history.create_index([("factory_id", ASCENDING), ("version", ASCENDING)], name="factory_version")
    # a factory's changes over a time range (the fleet page's agreement over the last hour)
    fdb.twin_history.create_index([("factory_id", ASCENDING), ("at", ASCENDING)], name="factory_at")
    fdb.twin.create_index([("updated_at", DESCENDING)], name="updated_at")
    # a factory's next queued order (twin.orders.next_send names it as its hint: it must exist
    # wherever the dispatcher runs, so it is made here too, not only by twin.orders.ensure_indexes)
    fdb.db[ORDERS_COLLECTION].create_index([("factory_id", ASCENDING), ("state", ASCENDING), ("seq", ASCENDING),
                                            ("idx", ASCENDING)], name="factory_state_seq")
    _ensure_one_legacy_document_per_partition(fdb.twin_legacy)
    fdb.datasets.create_index([("built_at", DESCENDING)], name="built_at")
    # Sticky splits: the share of validation frames per label combination.
    splits = fdb.db[SPLITS_COLLECTION]
    splits.create_index([("combination", ASCENDING), ("split", ASCENDING)], name="combination_split")
    _done.add(key)


def _ensure_one_legacy_document_per_partition(coll) -> None:
    """A unique ``_partition``: concurrent first writers of the legacy twin cannot both insert.

    Versions before this index could leave two documents for one partition under that race;
    they are collapsed to the newest (by ``ts``) before the index is built.
    """
    try:
        coll.create_index([("_partition", ASCENDING)], unique=True, name="partition_unique")
        return
    except (DuplicateKeyError, OperationFailure) as exc:
        if isinstance(exc, OperationFailure) and exc.code not in (11000, 11001):
            raise
    removed = 0
    for group in coll.aggregate([{"$group": {"_id": "$_partition", "n": {"$sum": 1}}}, {"$match": {"n": {"$gt": 1}}}]):
        keep = coll.find_one({"_partition": group["_id"]}, sort=[("ts", DESCENDING)], projection={"_id": 1})
        removed += coll.delete_many({"_partition": group["_id"], "_id": {"$ne": keep["_id"]}}).deleted_count
    log.warning("%s: removed %d older duplicate legacy twin documents", coll.name, removed)
    coll.create_index([("_partition", ASCENDING)], unique=True, name="partition_unique")
