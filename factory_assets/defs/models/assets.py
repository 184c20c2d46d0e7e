"""Models domain: the trained stock model, its blocking checks, and the endpoint serving it."""
from pathlib import Path

import dagster as dg

from factory_assets.defs.metadata import png_markdown, table
from factory_assets.defs.models.resources import EndpointResource, ModelPolicyResource
from factory_assets.defs.pools import SAGEMAKER_POOL
from factory_assets.defs.resources import MongoResource
from factory_assets.vocabulary import CLASSES

ACCURACY_CHECK = "per_label_accuracy_above_minimum"
NO_REGRESSION_CHECK = "no_regression_against_deployed_model"
VALIDATION_CHECK = "validation_has_every_class"
MODEL_CHECKS = (ACCURACY_CHECK, NO_REGRESSION_CHECK)
UPSTREAM_DATASET = dg.AssetKey("training_manifests")
DEPLOY_TIMEOUT_SECONDS = 120
FRESH_DATA_HINT = ("To train on newer frames, materialize labeled_images and training_manifests for the days you "
                   "want first (select stock_model with its upstream, or launch retrain_job over a date range).")


def dataset_of_upstream(context: dg.AssetExecutionContext, fdb) -> dict:
    """The dataset ``training_manifests`` materialized in this run; when it was not part
    of this run (a backfill runs the unpartitioned models after the partitioned days, or
    stock_model is materialized alone), its latest materialization. Never "the dataset built
    most recently by anyone". The document gets ``built_in_this_run``."""
    records = context.instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=UPSTREAM_DATASET),
                                                      limit=50).records
    if not records:
        raise dg.Failure("No dataset yet: materialize labeled_images and training_manifests first (or launch "
                         "retrain_job over a date range).", allow_retries=False)
    same_run = [r for r in records if r.run_id == context.run.run_id]
    record = (same_run or records)[0]
    version = record.asset_materialization.metadata["dataset_version"].value
    dataset = fdb.datasets.find_one({"_id": version})
    if not dataset or not dataset.get("path") or not Path(dataset["path"]).is_dir():
        raise dg.Failure(f"Dataset {version} of training_manifests (run {record.run_id}) is not on disk or not "
                         "recorded: materialize training_manifests again.", allow_retries=False)
    return {**dataset, "built_in_this_run": bool(same_run)}


def dataset_metadata(dataset: dict) -> dict:
    """Which dataset a model was trained on, and when it was built, as metadata."""
    metadata = {"dataset_version": dg.MetadataValue.text(str(dataset["version"])),
                "dataset_built_in_this_run": dg.MetadataValue.bool(bool(dataset.get("built_in_this_run")))}
    if dataset.get("built_at") is not None:
        metadata["dataset_built_at"] = dg.MetadataValue.timestamp(dataset["built_at"])
    days = dataset.get("days") or []
    if days:
        metadata["dataset_days"] = dg.MetadataValue.text(f"{days[0]} .. {days[-1]} ({len(days)} days)")
    return metadata


def metrics_with_support(metrics: dict):
    """One row per class of an evaluation (``vision.evaluate``): how many validation images
    show it (``present``) and do not (``absent``), accuracy, precision, recall, f1 and the
    threshold; a score that is undefined (no image shows the class) is ``"n/a"``, not 0."""
    import pandas as pd

    from factory_assets.vision.metrics import class_scores

    rows = []
    for c in metrics["classes"]:
        scores = class_scores(**{k: int(metrics["confusion"][c][k]) for k in ("tp", "fp", "tn", "fn")})
        rows.append({"class": c, "present": scores["support"], "absent": scores["absent"],
                     "accuracy": round(float(metrics["accuracy"][c]), 4),
                     **{k: "n/a" if scores[k] is None else round(float(scores[k]), 4)
                        for k in ("precision", "recall", "f1")},
                     "threshold": round(float(metrics["thresholds"][c]), 4)})
    return pd.DataFrame(rows)


def validation_classes_check(present: dict, absent: dict) -> dg.AssetCheckResult:
    """``validation_has_every_class`` (a warning, not blocking): every class is shown by at
    least one validation image and missing from at least one, or its scores mean nothing."""
    never = [c for c, n in present.items() if not n]
    always = [c for c, n in absent.items() if not n]
    problems = ([f"no validation image shows {', '.join(never)}: no recall or F1 for it"] if never else []) + \
               ([f"every validation image shows {', '.join(always)}"] if always else [])
    return dg.AssetCheckResult(
        check_name=VALIDATION_CHECK, passed=not problems, severity=dg.AssetCheckSeverity.WARN,
        description=("; ".join(problems) + ". Train on more varied days (more stock situations).") if problems
        else "Every class is present in some validation images and absent in others.",
        metadata={**{f"present_{c}": int(n) for c, n in present.items()},
                  **{f"absent_{c}": int(n) for c, n in absent.items()}})


class StockModelConfig(dg.Config):
    # stock_model materialized without training_manifests in the same run, on the dataset a
    # model of this code and seed was already trained on: that model stands, nothing is trained
    retrain_same_dataset: bool = False  # train again all the same


def _already_trained(context: dg.AssetExecutionContext, fdb, dataset: dict, seed: int, code: str) -> dict | None:
    """The model the latest stock_model materialization trained on this dataset with this code
    and seed, when it is still registered; else None."""
    event = context.instance.get_latest_materialization_event(context.asset_key)
    md = event.asset_materialization.metadata if event and event.asset_materialization else {}
    same = {"dataset_version": str(dataset["version"]), "code_version": code, "seed": seed}
    if not md or any(k not in md or md[k].value != v for k, v in same.items()):
        return None
    return fdb.models.find_one({"_id": md["model_version"].value})


def train_model(dataset_dir: Path, seed: int):
    """Train a candidate on the dataset's train split; returns ``(outcome, model_dir)``.
    The one place a training backend is chosen (local today)."""
    import shutil
    import tempfile

    from factory_assets import config
    from factory_assets.backends.local import LocalTrainer

    models_dir = config.factory_home() / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="training-", dir=models_dir))
    result = LocalTrainer().train(dataset_dir, staging, seed=seed)
    final_dir = models_dir / result.version
    if final_dir.exists():
        shutil.rmtree(staging)
    else:
        staging.rename(final_dir)
    return result, final_dir


def slot_metadata(metrics: dict) -> dict:
    """A per-slot model's validation metrics as metadata: the model kind, slot accuracy and the
    share of frames with all nine slots right as numbers, per-slot accuracy and the slot-state
    confusion as tables. Empty for a presence model (or a split without per-slot labels)."""
    import pandas as pd

    slots = metrics.get("slots") if metrics.get("model_kind") == "slots" else None
    if not slots:
        return {}
    per_slot = pd.DataFrame([{"slot": slot, "accuracy": float(acc)}
                             for slot, acc in slots["per_slot_accuracy"].items()])
    confusion = pd.DataFrame([{"truth": truth, **{f"predicted_{p}": int(n) for p, n in row.items()}}
                              for truth, row in slots["confusion"].items()])
    return {"model_kind": dg.MetadataValue.text("slots"),
            "slot_accuracy": dg.MetadataValue.float(float(slots["slot_accuracy"])),
            "frames_all_slots_right": dg.MetadataValue.float(float(slots["frames_all_slots_right"])),
            "slot_validation_images": dg.MetadataValue.int(int(slots["n_images"])),
            "per_slot_accuracy": table(per_slot),
            "slot_confusion": table(confusion)}


@dg.asset(
    deps=["training_manifests"],
    group_name="models",
    kinds={"python", "mongodb"},
    pool=SAGEMAKER_POOL,  # a training job (on SageMaker with that backend; docs/scaling-out.md)
    owners=["team:factory-data"],
    output_required=False,  # nothing new to train: no materialization (see the docstring)
    check_specs=[dg.AssetCheckSpec(ACCURACY_CHECK, asset="stock_model", blocking=True,
                                   description="per-label accuracy on the validation split >= the policy minimum"),
                 dg.AssetCheckSpec(NO_REGRESSION_CHECK, asset="stock_model", blocking=True,
                                   description="not worse than the deployed model on the same validation split"),
                 dg.AssetCheckSpec(VALIDATION_CHECK, asset="stock_model", blocking=False,
                                   description="every class is present in some validation images and absent in "
                                               "others (a warning: the scores of such a class mean nothing)")],
)
def stock_model(context: dg.AssetExecutionContext, config: StockModelConfig, mongo: MongoResource,
                model_policy: ModelPolicyResource, endpoint: EndpointResource):
    """The multi-label stock classifier (blue, red, white) trained on the train split of
    the dataset its upstream ``training_manifests`` produced, registered in MongoDB
    ``models`` (artifact in GridFS) with its metrics and thresholds: one model version
    per (dataset, code, seed). Evaluated on the dataset's validation split; the two
    blocking checks keep a model that is below the bar, or worse than the one
    deployed, away from the endpoint; a third check warns when the validation split
    lacks a class.

    **Which data.** It trains on the dataset training_manifests built in the same run, else
    on its latest one (metadata ``dataset_version``, ``dataset_built_at``, ``dataset_days``).
    Materialized alone on the dataset its last model was already trained on (same code and
    seed), it trains nothing and materializes nothing: it says so in the run's log and in an
    observation on this asset, and reports that model's checks again. To train on newer
    frames, materialize ``labeled_images`` and ``training_manifests`` for the days you want
    first, or launch ``retrain_job`` over a date range; ``retrain_same_dataset: true`` in
    the run config trains again on the same dataset."""
    import time

    from factory_assets.serving.models import load_model
    from factory_assets.storage.models import get_endpoint, register_model, set_checks
    from factory_assets.backends.local import evaluate
    from factory_assets.vision.preview import confusion_png
    from factory_assets.vision.version import code_version

    fdb = mongo.fdb()
    dataset = dataset_of_upstream(context, fdb)
    existing = None
    if not dataset["built_in_this_run"] and not config.retrain_same_dataset:
        existing = _already_trained(context, fdb, dataset, model_policy.seed, code_version())
    if existing is not None:
        yield from _not_retrained(context, dataset, existing)
        return
    if endpoint.backend == "sagemaker":  # same asset, checks and backfills; trained on AWS
        from factory_assets.defs.models.sagemaker import sagemaker_stock_model

        yield sagemaker_stock_model(context, fdb, endpoint, model_policy, dataset, MODEL_CHECKS, extra_metadata={
            **dataset_metadata(dataset), "seed": dg.MetadataValue.int(model_policy.seed)})
        yield validation_classes_check(*_validation_counts(dataset))
        return
    dataset_dir = Path(dataset["path"])
    started = time.perf_counter()
    result, model_dir = train_model(dataset_dir, model_policy.seed)
    train_seconds = time.perf_counter() - started
    metrics = evaluate(result.model, dataset_dir, "valid")
    summary = {k: metrics[k] for k in ("per_label_accuracy", "exact_match", "n_images", "precision", "recall",
                                       "f1", "accuracy", "confusion", "thresholds")}
    summary.update({k: metrics[k] for k in ("model_kind", "slots") if metrics.get(k) is not None})
    register_model(fdb, result.model, dataset_version=dataset["version"], code_version=code_version(),
                   metrics={"valid": summary, "train": result.metrics, "train_seconds": round(train_seconds, 2),
                            "seed": model_policy.seed})

    accuracy = float(metrics["per_label_accuracy"])
    accuracy_ok = accuracy >= model_policy.min_per_label_accuracy
    deployed_version = (get_endpoint(fdb, endpoint.name) or {}).get("model_version")
    baseline = None
    if deployed_version and deployed_version != result.version:
        baseline = float(evaluate(load_model(fdb, deployed_version), dataset_dir, "valid")["per_label_accuracy"])
    regression_ok = baseline is None or accuracy >= baseline - model_policy.max_regression
    set_checks(fdb, result.version, accuracy_ok and regression_ok,
               {ACCURACY_CHECK: accuracy_ok, NO_REGRESSION_CHECK: regression_ok})
    context.log.info(f"model {result.version} on dataset {dataset['version']}: per-label accuracy {accuracy:.3f}, "
                     f"exact match {metrics['exact_match']:.3f} on {metrics['n_images']} validation images")
    regression_md = {"per_label_accuracy": accuracy, "compared_with_deployed": baseline is not None}
    if baseline is not None:  # no sentinel when nothing is deployed: the key is absent
        regression_md.update({"deployed_version": deployed_version, "deployed_per_label_accuracy": baseline})
    counts = {c: metrics["confusion"][c] for c in metrics["classes"]}
    yield dg.MaterializeResult(
        metadata={
            "model_version": dg.MetadataValue.text(result.version),
            **dataset_metadata(dataset),
            "code_version": dg.MetadataValue.text(code_version()),
            "seed": dg.MetadataValue.int(model_policy.seed),
            "per_label_accuracy": dg.MetadataValue.float(accuracy),
            "exact_match": dg.MetadataValue.float(float(metrics["exact_match"])),
            "validation_images": dg.MetadataValue.int(int(metrics["n_images"])),
            "train_seconds": dg.MetadataValue.float(round(train_seconds, 2)),
            "metrics": table(metrics_with_support(metrics)),
            "confusion": png_markdown(confusion_png(metrics["confusion"]), "per-class confusion"),
            "model_dir": dg.MetadataValue.path(str(model_dir)),
            **slot_metadata(metrics),
        },
        check_results=[
            dg.AssetCheckResult(check_name=ACCURACY_CHECK, passed=bool(accuracy_ok), metadata={
                "per_label_accuracy": accuracy, "minimum": float(model_policy.min_per_label_accuracy)}),
            dg.AssetCheckResult(check_name=NO_REGRESSION_CHECK, passed=bool(regression_ok), metadata=regression_md),
            validation_classes_check({c: n["tp"] + n["fn"] for c, n in counts.items()},
                                     {c: n["tn"] + n["fp"] for c, n in counts.items()}),
        ],
    )


def _not_retrained(context: dg.AssetExecutionContext, dataset: dict, model: dict):
    """stock_model with nothing new to train on: an observation saying which model stands and
    why, and that model's checks as they were decided (no materialization, so model_endpoint,
    if selected, is skipped too)."""
    version = model["_id"]
    message = (f"Not retrained: the dataset {dataset['version']} of training_manifests was not built in this run, "
               f"and model {version} was already trained on it with this code and seed. {FRESH_DATA_HINT} "
               "Set retrain_same_dataset: true in the run config to train again all the same.")
    context.log.info(message)
    yield dg.AssetObservation(asset_key=context.asset_key, description=message, metadata={
        "retrained": dg.MetadataValue.bool(False), "model_version": dg.MetadataValue.text(version),
        **dataset_metadata(dataset), "reason": dg.MetadataValue.text(message)})
    checks = model.get("checks") or {}
    for name in MODEL_CHECKS:
        yield dg.AssetCheckResult(check_name=name, passed=bool(checks.get(name, model.get("passed_checks"))),
                                  metadata={"model_version": version, "decided_at_training": True})
    yield validation_classes_check(*_validation_counts(dataset))


def _validation_counts(dataset: dict) -> tuple[dict, dict]:
    """Per class, the validation images that show it and that do not: from the dataset's
    validation manifest on disk (what the model was evaluated on), else the counts its record
    carries (a record need not have them: one written by hand or by older code)."""
    from factory_assets.datasets.lst import read_lst

    manifest = Path(dataset.get("path") or ".") / "valid-annots" / "valid.lst"
    if dataset.get("path") and manifest.is_file():
        rows = read_lst(manifest)
        present = {c: sum(r.labels[i] for r in rows) for i, c in enumerate(CLASSES)}
        return present, {c: len(rows) - n for c, n in present.items()}
    counts = (dataset.get("counts") or {}).get("valid") or {}
    images = int(counts.get("images", 0))
    present = {c: int(counts.get(c, 0)) for c in CLASSES}
    return present, {c: images - n for c, n in present.items()}


@dg.asset(
    deps=[stock_model],
    group_name="models",
    kinds={"mongodb"},
    pool=SAGEMAKER_POOL,  # an endpoint update (on SageMaker with that backend; docs/scaling-out.md)
    owners=["team:factory-data"],
    # only an unreachable server is retried; "nothing passed its checks" raises allow_retries=False
    retry_policy=dg.RetryPolicy(max_retries=3, delay=5, backoff=dg.Backoff.EXPONENTIAL),
)
def model_endpoint(context: dg.AssetExecutionContext, mongo: MongoResource,
                   endpoint: EndpointResource) -> dg.MaterializeResult:
    """The inference endpoint (MongoDB ``endpoints``, one document per endpoint) pointed
    at the newest model that passed its checks. The server follows that document and
    swaps models only once the new one is loaded, so deploying has no downtime; this
    asset waits until the server reports the version and records ``InService``."""
    from factory_assets.serving.rollout import ServerUnreachable, wait_for_served_version
    from factory_assets.storage.models import get_endpoint, latest_model, mark_in_service, set_endpoint_version

    fdb = mongo.fdb()
    if endpoint.backend == "sagemaker":  # after the same blocking checks; deployed on AWS
        from factory_assets.defs.models.sagemaker import sagemaker_model_endpoint

        return sagemaker_model_endpoint(context, fdb, endpoint)
    model = latest_model(fdb, passed_checks=True)
    if model is None:
        raise dg.Failure("No model has passed its checks: nothing to deploy.", allow_retries=False)
    version = model["version"]
    before = get_endpoint(fdb, endpoint.name) or {}
    url = endpoint.base_url()
    if before.get("model_version") != version:
        set_endpoint_version(fdb, endpoint.name, version, url=url)
        context.log.info(f"endpoint {endpoint.name}: {before.get('model_version')} -> {version}")
    try:
        served = wait_for_served_version(url, version, timeout=DEPLOY_TIMEOUT_SECONDS)
    except ServerUnreachable as exc:  # transient: the retry policy tries again
        raise dg.Failure(f"{exc}. Start it with `factory-assets serve --endpoint NAME` (make run does).") from exc
    if served != version:
        raise dg.Failure(f"The server at {url} still serves {served} {DEPLOY_TIMEOUT_SECONDS} s after the switch "
                         f"to {version}.")
    after = mark_in_service(fdb, endpoint.name, version) or {}
    metadata = {
        "endpoint": dg.MetadataValue.text(endpoint.name),
        "status": dg.MetadataValue.text(str(after.get("status", "InService"))),
        "model_version": dg.MetadataValue.text(version),
        "url": dg.MetadataValue.url(url),
    }
    if before.get("model_version"):
        metadata["previous_version"] = dg.MetadataValue.text(before["model_version"])
    return dg.MaterializeResult(metadata=metadata)
