"""Ingest past one process: shards that each own whole factories, and hand them over without a gap.

A fleet's factories are the ``--prefix`` list (one prefix per factory). Shard ``k`` of ``N``
owns the prefixes at positions ``k, k+N, k+2N...`` of that list, so every shard computes the
same split from the same list, and a factory's frames all go through one process, in order.
A shard's MQTT client id is derived from its name (``factory-assets-ingest-shard-<name>``):
a replacement process (a restarted pod of a StatefulSet, ``up`` restarting a crashed shard)
connects with the same id and resumes the shard's persistent session, so it receives what the
broker queued for the shard meanwhile.

Why not MQTT 5 shared subscriptions (``$share/group/#``)? On Mosquitto they lose what shards
are for: the broker hands each message to one member of the group in turn, offline members
included; what it queued for an offline member stays with it (the others do not get it); and
one camera's frames are spread over every member, so no process sees a factory's frames in
order. docs/mqtt.md has the details.

**Handing a factory over.** MQTT keeps a persistent session's subscriptions across
connections, so a shard restarted with fewer factories (the fleet list or the shard count
changed) still receives the ones it gave up. Each shard records the topic filters its session
holds in ``counters`` (``mqtt-session:<client id>``, written once the broker acknowledged the
subscription, and again at every look, about every 30 s). A filter the shard no longer owns is
kept, and what arrives through it stored as usual (a duplicate of what its new owner stores is
counted, not stored twice), until another session's fresh record holds it (refreshed in the last
90 s: a removed shard's old record counts for nothing) or no factory of the fleet is under it
any more; then the shard unsubscribes. So no message falls between the old owner letting go
and the new one subscribing.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import timedelta

from factory_assets.vocabulary import utcnow
from factory_assets.vocabulary.mqtt import TopicPrefix

logger = logging.getLogger(__name__)

SESSION_RECORD_PREFIX = "mqtt-session:"
SHARD_CLIENT_ID_PREFIX = "factory-assets-ingest-shard-"


def shard_client_id(name: str) -> str:
    """The MQTT client id of shard ``name``: every process running that shard resumes its session."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", SHARD_CLIENT_ID_PREFIX + str(name))


def shard_index(name: str, shards: int) -> int:
    """The position ``k`` (0 .. shards-1) named by a shard: ``2``, or a StatefulSet pod's ``ingester-2``."""
    match = re.fullmatch(r"(?:.*\D)?(\d+)", str(name))
    if not match:
        raise ValueError(f"shard {name!r} names no number: with --shards N the shard is 0..N-1 "
                         "(or a name ending in one, as a StatefulSet's pods: ingester-0, ingester-1 ...)")
    index = int(match.group(1))
    if not 0 <= index < shards:
        raise ValueError(f"shard {name!r} is outside 0..{shards - 1} (--shards {shards})")
    return index


def split_prefixes(prefixes: list[TopicPrefix], shards: int) -> list[list[TopicPrefix]]:
    """The factories of each of ``shards`` shards: position ``i`` goes to shard ``i % shards``.
    Refuses more shards than factories (a shard owns whole factories: one factory's frames are
    never split, their order would be lost) and a fleet whose factories are not all prefixed."""
    if shards < 1:
        raise ValueError(f"the number of shards must be at least 1, got {shards}")
    if shards == 1:
        return [list(prefixes)]
    if len(prefixes) < shards:
        have = ("is one factory" + ("" if prefixes else " (no --prefix)") if len(prefixes) <= 1
                else f"are {len(prefixes)} factories")
        raise ValueError(f"{shards} ingester shards need at least {shards} factories, one --prefix PREFIX[=FACTORY_ID] "
                         f"each; there {have}. A shard owns whole factories: one factory's frames go through one "
                         "process, in order")
    if any(not p.prefix for p in prefixes):
        raise ValueError("with several shards every factory needs a prefix: the unprefixed factory's subscription "
                         "(#) receives every factory's topics, so its shard would receive the whole fleet")
    return [prefixes[k::shards] for k in range(shards)]


@dataclass
class ShardPlan:
    """What one ingester process subscribes to (``own``) and what it can attribute (``fleet``)."""
    own: list[TopicPrefix]
    fleet: list[TopicPrefix]
    name: str | None = None

    @classmethod
    def make(cls, prefixes: list[TopicPrefix], *, shard: str | None = None, shards: int | None = None) -> "ShardPlan":
        if shards is not None and shard is None:
            raise ValueError("--shards N needs --shard K (which of the N shards this process runs)")
        if shards is None:
            return cls(list(prefixes), list(prefixes), shard)
        index = shard_index(shard, shards)
        return cls(split_prefixes(list(prefixes), shards)[index], list(prefixes), shard)

    @property
    def client_id(self) -> str | None:
        return shard_client_id(self.name) if self.name is not None else None


class SessionRecords:
    """The topic filters each ingester's persistent session holds, in ``counters``."""

    def __init__(self, fdb):
        self.fdb = fdb

    def held(self, client_id: str) -> set[str]:
        doc = self.fdb.counters.find_one({"_id": SESSION_RECORD_PREFIX + client_id}) or {}
        return set(doc.get("subscriptions") or ())

    def record(self, client_id: str, filters: set[str]) -> None:
        self.fdb.counters.update_one({"_id": SESSION_RECORD_PREFIX + client_id},
                                     {"$set": {"subscriptions": sorted(filters), "at": utcnow()}}, upsert=True)

    def held_elsewhere(self, client_id: str, topic_filter: str, max_age_s: float) -> bool:
        """Another session's record, refreshed within ``max_age_s``, holds ``topic_filter``. A
        record its shard stopped refreshing (a shard removed for good) counts for nothing: it
        must not make a shard let go of a factory before the factory's new owner subscribed."""
        fresh = utcnow() - timedelta(seconds=max_age_s)
        return self.fdb.counters.find_one({"_id": {"$regex": "^" + re.escape(SESSION_RECORD_PREFIX),
                                                   "$ne": SESSION_RECORD_PREFIX + client_id},
                                           "subscriptions": topic_filter, "at": {"$gte": fresh}},
                                          {"_id": 1}) is not None
