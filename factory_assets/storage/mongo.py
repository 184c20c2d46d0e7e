"""Connecting to MongoDB: ``MONGODB_URI`` when set, otherwise the embedded daemon."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field, fields

from factory_assets import config


class MongoUnavailable(RuntimeError):
    pass


def resolve_uri(explicit: str | None = None) -> str:
    """``explicit`` > ``MONGODB_URI`` > the running embedded daemon's discovery file."""
    if explicit:
        return explicit
    env = os.environ.get("MONGODB_URI")
    if env:
        return env
    from factory_assets.storage.embedded import EmbeddedMongo

    embedded = EmbeddedMongo()
    uri = embedded.uri()
    if uri:
        return uri
    raise MongoUnavailable(
        "No MongoDB: MONGODB_URI is not set and the embedded MongoDB is not running "
        f"(state file {embedded.state_file}). Start it with `factory-assets db start`."
    )


def redact_uri(uri: str) -> str:
    """The URI without credentials, fit for logs and metadata."""
    if "@" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


_clients: dict[tuple[int, str], object] = {}
_clients_lock = threading.Lock()


def get_client(uri: str | None = None):
    """A process-wide, fork-safe cached ``MongoClient`` per URI."""
    from pymongo import MongoClient

    uri = resolve_uri(uri)
    key = (os.getpid(), uri)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = MongoClient(uri, serverSelectionTimeoutMS=10_000, tz_aware=True,
                                 appname="factory_assets")
            _clients[key] = client
        return client


@dataclass(frozen=True)
class CollectionNames:
    """Collection names; the defaults are the original project's so an existing
    Atlas database and Unity twin keep working."""

    frames: str = "factory_camera"
    sensors: str = "sensors"
    mqtt: str = "mqtt"
    quarantine: str = "error_handling"
    counters: str = "counters"
    labels: str = "labels"
    datasets: str = "datasets"
    models: str = "models"
    endpoints: str = "endpoints"
    inferences: str = "inferences"
    twin_legacy: str = "sagemaker_stock_inference"
    twin: str = "digital_twin"
    twin_history: str = "twin_history"

    @classmethod
    def from_env(cls) -> "CollectionNames":
        """``FACTORY_COLLECTION_<FIELD>`` overrides a name (e.g. FACTORY_COLLECTION_FRAMES)."""
        overrides = {}
        for f in fields(cls):
            value = os.environ.get(f"FACTORY_COLLECTION_{f.name.upper()}")
            if value:
                overrides[f.name] = value
        return cls(**overrides)


@dataclass
class FactoryDB:
    """A database plus the collection names the project uses in it."""

    db: object  # pymongo.database.Database
    names: CollectionNames = field(default_factory=CollectionNames)

    def __getattr__(self, item):
        # fdb.frames -> the frames collection, fdb.quarantine -> error_handling ...
        names = object.__getattribute__(self, "names")
        if item in CollectionNames.__dataclass_fields__:
            return object.__getattribute__(self, "db")[getattr(names, item)]
        raise AttributeError(item)


def connect(uri: str | None = None, database: str | None = None,
            names: CollectionNames | None = None, ensure_indexes: bool = True) -> FactoryDB:
    client = get_client(uri)
    fdb = FactoryDB(client[database or config.database_name()], names or CollectionNames.from_env())
    if ensure_indexes:
        from factory_assets.storage.indexes import ensure_indexes as _ensure

        _ensure(fdb)
    return fdb
