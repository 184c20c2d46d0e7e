"""Model registry and endpoints in MongoDB.

``models``: one document per model version (``_id`` = version): dataset version,
code version, metrics, thresholds, check results, created_at. The artifact lives
in GridFS (bucket ``model_artifacts``, filename = version) so every process —
inference server, Dagster run worker, CLI — can load it without a shared disk.

``endpoints``: one document per endpoint ``name``: the configured
``model_version``, the ``previous_versions`` it replaced (for rollback), the
``served_version`` the server last reported, ``status`` and ``url``. The
inference server follows ``model_version``; deploying is one conditional write.
"""
from __future__ import annotations

from pymongo import DESCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from factory_assets.vocabulary.clock import utcnow

BUCKET = "model_artifacts"


class ModelNotFound(LookupError):
    """No model with that version in the registry."""


def _bucket(fdb):
    import gridfs

    return gridfs.GridFSBucket(fdb.db, bucket_name=BUCKET)


def register_model(fdb, model, *, dataset_version: str | None, code_version: str | None,
                   metrics: dict | None = None, trainer: str = "local") -> dict:
    """Store a trained model (artifact in GridFS, document in ``models``). Idempotent:
    the version is a content hash, so registering the same model twice stores one
    artifact and refreshes its metrics."""
    version = model.version
    bucket = _bucket(fdb)
    existing = fdb.db[f"{BUCKET}.files"].find_one({"filename": version}, {"_id": 1})
    if existing is None:
        payload = model.to_bytes()
        file_id = bucket.upload_from_stream(version, payload, metadata={"version": version})
        size = len(payload)
    else:
        file_id = existing["_id"]
        size = None
    doc = {"version": version, "dataset_version": dataset_version, "code_version": code_version,
           "thresholds": dict(model.thresholds), "classes": list(model.classes), "metrics": metrics or {},
           "trainer": trainer, "artifact_id": file_id}
    if size is not None:
        doc["artifact_bytes"] = size
    return fdb.models.find_one_and_update(
        {"_id": version}, {"$set": doc, "$setOnInsert": {"created_at": utcnow(), "passed_checks": None}},
        upsert=True, return_document=ReturnDocument.AFTER)


def register_external_model(fdb, version: str, *, dataset_version: str | None, code_version: str | None,
                            metrics: dict | None = None, trainer: str, classes=None, thresholds: dict | None = None,
                            fields: dict | None = None) -> dict:
    """A model whose artifact we do not hold (SageMaker's built-in algorithm: an MXNet
    model in S3): the document only, no GridFS artifact. Idempotent like ``register_model``."""
    doc = {"version": version, "dataset_version": dataset_version, "code_version": code_version,
           "metrics": metrics or {}, "trainer": trainer, "classes": list(classes or ()),
           "thresholds": dict(thresholds or {}), **(fields or {})}
    return fdb.models.find_one_and_update(
        {"_id": version}, {"$set": doc, "$setOnInsert": {"created_at": utcnow(), "passed_checks": None}},
        upsert=True, return_document=ReturnDocument.AFTER)


def annotate_model(fdb, version: str, fields: dict) -> None:
    """Add fields to a registered model (e.g. its ``sagemaker`` training job)."""
    fdb.models.update_one({"_id": version}, {"$set": fields})


def set_checks(fdb, version: str, passed: bool, checks: dict) -> None:
    fdb.models.update_one({"_id": version}, {"$set": {"passed_checks": bool(passed), "checks": checks,
                                                      "checked_at": utcnow()}})


def get_model(fdb, version: str) -> dict | None:
    return fdb.models.find_one({"_id": version})


def load_model_bytes(fdb, version: str) -> bytes:
    import gridfs

    try:
        return _bucket(fdb).open_download_stream_by_name(version).read()
    except gridfs.errors.NoFile:
        raise ModelNotFound(f"model {version!r} is not in the registry") from None


def latest_model(fdb, passed_checks: bool | None = True) -> dict | None:
    query = {} if passed_checks is None else {"passed_checks": passed_checks}
    return fdb.models.find_one(query, sort=[("created_at", DESCENDING), ("_id", DESCENDING)])


def list_models(fdb, limit: int = 20) -> list[dict]:
    return list(fdb.models.find({}, {"artifact_id": 0}).sort("created_at", DESCENDING).limit(limit))


# ---------------------------------------------------------------------------
# endpoints


def get_endpoint(fdb, name: str) -> dict | None:
    return fdb.endpoints.find_one({"name": name})


def set_endpoint_version(fdb, name: str, version: str, *, url: str | None = None,
                         require_passed: bool = True) -> dict:
    """Point endpoint ``name`` at ``version`` (the server follows). The version it
    replaces is pushed onto ``previous_versions`` for rollback."""
    model = get_model(fdb, version)
    if model is None:
        raise ModelNotFound(f"model {version!r} is not in the registry")
    if require_passed and model.get("passed_checks") is False:
        raise ValueError(f"model {version} failed its checks ({model.get('checks')}); refusing to deploy it")
    for _ in range(50):  # compare-and-swap on the version read; retries only under contention
        current = get_endpoint(fdb, name) or {}
        if current.get("model_version") == version:
            return current
        update: dict = {"$set": {"model_version": version, "status": "Updating", "updated_at": utcnow()},
                        "$setOnInsert": {"created_at": utcnow()}}
        if url:
            update["$set"]["url"] = url
        if current.get("model_version"):
            update["$push"] = {"previous_versions": {"$each": [current["model_version"]], "$slice": -20}}
        if not current:
            try:  # ``name`` is unique: of two first deploys one inserts, the other retries
                return fdb.endpoints.find_one_and_update({"name": name}, update, upsert=True,
                                                         return_document=ReturnDocument.AFTER)
            except DuplicateKeyError:
                continue
        # Two deploys racing from the same version used to both push it, losing the first
        # one's version from the rollback history.
        doc = fdb.endpoints.find_one_and_update({"name": name, "model_version": current.get("model_version")},
                                                update, return_document=ReturnDocument.AFTER)
        if doc is not None:
            return doc
    raise RuntimeError(f"endpoint {name}: too much write contention")


def rollback_endpoint(fdb, name: str) -> dict:
    """Return endpoint ``name`` to the version it served before the current one."""
    current = get_endpoint(fdb, name)
    if not current or not current.get("previous_versions"):
        raise ValueError(f"endpoint {name!r} has no previous version to roll back to")
    previous = current["previous_versions"][-1]
    return fdb.endpoints.find_one_and_update(
        {"name": name, "model_version": current["model_version"]},
        {"$set": {"model_version": previous, "status": "Updating", "updated_at": utcnow(),
                  "rolled_back_from": current["model_version"]},
         "$pop": {"previous_versions": 1}},
        return_document=ReturnDocument.AFTER) or get_endpoint(fdb, name)


def report_served(fdb, name: str, version: str | None, *, url: str | None = None) -> None:
    """The server reports what it serves; ``InService`` once it serves the configured version."""
    fields: dict = {"served_version": version, "served_at": utcnow()}
    if url:
        fields["server_url"] = url
    fdb.endpoints.update_one({"name": name}, {"$set": fields})
    if version:  # in the same write as the check: a deploy landing meanwhile stays Updating
        fdb.endpoints.update_one({"name": name, "model_version": version}, {"$set": {"status": "InService"}})


def served_version(fdb, name: str) -> str | None:
    """The version endpoint ``name`` serves: what the server last reported, else the configured one."""
    doc = get_endpoint(fdb, name) or {}
    return doc.get("served_version") or doc.get("model_version")


def mark_in_service(fdb, name: str, version: str) -> dict | None:
    """Record that endpoint ``name`` serves ``version`` (the deployment finished); when a newer
    deploy or a rollback has re-pointed the endpoint meanwhile, it is left as that one wrote it."""
    return fdb.endpoints.find_one_and_update(
        {"name": name, "model_version": version},
        {"$set": {"status": "InService", "served_version": version, "updated_at": utcnow()}},
        return_document=ReturnDocument.AFTER) or get_endpoint(fdb, name)
