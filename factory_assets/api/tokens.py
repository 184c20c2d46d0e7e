"""API bearer tokens: created once (shown once), stored as SHA-256 hashes, revocable.

A token is ``fa_<43 url-safe characters>`` (256 random bits), so a hash without a salt
is enough: nobody brute-forces 256 bits, and the lookup stays one indexed ``_id`` read.
Scopes: ``read`` (follow the twin) and ``write`` (also change the desired state).
"""
from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass

from pymongo.errors import DuplicateKeyError

from factory_assets.vocabulary import utcnow

logger = logging.getLogger(__name__)

TOKENS_COLLECTION = "api_tokens"
SCOPES = ("read", "write")
PREFIX = "fa_"


@dataclass(frozen=True)
class TokenInfo:
    name: str
    scope: str
    revoked: bool


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def tokens(fdb):
    return fdb.db[TOKENS_COLLECTION]


def create_token(fdb, name: str, scope: str = "write") -> str:
    """A new token (the only time its clear text exists); ``name`` must be unused."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}")
    if not name or len(name) > 100:
        raise ValueError("a token needs a name of 1-100 characters")
    ensure_indexes(fdb)  # the CLI may create the first token before any API has started
    token = PREFIX + secrets.token_urlsafe(32)
    try:
        # active_name is unique (ensure_indexes) and unset on revoke: two creators racing on one
        # name cannot both succeed, where a count-then-insert let both through
        tokens(fdb).insert_one({"_id": _hash(token), "name": name, "active_name": name, "scope": scope,
                                "hint": token[:7], "created_at": utcnow(), "revoked_at": None})
    except DuplicateKeyError:
        raise ValueError(f"an active token named {name!r} exists; revoke it first") from None
    logger.info("API token %r created (scope %s)", name, scope)
    return token


def check_token(fdb, token: str | None) -> TokenInfo | None:
    """The token's name and scope, or None when unknown. Never logs the token."""
    if not token or not token.startswith(PREFIX) or len(token) > 200:
        return None
    doc = tokens(fdb).find_one({"_id": _hash(token)})
    if doc is None:
        return None
    return TokenInfo(doc["name"], doc.get("scope", "read"), doc.get("revoked_at") is not None)


def revoke_token(fdb, name: str) -> int:
    result = tokens(fdb).update_many({"name": name, "revoked_at": None},
                                     {"$set": {"revoked_at": utcnow()}, "$unset": {"active_name": ""}})
    return result.modified_count


def list_tokens(fdb) -> list[dict]:
    return [{"name": d["name"], "scope": d.get("scope"), "hint": d.get("hint"), "created_at": d.get("created_at"),
             "revoked_at": d.get("revoked_at")}
            for d in tokens(fdb).find({}, {"_id": 0}).sort("created_at", 1)]


def ensure_indexes(fdb) -> None:
    coll = tokens(fdb)
    coll.create_index("name", name="name")
    # Tokens created before active_name existed: the oldest active one per name gets it
    # (a duplicate left by the old race stays valid and is revoked with its name).
    taken = set(coll.distinct("active_name"))
    for doc in coll.find({"revoked_at": None, "active_name": {"$exists": False}},
                         {"name": 1}).sort("created_at", 1):
        if doc["name"] not in taken:
            coll.update_one({"_id": doc["_id"]}, {"$set": {"active_name": doc["name"]}})
            taken.add(doc["name"])
    coll.create_index("active_name", unique=True, sparse=True, name="active_name")
