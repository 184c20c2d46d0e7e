"""Model registry and endpoints in MongoDB.

``models``: one document per model version (``_id`` = version): dataset version,
code version, metrics, thresholds, check results, created_at. The artifact lives
in GridFS (bucket ``model_artifacts``, filename = version) so every process —
inference server, Dagster run worker, CLI — can load it without a shared disk.

``endpoints``: one document per endpoint ``name``: the configured
``model_version``, the ``previous_versions`` it replaced (for rollback), the
``served_version`` the server last reported, ``status`` and ``url``. The
inference server follows ``model_version``; deploying is one conditional write.

A fleet (docs/fleet.md): every model is trained for one factory and one camera (its slot
geometry and alignment reference) and its document says so (``factory_id``, ``camera_id``);
the registry never lets a version change hands. Each (factory, camera) has its own
*deployment*, an ``endpoints`` document named ``<endpoint>/<factory_id>/<camera_id>``
(``kind: "deployment"``) with the same history and rollback as an endpoint: deploying or
rolling back one factory's camera is one conditional write on its own document and touches
no other. The multi-model server hosts every deployed model at once; callers name the model
``<factory_id>--<camera_id>--<version>`` (docs/multi-model.md).
"""
from __future__ import annotations

from pymongo import DESCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from factory_assets.vocabulary.clock import utcnow

BUCKET = "model_artifacts"
DEPLOYMENT_KIND = "deployment"


class ModelNotFound(LookupError):
    """No model with that version in the registry."""


class WrongOwner(ValueError):
    """A model registered for one factory or camera used for another."""


def _owners(factory_id: str | None, camera_id: str | None) -> dict:
    if (factory_id is None) != (camera_id is None):
        raise ValueError("a model belongs to a factory and one of its cameras: give both factory_id and camera_id "
                         f"(got {factory_id!r}, {camera_id!r})")
    return {} if factory_id is None else {"factory_id": str(factory_id), "camera_id": str(camera_id)}


def _check_owner(fdb, version: str, owner: dict) -> None:
    """A version keeps the factory and camera it was first registered for."""
    if not owner:
        return
    doc = fdb.models.find_one({"_id": version}, {"factory_id": 1, "camera_id": 1})
    if doc is None or doc.get("factory_id") is None:
        return
    if (doc.get("factory_id"), doc.get("camera_id")) != (owner["factory_id"], owner["camera_id"]):
        raise WrongOwner(f"model {version} is registered for factory {doc.get('factory_id')!r} camera "
                         f"{doc.get('camera_id')!r}, not {owner['factory_id']!r} camera {owner['camera_id']!r}")


def _bucket(fdb):
    import gridfs

    return gridfs.GridFSBucket(fdb.db, bucket_name=BUCKET)


def register_model(fdb, model, *, dataset_version: str | None, code_version: str | None,
                   metrics: dict | None = None, trainer: str = "local", factory_id: str | None = None,
                   camera_id: str | None = None) -> dict:
    """Store a trained model (artifact in GridFS, document in ``models``). Idempotent:
    the version is a content hash, so registering the same model twice stores one
    artifact and refreshes its metrics. ``factory_id`` and ``camera_id``: the factory and
    camera it was trained for (``WrongOwner`` when the version already belongs to others)."""
    version = model.version
    owner = _owners(factory_id, camera_id)
    _check_owner(fdb, version, owner)
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
           "trainer": trainer, "artifact_id": file_id, **owner}
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


def assign_model(fdb, version: str, factory_id: str, camera_id: str) -> dict:
    """Record the factory and camera a registered model was trained for (a model registered by a
    path that does not know it, e.g. SageMaker's). ``WrongOwner`` when it belongs to others."""
    owner = _owners(factory_id, camera_id)
    _check_owner(fdb, version, owner)
    doc = fdb.models.find_one_and_update({"_id": version}, {"$set": owner}, return_document=ReturnDocument.AFTER)
    if doc is None:
        raise ModelNotFound(f"model {version!r} is not in the registry")
    return doc


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


def latest_model(fdb, passed_checks: bool | None = True, *, factory_id: str | None = None,
                 camera_id: str | None = None) -> dict | None:
    """The newest model (that passed its checks, by default); of one factory (and camera) when given."""
    query: dict = {} if passed_checks is None else {"passed_checks": passed_checks}
    if factory_id is not None:
        query["factory_id"] = factory_id
    if camera_id is not None:
        query["camera_id"] = camera_id
    return fdb.models.find_one(query, sort=[("created_at", DESCENDING), ("_id", DESCENDING)])


def list_models(fdb, limit: int = 20, *, factory_id: str | None = None) -> list[dict]:
    query = {} if factory_id is None else {"factory_id": factory_id}
    return list(fdb.models.find(query, {"artifact_id": 0}).sort("created_at", DESCENDING).limit(limit))


def model_cameras(fdb, factory_id: str) -> list[str]:
    """The cameras of ``factory_id`` that have a registered model."""
    return sorted(c for c in fdb.models.distinct("camera_id", {"factory_id": factory_id}) if isinstance(c, str))


# ---------------------------------------------------------------------------
# endpoints


def get_endpoint(fdb, name: str) -> dict | None:
    return fdb.endpoints.find_one({"name": name})


def set_endpoint_version(fdb, name: str, version: str, *, url: str | None = None,
                         require_passed: bool = True, fields: dict | None = None) -> dict:
    """Point endpoint ``name`` at ``version`` (the server follows). The version it
    replaces is pushed onto ``previous_versions`` for rollback. ``fields``: set with it
    (what a deployment document is about: its factory, camera and endpoint)."""
    model = get_model(fdb, version)
    if model is None:
        raise ModelNotFound(f"model {version!r} is not in the registry")
    if require_passed and model.get("passed_checks") is False:
        raise ValueError(f"model {version} failed its checks ({model.get('checks')}); refusing to deploy it")
    for _ in range(50):  # compare-and-swap on the version read; retries only under contention
        current = get_endpoint(fdb, name) or {}
        if current.get("model_version") == version:
            return current
        update: dict = {"$set": {"model_version": version, "status": "Updating", "updated_at": utcnow(),
                                 **(fields or {})},
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


# ---------------------------------------------------------------------------
# deployments: which model each factory's camera uses (docs/fleet.md)


def deployment_name(factory_id: str, camera_id: str, endpoint: str) -> str:
    """The ``endpoints`` document of one factory's camera on ``endpoint``."""
    return f"{endpoint}/{factory_id}/{camera_id}"


def deploy_model(fdb, factory_id: str, camera_id: str, version: str, *, endpoint: str, url: str | None = None,
                 require_passed: bool = True) -> dict:
    """Point the deployment of ``factory_id``'s camera ``camera_id`` at ``version``. Only a model
    registered for that factory and camera can be deployed there (``WrongOwner`` otherwise: a
    model of one factory is never used for another, nor one whose factory is unknown); the
    version it replaces is kept for rollback. Touches no other deployment."""
    model = get_model(fdb, version)
    if model is None:
        raise ModelNotFound(f"model {version!r} is not in the registry")
    if (model.get("factory_id"), model.get("camera_id")) != (factory_id, camera_id):
        raise WrongOwner(f"model {version} is registered for factory {model.get('factory_id')!r} camera "
                         f"{model.get('camera_id')!r}: it cannot be deployed for {factory_id!r} camera {camera_id!r}")
    return set_endpoint_version(fdb, deployment_name(factory_id, camera_id, endpoint), version, url=url,
                                require_passed=require_passed,
                                fields={"kind": DEPLOYMENT_KIND, "endpoint": endpoint, "factory_id": factory_id,
                                        "camera_id": camera_id})


def rollback_deployment(fdb, factory_id: str, camera_id: str, *, endpoint: str) -> dict:
    """Return ``factory_id``'s camera to the model it used before its current one (others untouched)."""
    return rollback_endpoint(fdb, deployment_name(factory_id, camera_id, endpoint))


def get_deployment(fdb, factory_id: str, camera_id: str, *, endpoint: str) -> dict | None:
    return get_endpoint(fdb, deployment_name(factory_id, camera_id, endpoint))


def _name_range(prefix: str) -> dict:
    """Every ``name`` that starts with ``prefix``: a range of the unique ``name`` index."""
    return {"$gte": prefix, "$lt": prefix + "\uffff"}


def deployments(fdb, *, endpoint: str, factory_ids=None) -> list[dict]:
    """The deployments on ``endpoint`` (of ``factory_ids`` when given): per factory one range of the
    ``name`` index (``<endpoint>/<factory_id>/...``), so the cost follows the factories asked about."""
    ranges = [f"{endpoint}/"] if factory_ids is None else [f"{endpoint}/{f}/" for f in sorted({str(f) for f in
                                                                                             factory_ids})]
    return [doc for prefix in ranges
            for doc in fdb.endpoints.find({"name": _name_range(prefix)}, {"previous_versions": 0})
            if doc.get("kind") == DEPLOYMENT_KIND]


def has_deployments(fdb, *, endpoint: str) -> bool:
    """Whether any factory has a model of its own on ``endpoint`` (the fleet is served per factory):
    one lookup in the ``name`` index."""
    return fdb.endpoints.find_one({"name": _name_range(f"{endpoint}/")}, {"_id": 1}) is not None  # only deployments
