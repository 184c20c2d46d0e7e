"""``factory-assets sagemaker train|deploy|status|rollback``: the SageMaker backend
from the command line (settings from FACTORY_SAGEMAKER_* variables, credentials from
the AWS default chain)."""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from factory_assets.vocabulary import DEFAULT_ENDPOINT

logger = logging.getLogger(__name__)


def _config(args):
    from factory_assets.backends.sagemaker import SageMakerConfig

    return SageMakerConfig.from_env(algorithm=getattr(args, "algorithm", None),
                                    endpoint_name=getattr(args, "name", None))


def _dataset(fdb, ref: str) -> tuple[Path, str, str | None]:
    """(local folder, version, s3 uri) of a dataset given as a folder or a recorded version."""
    path = Path(ref)
    if path.is_dir():
        doc = fdb.datasets.find_one({"path": str(path.resolve())}) or fdb.datasets.find_one({"path": str(path)})
        return path, str((doc or {}).get("version") or (doc or {}).get("_id") or path.name), (doc or {}).get("s3_uri")
    doc = fdb.datasets.find_one({"$or": [{"_id": ref}, {"version": ref}]})
    if not doc or not doc.get("path"):
        raise ValueError(f"no dataset {ref!r}: give a dataset folder or a version recorded by training_manifests")
    return Path(doc["path"]), str(doc.get("version") or doc["_id"]), doc.get("s3_uri")


def _train(args) -> int:
    from factory_assets.backends.sagemaker import SageMakerTrainer
    from factory_assets.backends.sagemaker.registry import record_model
    from factory_assets.storage.mongo import connect
    from factory_assets.vision.version import code_version

    cfg = _config(args).validate(algorithm=args.algorithm)
    fdb = connect()
    dataset_dir, version, s3_uri = _dataset(fdb, args.dataset)
    trainer = SageMakerTrainer(cfg, algorithm=args.algorithm, dataset_version=version, dataset_s3_uri=s3_uri)
    with tempfile.TemporaryDirectory(prefix="sagemaker-model-") as out:
        result = trainer.train(dataset_dir, Path(out), seed=args.seed)
        if result.model is not None:
            from factory_assets.backends.local import evaluate

            valid = evaluate(result.model, dataset_dir, "valid")
            metrics = {"valid": {k: valid[k] for k in ("per_label_accuracy", "exact_match", "n_images")},
                       "train": result.metrics}
        else:
            acc = result.job["final_metrics"].get("validation:accuracy")
            metrics = {"final_metrics": result.job["final_metrics"],
                       "valid": {"per_label_accuracy": acc} if acc is not None else {}}
    record_model(fdb, result, dataset_version=version, code_version=code_version(), metrics=metrics,
                 region=cfg.region)
    from factory_assets.backends.sagemaker import redact

    print(json.dumps({"model_version": result.version, "algorithm": result.algorithm,
                      "training_job": result.job["training_job_name"], "status": result.job["status"],
                      "billable_seconds": result.job["billable_seconds"],
                      "estimated_cost_usd": result.job["estimated_cost_usd"],
                      "s3_artifact": redact(result.job["s3_artifact"]), "metrics": metrics.get("valid")},
                     default=str))
    return 0


def _deploy(args) -> int:
    from factory_assets.backends.sagemaker import deploy
    from factory_assets.backends.sagemaker.registry import model_image, record_deployment
    from factory_assets.storage.models import get_model
    from factory_assets.storage.mongo import connect

    fdb = connect()
    doc = get_model(fdb, args.version)
    if doc is None:
        raise ValueError(f"model {args.version!r} is not in the registry")
    info = doc.get("sagemaker") or {}
    if not info.get("s3_artifact"):
        raise ValueError(f"model {args.version} was not trained on SageMaker: `factory-assets sagemaker train` first")
    if doc.get("passed_checks") is False and not args.force:
        raise ValueError(f"model {args.version} failed its checks ({doc.get('checks')}); --force to deploy anyway")
    cfg = _config(args).validate(training=False, algorithm=info.get("algorithm"))
    state = deploy(cfg.sagemaker_client(), cfg, version=args.version, image=model_image(doc, cfg),
                   model_data_url=info["s3_artifact"])
    record_deployment(fdb, cfg.endpoint_name, args.version, state)
    print(json.dumps(state, default=str))
    return 0


def rollback_sagemaker(endpoint_name: str | None = None) -> dict:
    """Return the SageMaker endpoint to the previous version's config and record it
    (also the path ``factory-assets endpoint rollback`` can delegate to)."""
    from factory_assets.backends.sagemaker import SageMakerConfig, rollback
    from factory_assets.backends.sagemaker.registry import record_rollback
    from factory_assets.storage.models import get_endpoint
    from factory_assets.storage.mongo import connect

    fdb = connect()
    cfg = SageMakerConfig.from_env(endpoint_name=endpoint_name).validate(training=False)
    doc = get_endpoint(fdb, cfg.endpoint_name) or {}
    if not doc.get("previous_versions"):
        raise ValueError(f"endpoint {cfg.endpoint_name} has no previous version to roll back to")
    state = rollback(cfg.sagemaker_client(), cfg, doc["previous_versions"][-1])
    record_rollback(fdb, cfg.endpoint_name, state)
    return state


def _rollback(args) -> int:
    print(json.dumps(rollback_sagemaker(args.name), default=str))
    return 0


def _status(args) -> int:
    from factory_assets.backends.sagemaker import redact
    from factory_assets.backends.sagemaker.deploy import describe_endpoint, endpoint_view

    cfg = _config(args).validate(training=False)
    sm = cfg.sagemaker_client()
    jobs = sm.list_training_jobs(NameContains=DEFAULT_ENDPOINT, SortBy="CreationTime", SortOrder="Descending",
                                 MaxResults=args.limit).get("TrainingJobSummaries", [])
    print(json.dumps({
        "settings": cfg.public_view(),
        "endpoint": endpoint_view(describe_endpoint(sm, cfg.endpoint_name), cfg),
        "training_jobs": [{"name": j["TrainingJobName"], "status": j["TrainingJobStatus"],
                           "created": j.get("CreationTime"), "arn": redact(j.get("TrainingJobArn"))} for j in jobs],
    }, default=str, indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser("sagemaker", help="train and deploy on AWS SageMaker (built-in algorithm or our container)",
                       description="Settings from FACTORY_SAGEMAKER_* (see docs/aws.md); "
                                   "credentials from the AWS default chain.")
    actions = p.add_subparsers(dest="action", required=True)
    t = actions.add_parser("train", help="run a training job on a dataset and register the model")
    t.add_argument("--dataset", required=True, metavar="VERSION|DIR")
    t.add_argument("--algorithm", choices=("builtin", "byoc"), default=None,
                   help="default FACTORY_SAGEMAKER_ALGORITHM or builtin")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_train)
    d = actions.add_parser("deploy", help="serve a registered SageMaker model on the endpoint (blue/green)")
    d.add_argument("version", metavar="MODEL_VERSION")
    d.add_argument("--name", default=None, help="endpoint name (default FACTORY_SAGEMAKER_ENDPOINT_NAME)")
    d.add_argument("--force", action="store_true")
    d.set_defaults(func=_deploy)
    r = actions.add_parser("rollback", help="return the endpoint to the previous version's config")
    r.add_argument("--name", default=None)
    r.set_defaults(func=_rollback)
    s = actions.add_parser("status", help="the endpoint and the latest training jobs")
    s.add_argument("--name", default=None)
    s.add_argument("--limit", type=int, default=5)
    s.set_defaults(func=_status)
