"""Models domain: the trained stock model, its blocking checks, and the endpoint serving it."""
import time
from pathlib import Path

import dagster as dg

from factory_assets.defs.metadata import png_markdown, table_markdown
from factory_assets.defs.models.resources import EndpointResource, ModelPolicyResource
from factory_assets.defs.resources import MongoResource

ACCURACY_CHECK = "per_label_accuracy_above_minimum"
NO_REGRESSION_CHECK = "no_regression_against_deployed_model"
MODEL_CHECKS = (ACCURACY_CHECK, NO_REGRESSION_CHECK)


def _metrics_table(metrics: dict) -> dg.MetadataValue:
    rows = [[c, f"{metrics['accuracy'][c]:.3f}", f"{metrics['precision'][c]:.3f}", f"{metrics['recall'][c]:.3f}",
             f"{metrics['f1'][c]:.3f}", f"{metrics['thresholds'][c]:.3f}"] for c in metrics["classes"]]
    return table_markdown(["class", "accuracy", "precision", "recall", "f1", "threshold"], rows)


@dg.asset(
    deps=["training_manifests"],
    group_name="models",
    kinds={"python", "mongodb"},
    owners=["team:factory-data"],
    check_specs=[dg.AssetCheckSpec(ACCURACY_CHECK, asset="stock_model", blocking=True,
                                   description="per-label accuracy on the validation split >= the policy minimum"),
                 dg.AssetCheckSpec(NO_REGRESSION_CHECK, asset="stock_model", blocking=True,
                                   description="not worse than the deployed model on the same validation split")],
)
def stock_model(context: dg.AssetExecutionContext, mongo: MongoResource,
                model_policy: ModelPolicyResource, endpoint: EndpointResource) -> dg.MaterializeResult:
    """The multi-label stock classifier (blue, red, white) trained on the current
    ``training_manifests`` dataset's train split, registered in MongoDB ``models``
    (artifact in GridFS) with its metrics and thresholds: one model version per
    (dataset, code, seed). Evaluated on the dataset's validation split; the two
    blocking checks keep a model that is below the bar, or worse than the one
    deployed, away from the endpoint."""
    import shutil
    import tempfile

    from factory_assets import config
    from factory_assets.datasets.manifests import current_dataset
    from factory_assets.storage.models import get_endpoint, load_model, register_model, set_checks
    from factory_assets.vision.evaluate import evaluate
    from factory_assets.vision.preview import confusion_png
    from factory_assets.vision.train import LocalTrainer
    from factory_assets.vision.version import code_version

    fdb = mongo.fdb()
    dataset = current_dataset(fdb)
    if not dataset or not dataset.get("path"):
        raise dg.Failure("No dataset yet: materialize training_manifests first.")
    dataset_dir = Path(dataset["path"])
    models_dir = config.factory_home() / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="training-", dir=models_dir))
    started = time.perf_counter()
    result = LocalTrainer().train(dataset_dir, staging, seed=model_policy.seed)
    train_seconds = time.perf_counter() - started
    final_dir = models_dir / result.version
    if final_dir.exists():
        shutil.rmtree(staging)
    else:
        staging.rename(final_dir)
    metrics = evaluate(result.model, dataset_dir, "valid")
    summary = {k: metrics[k] for k in ("per_label_accuracy", "exact_match", "n_images", "precision", "recall",
                                       "f1", "accuracy", "confusion", "thresholds")}
    register_model(fdb, result.model, dataset_version=dataset["version"], code_version=code_version(),
                   metrics={"valid": summary, "train": result.metrics, "train_seconds": round(train_seconds, 2)})

    accuracy_ok = metrics["per_label_accuracy"] >= model_policy.min_per_label_accuracy
    deployed = get_endpoint(fdb, endpoint.name)
    deployed_version = (deployed or {}).get("model_version")
    if deployed_version and deployed_version != result.version:
        baseline = evaluate(load_model(fdb, deployed_version), dataset_dir, "valid")["per_label_accuracy"]
    else:
        baseline = None
    regression_ok = baseline is None or metrics["per_label_accuracy"] >= baseline - model_policy.max_regression
    set_checks(fdb, result.version, accuracy_ok and regression_ok,
               {ACCURACY_CHECK: accuracy_ok, NO_REGRESSION_CHECK: regression_ok})
    context.log.info(f"model {result.version}: per-label accuracy {metrics['per_label_accuracy']:.3f}, "
                     f"exact match {metrics['exact_match']:.3f} on {metrics['n_images']} validation images")
    return dg.MaterializeResult(
        metadata={
            "model_version": dg.MetadataValue.text(result.version),
            "dataset_version": dg.MetadataValue.text(str(dataset["version"])),
            "code_version": dg.MetadataValue.text(code_version()),
            "per_label_accuracy": dg.MetadataValue.float(float(metrics["per_label_accuracy"])),
            "exact_match": dg.MetadataValue.float(float(metrics["exact_match"])),
            "validation_images": dg.MetadataValue.int(int(metrics["n_images"])),
            "train_seconds": dg.MetadataValue.float(round(train_seconds, 2)),
            "metrics": _metrics_table(metrics),
            "confusion": png_markdown(confusion_png(metrics["confusion"]), "per-class confusion"),
            "model_dir": dg.MetadataValue.path(str(final_dir)),
        },
        check_results=[
            dg.AssetCheckResult(check_name=ACCURACY_CHECK, passed=bool(accuracy_ok), metadata={
                "per_label_accuracy": float(metrics["per_label_accuracy"]),
                "minimum": float(model_policy.min_per_label_accuracy)}),
            dg.AssetCheckResult(check_name=NO_REGRESSION_CHECK, passed=bool(regression_ok), metadata={
                "per_label_accuracy": float(metrics["per_label_accuracy"]),
                "deployed_version": deployed_version or "none",
                "deployed_per_label_accuracy": float(baseline) if baseline is not None else -1.0}),
        ],
    )


def wait_for_served_version(url: str, version: str, timeout: float) -> str | None:
    """Poll the server's /ping until it serves ``version``; returns the last version seen."""
    import requests

    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        try:
            r = requests.get(f"{url.rstrip('/')}/ping", timeout=2)
            seen = r.headers.get("X-Model-Version") or seen
            if r.status_code == 200 and seen == version:
                return seen
        except requests.RequestException as exc:
            raise dg.Failure(f"The inference server at {url} cannot be reached ({exc.__class__.__name__}). "
                             "Start it with `factory-assets serve --endpoint NAME` (make run does).") from exc
        time.sleep(0.25)
    return seen


@dg.asset(
    deps=[stock_model],
    group_name="models",
    kinds={"mongodb"},
    owners=["team:factory-data"],
    retry_policy=dg.RetryPolicy(max_retries=3, delay=5, backoff=dg.Backoff.EXPONENTIAL),
)
def model_endpoint(context: dg.AssetExecutionContext, mongo: MongoResource,
                   endpoint: EndpointResource) -> dg.MaterializeResult:
    """The inference endpoint (MongoDB ``endpoints``, one document per endpoint) pointed
    at the newest model that passed its checks. The server follows that document and
    swaps models only once the new one is loaded, so deploying has no downtime; this
    asset waits until the server reports the version and records ``InService``."""
    from factory_assets.storage.models import get_endpoint, latest_model, set_endpoint_version

    fdb = mongo.fdb()
    model = latest_model(fdb, passed_checks=True)
    if model is None:
        raise dg.Failure("No model has passed its checks: nothing to deploy.")
    version = model["version"]
    before = get_endpoint(fdb, endpoint.name) or {}
    url = endpoint.base_url()
    if before.get("model_version") != version:
        set_endpoint_version(fdb, endpoint.name, version, url=url)
        context.log.info(f"endpoint {endpoint.name}: {before.get('model_version')} -> {version}")
    served = wait_for_served_version(url, version, timeout=120)
    if served != version:
        raise dg.Failure(f"The server at {url} still serves {served} two minutes after the switch to {version}.")
    fdb.endpoints.update_one({"name": endpoint.name}, {"$set": {"status": "InService", "served_version": version}})
    after = get_endpoint(fdb, endpoint.name) or {}
    return dg.MaterializeResult(metadata={
        "endpoint": dg.MetadataValue.text(endpoint.name),
        "status": dg.MetadataValue.text(str(after.get("status", "InService"))),
        "model_version": dg.MetadataValue.text(version),
        "previous_version": dg.MetadataValue.text(str(before.get("model_version"))),
        "url": dg.MetadataValue.url(url),
    })
