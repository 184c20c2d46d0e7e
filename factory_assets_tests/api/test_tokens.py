import threading

import pytest

from factory_assets.api.tokens import check_token, create_token, ensure_indexes, revoke_token, tokens


def test_creators_racing_on_one_name_get_one_active_token(fdb):
    # the name check used to be a count before the insert: all racers passed it
    barrier = threading.Barrier(6)
    created, refused = [], []

    def create():
        barrier.wait()
        try:
            created.append(create_token(fdb, "line-3"))
        except ValueError:
            refused.append(True)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(created) == 1 and len(refused) == 5
    assert tokens(fdb).count_documents({"name": "line-3", "revoked_at": None}) == 1


def test_a_revoked_name_can_be_given_to_a_new_token_and_the_old_one_stays_refused(fdb):
    old = create_token(fdb, "ops", "read")
    with pytest.raises(ValueError, match="exists"):
        create_token(fdb, "ops")
    assert revoke_token(fdb, "ops") == 1
    new = create_token(fdb, "ops", "write")
    assert check_token(fdb, old).revoked is True
    assert check_token(fdb, new).scope == "write" and check_token(fdb, new).revoked is False


def test_tokens_from_before_the_unique_name_keep_working_and_duplicates_are_revoked_together(fdb):
    # two active tokens with one name, as the old race could leave them
    for h in ("a" * 64, "b" * 64):
        tokens(fdb).insert_one({"_id": h, "name": "old", "scope": "read", "hint": "fa_xxxx",
                                "created_at": None, "revoked_at": None})
    ensure_indexes(fdb)
    assert tokens(fdb).count_documents({"active_name": "old"}) == 1
    with pytest.raises(ValueError, match="exists"):
        create_token(fdb, "old")
    assert revoke_token(fdb, "old") == 2
    create_token(fdb, "old")
