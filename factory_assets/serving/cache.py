"""Many models in one server, as a SageMaker multi-model endpoint hosts them: a bounded LRU cache.

``ModelCache`` keeps loaded models by name within ``max_bytes`` (the bytes of each model's
arrays, ``model_nbytes``). Two ways in:

- ``get(name)``: on-demand, what ``/invocations`` with a target model does. A model not in
  the cache is loaded from the source (registry, folder or S3; ``serving.models``), warmed
  up, and the least recently used models are evicted until it fits. Concurrent requests
  for the same cold model wait for one load.
- ``load(name, url)``: explicit, SageMaker's ``POST /models``. ``ModelAlreadyLoaded`` (409)
  when the name is loaded or loading; ``NoRoom`` (507) when it does not fit: the container
  contract leaves the choice of what to unload to SageMaker, so nothing is evicted here.

A model bigger than the whole cache is ``NoRoom`` either way. A request that picked up a
model keeps it to the end even if it is evicted meanwhile (eviction drops the cache's
reference only). Nothing here knows about HTTP; everything is safe to call from threads.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from factory_assets.serving.follower import LoadedModel, warm_up
from factory_assets.serving.models import (BadArtifact, InvalidModelName, ModelNotFound, SourceChain,
                                           model_from_path, parse_model_name)
from factory_assets.vocabulary.clock import utcnow

logger = logging.getLogger(__name__)

CACHE_BYTES_ENV = "FACTORY_MODEL_CACHE_BYTES"
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
# What a loaded model costs beyond its arrays (Python objects, allocator slack): 50 presence models
# loaded into a running server added 124 KiB of RSS each, 89 KiB of it arrays. Counted so that the
# limit tracks the process's memory, and many tiny models still add up.
MODEL_OVERHEAD_BYTES = 36 * 1024


class ModelAlreadyLoaded(Exception):
    """``POST /models`` for a name already loaded (or being loaded): 409."""


class NoRoom(Exception):
    """The model does not fit in the cache's byte limit: 507."""


class ModelLoadError(Exception):
    """The model is there but cannot be served (unreadable artifact, fails its warm-up)."""


def cache_bytes_from_env(environ=None) -> int:
    environ = os.environ if environ is None else environ
    raw = environ.get(CACHE_BYTES_ENV)
    if raw in (None, ""):
        return DEFAULT_CACHE_BYTES
    try:
        value = int(float(raw))
    except ValueError:
        raise ValueError(f"{CACHE_BYTES_ENV}={raw!r} is not a number of bytes") from None
    if value <= 0:
        raise ValueError(f"{CACHE_BYTES_ENV} must be positive (got {value})")
    return value


def model_nbytes(model) -> int:
    """The bytes a model holds: its numpy arrays (attributes and one level below: lists,
    dicts, small objects such as the slot geometry) plus ``MODEL_OVERHEAD_BYTES``."""
    import numpy as np

    seen: set[int] = set()

    def arrays(obj, depth: int) -> int:
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            return obj.nbytes
        if depth <= 0:
            return 0
        if isinstance(obj, dict):
            return sum(arrays(v, depth - 1) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(arrays(v, depth - 1) for v in obj)
        if hasattr(obj, "__dict__") and not isinstance(obj, type):
            return sum(arrays(v, depth - 1) for v in vars(obj).values())
        return 0

    return arrays(model, 3) + MODEL_OVERHEAD_BYTES


@dataclass
class CachedModel:
    """One loaded model: its name, where it came from, the model and its size."""

    name: str
    url: str
    loaded: LoadedModel
    nbytes: int
    hits: int = 0
    last_used: int = 0  # the cache's use counter at the last use (not a clock)
    loads: int = 1      # times this name has been loaded into this cache, this time included

    @property
    def version(self) -> str:
        return self.loaded.version

    def view(self) -> dict:
        """The container contract's entry (``modelName``, ``modelUrl``) and ours beside it."""
        return {"modelName": self.name, "modelUrl": self.url, "modelVersion": self.version, "bytes": self.nbytes,
                "hits": self.hits, "loads": self.loads, "loadedAt": self.loaded.loaded_at.isoformat()}


@dataclass
class CacheStats:
    loads: int = 0                 # models loaded, in total
    evictions: int = 0             # models evicted to make room
    unloads: int = 0               # models unloaded on request (DELETE /models/{name})
    hits: int = 0
    misses: int = 0
    loads_by_name: dict = field(default_factory=dict)  # name -> times loaded (survives eviction)


class ModelCache:
    """Loaded models by name, least recently used first, within ``max_bytes``."""

    def __init__(self, max_bytes: int | None = None, source=None, *, allowed_roots=(), warm: bool = True):
        self.max_bytes = cache_bytes_from_env() if max_bytes is None else int(max_bytes)
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive (got {self.max_bytes})")
        self.source = source if source is not None else SourceChain([])
        # POST /models may name a local path only under one of these (SageMaker: /opt/ml/models)
        self.allowed_roots = [Path(r).resolve() for r in allowed_roots]
        self.warm = warm
        self.stats = CacheStats()
        self._entries: OrderedDict[str, CachedModel] = OrderedDict()
        self._loading: dict[str, Future] = {}
        self._bytes = 0
        self._uses = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ModelCache({len(self._entries)} models, {self._bytes}/{self.max_bytes} bytes, {self.source!r})"

    # ---- reading ---------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        """Loaded names, least recently used first."""
        with self._lock:
            return list(self._entries)

    def entries(self) -> list[CachedModel]:
        """Loaded models in name order (stable for pagination)."""
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.name)

    def entry(self, name: str) -> CachedModel | None:
        """The loaded model ``name`` without counting a use (GET /models/{name})."""
        return self._entries.get(name)

    def lookup(self, name: str) -> CachedModel | None:
        """The loaded model ``name``, counted as a use (most recently used now); None if not loaded."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                self._use(entry)
            return entry

    def summary(self) -> dict:
        s = self.stats
        return {"loaded": len(self._entries), "bytes": self._bytes, "max_bytes": self.max_bytes, "loads": s.loads,
                "evictions": s.evictions, "unloads": s.unloads, "hits": s.hits, "misses": s.misses,
                "source": repr(self.source)}

    def _use(self, entry: CachedModel) -> None:  # under the lock
        self._uses += 1
        entry.hits += 1
        entry.last_used = self._uses
        self.stats.hits += 1
        self._entries.move_to_end(entry.name)

    # ---- on demand ----------------------------------------------------------
    def get(self, name: str) -> CachedModel:
        """The model ``name``, loaded from the source if needed (evicting the least recently
        used to make room). ``InvalidModelName``, ``ModelNotFound``, ``NoRoom``,
        ``ModelLoadError``, or the source's own error (database or S3 unreachable)."""
        parsed = parse_model_name(name)
        key = str(parsed)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._use(entry)
                return entry
            pending = self._loading.get(key)
            owner = pending is None
            if owner:
                pending = self._loading[key] = Future()
                self.stats.misses += 1
        if not owner:
            entry = pending.result()
            with self._lock:
                if entry.name in self._entries:
                    self._use(entry)
            return entry
        try:
            model, url = self._fetch(lambda: self.source.fetch(parsed), key)
            entry = self._insert(key, url, model, evict=True)
        except BaseException as exc:
            with self._lock:
                self._loading.pop(key, None)
            pending.set_exception(exc)
            raise
        with self._lock:
            self._loading.pop(key, None)
        pending.set_result(entry)
        return entry

    # ---- explicit (the container contract) ---------------------------------------
    def load(self, name: str, url: str | None = None) -> CachedModel:
        """``POST /models``: load ``name`` from ``url`` (a local path under ``allowed_roots``)
        or, without one, from the source by name. ``ModelAlreadyLoaded``; ``NoRoom`` without
        evicting anything; ``PermissionError`` for a path outside the allowed roots."""
        if not isinstance(name, str) or not name or len(name) > 1024 or any(c.isspace() or c == "/" for c in name):
            raise InvalidModelName(f"model_name {name!r}: 1 to 1024 characters, no spaces or '/'")
        with self._lock:
            if name in self._entries or name in self._loading:
                raise ModelAlreadyLoaded(f"model {name} is already loaded")
            pending = self._loading[name] = Future()
        try:
            if url:
                path = self._allowed(url)
                model, url = self._fetch(lambda: (model_from_path(path), str(path)), name)
            else:
                parsed = parse_model_name(name)
                model, url = self._fetch(lambda: self.source.fetch(parsed), name)
            entry = self._insert(name, url, model, evict=False)
        except BaseException as exc:
            with self._lock:
                self._loading.pop(name, None)
            pending.set_exception(exc)
            pending.exception()  # retrieved: nobody else waits on an explicit load
            raise
        with self._lock:
            self._loading.pop(name, None)
        pending.set_result(entry)
        return entry

    def unload(self, name: str) -> bool:
        """``DELETE /models/{name}``: drop it; False when it was not loaded."""
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is None:
                return False
            self._bytes -= entry.nbytes
            self.stats.unloads += 1
        logger.info("model %s unloaded (%d bytes; %d/%d bytes in use)", name, entry.nbytes, self._bytes,
                    self.max_bytes)
        return True

    # ---- internals ---------------------------------------------------------
    def _allowed(self, url: str) -> Path:
        if url.startswith("file://"):
            url = url[len("file://"):]
        if "://" in url:
            raise InvalidModelName(f"url {url!r}: this server loads models from local paths only "
                                   "(leave url out to load the name from its sources)")
        path = Path(url).resolve()
        if not any(path == root or root in path.parents for root in self.allowed_roots):
            roots = ", ".join(str(r) for r in self.allowed_roots) or "none configured"
            raise PermissionError(f"url {url!r} is outside the model folders this server reads ({roots})")
        if not path.exists():
            raise ModelNotFound(f"nothing at {url}")
        return path

    def _fetch(self, fetch, name: str):
        try:
            model, url = fetch()
        except (ModelNotFound, InvalidModelName, PermissionError):
            raise
        except BadArtifact as exc:
            raise ModelLoadError(str(exc)) from exc
        except ValueError as exc:  # vision.model.ModelFormatError
            raise ModelLoadError(f"model {name}: {exc}") from exc
        if self.warm:
            try:
                warm_up(model)
            except Exception as exc:
                raise ModelLoadError(f"model {name} failed its warm-up prediction: {exc}") from exc
        return model, url

    def _insert(self, name: str, url: str, model, *, evict: bool) -> CachedModel:
        size = model_nbytes(model)
        if size > self.max_bytes:
            raise NoRoom(f"model {name} needs {size} bytes, more than the whole cache ({self.max_bytes} bytes)")
        evicted = []
        with self._lock:
            if not evict and self._bytes + size > self.max_bytes:
                raise NoRoom(f"model {name} needs {size} bytes; {self.max_bytes - self._bytes} of {self.max_bytes} "
                             "are free (unload a model first)")
            while self._bytes + size > self.max_bytes and self._entries:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.nbytes
                self.stats.evictions += 1
                evicted.append(old)
            entry = CachedModel(name, url, LoadedModel(model.version, model, utcnow()), size)
            self._entries[name] = entry
            self._bytes += size
            self._uses += 1
            entry.last_used = self._uses
            self.stats.loads += 1
            self.stats.loads_by_name[name] = entry.loads = self.stats.loads_by_name.get(name, 0) + 1
        for old in evicted:
            logger.info("model %s evicted (least recently used, %d bytes) to make room for %s", old.name,
                        old.nbytes, name)
        logger.info("model %s loaded from %s (version %s, %d bytes; %d/%d bytes in use)", name, url, model.version,
                    size, self._bytes, self.max_bytes)
        return entry
