"""Runtime settings read from the environment *when called*, never at import time.

Everything a process needs to find the others lives under the factory home
(`FACTORY_HOME`, default `<project>/.factory`): the embedded MongoDB's data and
its discovery file, local datasets, local models.
"""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DATABASE = "smart_factory"
# Not 27017: a developer's own mongod often listens there.
DEFAULT_EMBEDDED_PORT = 27117
# MongoDB's BSON document limit is 16 MiB; keep headroom for the other fields.
DEFAULT_MAX_IMAGE_BYTES = 16 * 1024 * 1024 - 512 * 1024


def project_root() -> Path:
    """The checkout holding pyproject.toml when installed editable, else the cwd."""
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").exists():
        return here
    return Path.cwd()


def factory_home() -> Path:
    env = os.environ.get("FACTORY_HOME")
    return Path(env).expanduser().resolve() if env else project_root() / ".factory"


def database_name() -> str:
    return os.environ.get("MONGODB_DATABASE") or DEFAULT_DATABASE


def max_image_bytes() -> int:
    value = os.environ.get("FACTORY_MAX_IMAGE_BYTES")
    return int(value) if value else DEFAULT_MAX_IMAGE_BYTES


def env_number(name: str, default: float, kind=float):
    """A number >= 0 from the environment variable ``name`` (``default`` when unset or empty);
    a clear ValueError naming the variable otherwise. ``kind=int`` asks for a whole number."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        number = kind(value)
    except ValueError:
        raise ValueError(f"{name} must be a {'whole ' if kind is int else ''}number, not {value!r}") from None
    if not number >= 0:
        raise ValueError(f"{name} must be >= 0, not {value!r}")
    return number


def settle_seconds() -> float:
    """``FACTORY_SETTLE_S``: seconds after a reported stock change while the crane may still be
    moving (default ``vocabulary.DEFAULT_SETTLE_S``): no frame in it is auto-labelled, and the
    twin marks a vision/controller disagreement in it as ``in_transit`` (docs/twin.md)."""
    from factory_assets.vocabulary import DEFAULT_SETTLE_S

    return float(env_number("FACTORY_SETTLE_S", DEFAULT_SETTLE_S))
