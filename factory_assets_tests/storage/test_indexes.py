from datetime import datetime, timedelta, timezone

import pytest
from pymongo.errors import DuplicateKeyError

from factory_assets.storage.indexes import _ensure_one_legacy_document_per_partition

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=timezone.utc)


def test_duplicate_legacy_twin_documents_left_by_an_older_version_collapse_to_the_newest(fdb):
    # Before the unique index, two racing first writers could both insert a DTPartition document.
    coll = fdb.db["legacy_before_the_unique_index"]
    coll.insert_many([{"_partition": "DTPartition", "ts": T0 + timedelta(seconds=s), "is_present": {"blue": s == 9}}
                      for s in (3, 9, 5)])
    coll.insert_one({"_partition": "other", "ts": T0})
    _ensure_one_legacy_document_per_partition(coll)
    assert coll.count_documents({"_partition": "DTPartition"}) == 1
    assert coll.find_one({"_partition": "DTPartition"})["ts"] == T0 + timedelta(seconds=9)
    assert coll.count_documents({"_partition": "other"}) == 1
    with pytest.raises(DuplicateKeyError):
        coll.insert_one({"_partition": "DTPartition", "ts": T0})


def test_the_legacy_twin_index_is_created_once_and_is_idempotent(fdb):
    _ensure_one_legacy_document_per_partition(fdb.twin_legacy)
    _ensure_one_legacy_document_per_partition(fdb.twin_legacy)
    assert fdb.twin_legacy.index_information()["partition_unique"]["unique"] is True
