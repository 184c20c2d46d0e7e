"""Registered models as objects: the registry (storage) keeps artifact bytes, vision
turns them back into a model. The one place that joins the two for serving and checks.

Also what a multi-model server needs to find a model by name:

- **Model names.** One model per (factory, camera) and version:
  ``<factory_id>--<camera_id>--<version>`` (``model_name``/``parse_model_name``), or
  the bare registry version. A name never changes meaning (a new version is a new
  name), so a cached model is never stale. In S3 (SageMaker multi-model endpoints)
  the model is the object ``<prefix>/<name>.tar.gz`` and ``TargetModel`` is
  ``<name>.tar.gz`` (``target_model_path``); the server accepts either form.
- **Sources.** ``RegistrySource`` (MongoDB: the version's artifact bytes),
  ``DirectorySource`` (``<root>/<name>.tar.gz`` or ``<root>/<name>/``),
  ``S3Source`` (``<prefix>/<name>.tar.gz``, boto3 imported only when used),
  ``SourceChain`` (the first that has it). Each ``fetch(name)`` returns
  ``(model, url)`` or raises ``ModelNotFound``.
"""
from __future__ import annotations

import io
import logging
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SEPARATOR = "--"
ARCHIVE_SUFFIX = ".tar.gz"
MAX_NAME_LENGTH = 200
# one part of a name: letters, digits, "_", and "." or "-" between them (so never "--", "..", a
# leading or trailing "-"/"."): the three parts split back unambiguously and are safe in paths and keys
_PART = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_]|[.-](?=[A-Za-z0-9_]))*$")
DEFAULT_ARTIFACT_LIMIT = 256 * 1024 * 1024  # an archive member bigger than this is refused


class ModelNotFound(LookupError):
    """No model of that name where the server looks (registry, folder, S3)."""


class InvalidModelName(ValueError):
    """Not a model name: ``<factory_id>--<camera_id>--<version>`` or a bare version."""


class BadArtifact(ValueError):
    """Something is there, but it does not hold a readable model (a broken upload, no artifact
    in the archive, over the size limit). ``vision.model.ModelFormatError`` is the other kind."""


def load_model(fdb, version: str):
    """The registered model ``version``, deserialised (a presence or a per-slot model)."""
    from factory_assets.storage.models import load_model_bytes
    from factory_assets.vision.model import StockModel

    return StockModel.from_bytes(load_model_bytes(fdb, version))


# ---------------------------------------------------------------------------
# names


@dataclass(frozen=True)
class ModelName:
    """A parsed model name; ``factory_id``/``camera_id`` are None for a bare version."""

    version: str
    factory_id: str | None = None
    camera_id: str | None = None

    def __str__(self) -> str:
        if self.factory_id is None:
            return self.version
        return SEPARATOR.join((self.factory_id, self.camera_id, self.version))


def _check_part(kind: str, value) -> str:
    if not isinstance(value, str) or not _PART.match(value):
        raise InvalidModelName(f"{kind} {value!r} cannot be part of a model name: use letters, digits, '_', "
                               "and '.' or '-' between them (never '--')")
    return value


def model_name(factory_id: str, camera_id: str, version: str) -> str:
    """``<factory_id>--<camera_id>--<version>``: the name a caller passes as the target model."""
    name = SEPARATOR.join((_check_part("factory_id", factory_id), _check_part("camera_id", camera_id),
                           _check_part("version", version)))
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidModelName(f"model name {name[:60]!r}... is longer than {MAX_NAME_LENGTH} characters")
    return name


def parse_model_name(name: str) -> ModelName:
    """``ModelName`` of ``f--c--v``, ``v``, or either with ``.tar.gz`` (SageMaker's TargetModel)."""
    if not isinstance(name, str) or not name:
        raise InvalidModelName("no model name given")
    if name.endswith(ARCHIVE_SUFFIX):
        name = name[: -len(ARCHIVE_SUFFIX)]
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidModelName(f"model name {name[:60]!r}... is longer than {MAX_NAME_LENGTH} characters")
    parts = name.split(SEPARATOR)
    if len(parts) == 1:
        return ModelName(_check_part("version", parts[0]))
    if len(parts) != 3:
        raise InvalidModelName(f"model name {name!r} is neither <factory_id>--<camera_id>--<version> "
                               "nor a registry version")
    factory_id, camera_id, version = parts
    return ModelName(_check_part("version", version), _check_part("factory_id", factory_id),
                     _check_part("camera_id", camera_id))


def target_model_path(name: str) -> str:
    """SageMaker's ``TargetModel`` for a model name: its archive's path under the endpoint's prefix."""
    name = str(parse_model_name(name))
    return name + ARCHIVE_SUFFIX


# ---------------------------------------------------------------------------
# reading a model from a folder, a file or an archive


def _artifact_name() -> str:
    from factory_assets.vision.model import ARTIFACT_NAME

    return ARTIFACT_NAME


def model_from_bytes(data: bytes):
    from factory_assets.vision.model import StockModel

    return StockModel.from_bytes(data)


def model_from_archive(data: bytes, *, limit: int = DEFAULT_ARTIFACT_LIMIT, label: str = "archive"):
    """The model in a ``model.tar.gz`` (as SageMaker packs ``/opt/ml/model``): its
    ``stock_model.npz`` member (the shallowest, a regular file); nothing is written to disk."""
    artifact = _artifact_name()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isreg() and Path(m.name).name == artifact]
            if not members:
                raise BadArtifact(f"{label} holds no {artifact}")
            member = min(members, key=lambda m: m.name.count("/"))
            if member.size > limit:
                raise BadArtifact(f"{label}: {member.name} is {member.size} bytes, over the {limit}-byte limit")
            return model_from_bytes(tar.extractfile(member).read())
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise BadArtifact(f"{label} is not a readable .tar.gz: {exc}") from exc


def model_from_path(path: str | Path, *, limit: int = DEFAULT_ARTIFACT_LIMIT):
    """A model folder (``stock_model.npz`` in it or in its ``model/``), the ``.npz`` itself,
    or a ``.tar.gz`` of a model folder."""
    path = Path(path)
    artifact = _artifact_name()
    if path.is_dir():
        for candidate in (path / artifact, path / "model" / artifact):
            if candidate.is_file():
                return model_from_bytes(candidate.read_bytes())
        raise BadArtifact(f"no {artifact} in {path}")
    if path.is_file():
        if path.stat().st_size > limit:
            raise BadArtifact(f"{path} is {path.stat().st_size} bytes, over the {limit}-byte limit")
        if path.name.endswith(ARCHIVE_SUFFIX):
            return model_from_archive(path.read_bytes(), limit=limit, label=str(path))
        return model_from_bytes(path.read_bytes())
    raise ModelNotFound(f"nothing at {path}")


# ---------------------------------------------------------------------------
# sources


class RegistrySource:
    """Models from the MongoDB registry (read only): the name's version, its artifact bytes.
    A registry document that names a ``factory_id`` or ``camera_id`` must agree with the
    name, so a model registered for one factory is never served under another's name."""

    def __init__(self, fdb=None, *, uri: str | None = None, database: str | None = None):
        self._fdb = fdb
        self.uri = uri
        self.database = database

    def __repr__(self) -> str:
        return "RegistrySource()"

    def fdb(self):
        if self._fdb is None:
            from factory_assets.storage.mongo import connect

            self._fdb = connect(self.uri, self.database)
        return self._fdb

    def fetch(self, name: ModelName):
        from factory_assets.storage.models import ModelNotFound as NotRegistered
        from factory_assets.storage.models import get_model, load_model_bytes

        fdb = self.fdb()
        doc = get_model(fdb, name.version)
        if doc is None:
            raise ModelNotFound(f"model version {name.version!r} is not in the registry")
        for field, wanted in (("factory_id", name.factory_id), ("camera_id", name.camera_id)):
            registered = doc.get(field)
            if wanted is not None and registered is not None and registered != wanted:
                raise ModelNotFound(f"model {name.version} is registered for {field} {registered!r}, "
                                    f"not {wanted!r}")
        try:
            data = load_model_bytes(fdb, name.version)
        except NotRegistered:
            raise ModelNotFound(f"model {name.version!r} has no artifact in the registry "
                                f"(trainer {doc.get('trainer')!r})") from None
        return model_from_bytes(data), f"registry:{name.version}"


class DirectorySource:
    """Models in a folder: ``<root>/<name>.tar.gz``, or ``<root>/<name>/`` holding the
    artifact (directly or in ``model/``, as SageMaker unpacks an archive)."""

    def __init__(self, root: str | Path, *, limit: int = DEFAULT_ARTIFACT_LIMIT):
        self.root = Path(root)
        self.limit = limit

    def __repr__(self) -> str:
        return f"DirectorySource({str(self.root)!r})"

    def fetch(self, name: ModelName):
        for candidate in (self.root / f"{name}{ARCHIVE_SUFFIX}", self.root / str(name)):
            if candidate.exists():
                return model_from_path(candidate, limit=self.limit), str(candidate)
        raise ModelNotFound(f"no {name}{ARCHIVE_SUFFIX} or {name}/ in {self.root}")


class S3Source:
    """Models in S3 as a SageMaker multi-model endpoint keeps them: ``<prefix>/<name>.tar.gz``.
    ``client`` or a boto3 client made on first use (credentials from the AWS default chain)."""

    def __init__(self, uri: str, *, client=None, endpoint_url: str | None = None, region: str | None = None,
                 limit: int = DEFAULT_ARTIFACT_LIMIT):
        if not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// URI: {uri!r}")
        self.bucket, _, prefix = uri[5:].partition("/")
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self.limit = limit
        self._client = client

    def __repr__(self) -> str:
        return f"S3Source('s3://{self.bucket}/{self.prefix}/')"

    @property
    def client(self):
        if self._client is None:
            import boto3

            self._client = boto3.client("s3", region_name=self.region, endpoint_url=self.endpoint_url)
        return self._client

    def key(self, name: ModelName) -> str:
        return "/".join(p for p in (self.prefix, f"{name}{ARCHIVE_SUFFIX}") if p)

    def fetch(self, name: ModelName):
        from botocore.exceptions import ClientError

        key = self.key(name)
        url = f"s3://{self.bucket}/{key}"
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            if err.get("Code") in ("NoSuchKey", "404", "NotFound"):
                raise ModelNotFound(f"no {url}") from None
            raise
        if (obj.get("ContentLength") or 0) > self.limit:
            obj["Body"].close()
            raise BadArtifact(f"{url} is {obj['ContentLength']} bytes, over the {self.limit}-byte limit")
        return model_from_archive(obj["Body"].read(), limit=self.limit, label=url), url


class SourceChain:
    """The first source that has the model; ``ModelNotFound`` naming where it looked."""

    def __init__(self, sources):
        self.sources = [s for s in sources if s is not None]

    def __repr__(self) -> str:
        return f"SourceChain({self.sources!r})"

    def __bool__(self) -> bool:
        return bool(self.sources)

    def fetch(self, name: ModelName):
        if not self.sources:
            raise ModelNotFound(f"model {name} is not loaded and this server has no model source "
                                "(registry, folder or S3) to load it from")
        missing = []
        for source in self.sources:
            try:
                return source.fetch(name)
            except ModelNotFound as exc:
                missing.append(str(exc))
        raise ModelNotFound(f"model {name} not found: " + "; ".join(missing))
