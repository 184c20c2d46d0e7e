"""Models domain, per factory: each factory's models (one per camera: its slot geometry and
alignment reference), their blocking checks, and their deployment on the fleet's endpoint.

``stock_model`` and ``model_endpoint`` are partitioned by the dynamic ``factory`` dimension:
materializing factory F trains and deploys F's models only; no other factory's model, check
or deployment is read or written. ``model_job`` runs both for one factory (the blocking checks
keep a worse model off the endpoint); ``retrained_model_sensor`` launches it for each factory
whose ``retrain_job`` run succeeded.
"""
from pathlib import Path

import dagster as dg

from factory_assets.defs.datasets.assets import run_cameras
from factory_assets.defs.metadata import png_markdown, table
from factory_assets.defs.models.resources import EndpointResource, ModelPolicyResource
from factory_assets.defs.partitions import factory_partitions
from factory_assets.defs.pools import SAGEMAKER_POOL
from factory_assets.defs.resources import MongoResource
from factory_assets.vocabulary import CLASSES

ACCURACY_CHECK = "per_label_accuracy_above_minimum"
NO_REGRESSION_CHECK = "no_regression_against_deployed_model"
VALIDATION_CHECK = "validation_has_every_class"
MODEL_CHECKS = (ACCURACY_CHECK, NO_REGRESSION_CHECK)
UPSTREAM_DATASET = dg.AssetKey("training_manifests")
DEPLOY_TIMEOUT_SECONDS = 120
FRESH_DATA_HINT = ("To train on newer frames, materialize labeled_images and training_manifests of the factory for the "
                   "days you want first (select stock_model with its upstream, or launch retrain_job over a date "
                   "range of that factory).")


def factory_datasets(context: dg.AssetExecutionContext, fdb, factory_id: str) -> list[dict]:
    """Per camera of ``factory_id``: the dataset ``training_manifests`` materialized for it in
    this run, else the newest one it materialized for that camera (``materialized_by``). Never
    "the dataset built most recently by anyone", nor another factory's. Each document gets
    ``built_in_this_run``."""
    docs = fdb.datasets.find({"factory_id": factory_id, "materialized_by": {"$exists": True}}).sort(
        "materialized_by.at", -1)
    per_camera: dict = {}
    for doc in docs:
        same_run = doc["materialized_by"].get("run_id") == context.run.run_id
        current = per_camera.get(doc.get("camera_id"))
        if current is None or (same_run and not current["built_in_this_run"]):
            per_camera[doc.get("camera_id")] = {**doc, "built_in_this_run": same_run}
    if not per_camera:
        raise dg.Failure(f"No dataset of {factory_id} yet: materialize labeled_images and training_manifests for "
                         "its days first (or launch retrain_job over a date range of that factory).",
                         allow_retries=False)
    missing = [d for d in per_camera.values() if not d.get("path") or not Path(d["path"]).is_dir()]
    if missing:
        raise dg.Failure(f"Dataset {missing[0]['_id']} of {factory_id} camera {missing[0].get('camera_id')} is not "
                         "on disk: materialize training_manifests again.", allow_retries=False)
    return [per_camera[c] for c in sorted(per_camera, key=str)]


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


def _already_trained(fdb, factory_id: str, camera_id: str, dataset: dict, seed: int, code: str) -> dict | None:
    """The model of this factory's camera already trained on this dataset with this code and seed."""
    return fdb.models.find_one({"factory_id": factory_id, "camera_id": camera_id,
                                "dataset_version": str(dataset["version"]), "code_version": code, "seed": seed})


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


def _train_locally(context, fdb, dataset: dict, factory_id: str, camera_id: str, model_policy,
                   endpoint) -> dict:
    """Train, register (for the factory's camera), evaluate and check one candidate on this machine."""
    import time

    from factory_assets.backends.local import evaluate
    from factory_assets.serving.models import load_model
    from factory_assets.storage.models import annotate_model, get_deployment, register_model, set_checks
    from factory_assets.vision.preview import confusion_png
    from factory_assets.vision.version import code_version

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
                            "seed": model_policy.seed}, factory_id=factory_id, camera_id=camera_id)
    annotate_model(fdb, result.version, {"seed": model_policy.seed})
    accuracy = float(metrics["per_label_accuracy"])
    accuracy_ok = accuracy >= model_policy.min_per_label_accuracy
    # the baseline is this camera's deployed model: no other factory's or camera's
    deployed_version = (get_deployment(fdb, factory_id, camera_id, endpoint=endpoint.name) or {}).get("model_version")
    baseline = None
    if deployed_version and deployed_version != result.version:
        baseline = float(evaluate(load_model(fdb, deployed_version), dataset_dir, "valid")["per_label_accuracy"])
    regression_ok = baseline is None or accuracy >= baseline - model_policy.max_regression
    set_checks(fdb, result.version, accuracy_ok and regression_ok,
               {ACCURACY_CHECK: accuracy_ok, NO_REGRESSION_CHECK: regression_ok})
    context.log.info(f"model {result.version} of {factory_id} camera {camera_id} on dataset {dataset['version']}: "
                     f"per-label accuracy {accuracy:.3f}, exact match {metrics['exact_match']:.3f} on "
                     f"{metrics['n_images']} validation images")
    regression_md = {"per_label_accuracy": accuracy, "compared_with_deployed": baseline is not None}
    if baseline is not None:  # no sentinel when nothing is deployed: the key is absent
        regression_md.update({"deployed_version": deployed_version, "deployed_per_label_accuracy": baseline})
    counts = {c: metrics["confusion"][c] for c in metrics["classes"]}
    return {
        "camera_id": camera_id, "version": result.version, "accuracy_ok": bool(accuracy_ok),
        "regression_ok": bool(regression_ok),
        "accuracy_md": {"per_label_accuracy": accuracy, "minimum": float(model_policy.min_per_label_accuracy)},
        "regression_md": regression_md,
        "validation": ({c: n["tp"] + n["fn"] for c, n in counts.items()},
                       {c: n["tn"] + n["fp"] for c, n in counts.items()}),
        "metadata": {
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
    }


def _check_result(name: str, outcomes: list[dict], passed_key: str, md_key: str) -> dg.AssetCheckResult:
    """One blocking check over the factory's candidates: passed when every camera's candidate passed
    (each model's own verdict is in the registry); the figures of each camera in the metadata."""
    if len(outcomes) == 1:
        return dg.AssetCheckResult(check_name=name, passed=outcomes[0][passed_key], metadata=outcomes[0][md_key])
    return dg.AssetCheckResult(check_name=name, passed=all(o[passed_key] for o in outcomes), metadata={
        "per_camera": dg.MetadataValue.json({o["camera_id"]: {"passed": o[passed_key], "model_version": o["version"],
                                                              **o[md_key]} for o in outcomes})})


def _validation_result(outcomes: list[dict]) -> dg.AssetCheckResult:
    checks = [(o["camera_id"], validation_classes_check(*o["validation"])) for o in outcomes]
    if len(checks) == 1:
        return checks[0][1]
    failing = [(c, r) for c, r in checks if not r.passed]
    return dg.AssetCheckResult(
        check_name=VALIDATION_CHECK, passed=not failing, severity=dg.AssetCheckSeverity.WARN,
        description="; ".join(f"camera {c}: {r.description}" for c, r in failing) if failing
        else "Every class is present in some validation images and absent in others, for every camera.",
        metadata={f"{c}_{k}": v for c, r in checks for k, v in r.metadata.items()})


@dg.asset(
    deps=["training_manifests"],
    partitions_def=factory_partitions,
    group_name="models",
    kinds={"python", "mongodb"},
    pool=SAGEMAKER_POOL,  # a training job (on SageMaker with that backend; docs/scaling-out.md)
    owners=["team:factory-data"],
    output_required=False,  # nothing new to train: no materialization (see the docstring)
    check_specs=[dg.AssetCheckSpec(ACCURACY_CHECK, asset="stock_model", blocking=True,
                                   description="per-label accuracy on the validation split >= the policy minimum "
                                               "(every camera of the factory)"),
                 dg.AssetCheckSpec(NO_REGRESSION_CHECK, asset="stock_model", blocking=True,
                                   description="not worse than the model deployed for the same camera on the same "
                                               "validation split"),
                 dg.AssetCheckSpec(VALIDATION_CHECK, asset="stock_model", blocking=False,
                                   description="every class is present in some validation images and absent in "
                                               "others (a warning: the scores of such a class mean nothing)")],
)
def stock_model(context: dg.AssetExecutionContext, config: StockModelConfig, mongo: MongoResource,
                model_policy: ModelPolicyResource, endpoint: EndpointResource):
    """A factory's stock classifiers (blue, red, white; per slot when the labels carry slots),
    one per camera, each trained on the train split of the dataset ``training_manifests``
    built for that camera, registered in MongoDB ``models`` (artifact in GridFS) with its
    factory, camera, metrics and thresholds: one model version per (dataset, code, seed).
    Evaluated on the dataset's validation split; the two blocking checks keep a model that is
    below the bar, or worse than the one deployed for the same camera, away from the endpoint
    (with several cameras, every camera's candidate must pass); a third check warns when the
    validation split lacks a class. Partitioned by factory: no other factory is read or touched.

    **Which data.** Per camera, the dataset training_manifests built in the same run, else its
    latest one for that camera (metadata ``dataset_version``, ``dataset_built_at``,
    ``dataset_days``). Materialized alone on datasets its models were already trained on (same
    code and seed), it trains nothing and materializes nothing: it says so in the run's log and
    in an observation, and reports those models' checks again. To train on newer frames,
    materialize ``labeled_images`` and ``training_manifests`` of the factory for the days you
    want first, or launch ``retrain_job`` over a date range of it; ``retrain_same_dataset:
    true`` in the run config trains again on the same dataset. A run tagged ``factory/cameras``
    (a new camera's first model) trains those cameras' models only."""
    from factory_assets.vision.version import code_version

    fdb = mongo.fdb()
    trained, kept = [], []
    wanted = run_cameras(context)  # a new camera's first model: the others' are not looked at
    for factory_id in context.partition_keys:  # one factory (its backfills run one run per partition)
        datasets = [d for d in factory_datasets(context, fdb, factory_id)
                    if wanted is None or d.get("camera_id") in wanted]
        if not datasets:
            raise dg.Failure(f"No dataset of {factory_id} camera {', '.join(sorted(wanted))} yet: launch retrain_job "
                             "over a date range of that factory.", allow_retries=False)
        for dataset in datasets:
            camera_id = dataset.get("camera_id")
            existing = None
            if not dataset["built_in_this_run"] and not config.retrain_same_dataset:
                existing = _already_trained(fdb, factory_id, camera_id, dataset, model_policy.seed, code_version())
            if existing is not None:
                kept.append((factory_id, dataset, existing))
            elif endpoint.backend == "sagemaker":  # same asset, checks and backfills; trained on AWS
                from factory_assets.defs.models.sagemaker import sagemaker_train_camera

                trained.append(sagemaker_train_camera(context, fdb, endpoint, model_policy, dataset, MODEL_CHECKS,
                                                      factory_id, camera_id, extra_metadata={
                                                          **dataset_metadata(dataset),
                                                          "seed": dg.MetadataValue.int(model_policy.seed)}))
                trained[-1]["validation"] = _validation_counts(dataset)
            else:
                trained.append(_train_locally(context, fdb, dataset, factory_id, camera_id, model_policy, endpoint))
    for factory_id, dataset, model in kept:
        yield _not_retrained(context, factory_id, dataset, model)
    if not trained:
        outcomes = [{"camera_id": d.get("camera_id"), "version": m["_id"],
                     "accuracy_ok": bool((m.get("checks") or {}).get(ACCURACY_CHECK, m.get("passed_checks"))),
                     "regression_ok": bool((m.get("checks") or {}).get(NO_REGRESSION_CHECK, m.get("passed_checks"))),
                     "accuracy_md": {"model_version": m["_id"], "decided_at_training": True},
                     "regression_md": {"model_version": m["_id"], "decided_at_training": True},
                     "validation": _validation_counts(d)} for _, d, m in kept]
        yield _check_result(ACCURACY_CHECK, outcomes, "accuracy_ok", "accuracy_md")
        yield _check_result(NO_REGRESSION_CHECK, outcomes, "regression_ok", "regression_md")
        yield _validation_result(outcomes)
        return
    factory_md = {"factory_id": dg.MetadataValue.text(", ".join(context.partition_keys)),
                  "models": dg.MetadataValue.json([{"camera_id": o["camera_id"], "model_version": o["version"],
                                                    "passed_checks": o["accuracy_ok"] and o["regression_ok"]}
                                                   for o in trained])}
    if len(trained) == 1:
        factory_md.update({"camera_id": dg.MetadataValue.text(str(trained[0]["camera_id"])), **trained[0]["metadata"]})
    yield dg.MaterializeResult(metadata=factory_md, check_results=[
        _check_result(ACCURACY_CHECK, trained, "accuracy_ok", "accuracy_md"),
        _check_result(NO_REGRESSION_CHECK, trained, "regression_ok", "regression_md"),
        _validation_result(trained)])


def _not_retrained(context: dg.AssetExecutionContext, factory_id: str, dataset: dict,
                   model: dict) -> dg.AssetObservation:
    """stock_model with nothing new to train on for a camera: an observation saying which model
    stands and why (no materialization, so model_endpoint, if selected, is skipped too)."""
    version = model["_id"]
    message = (f"Not retrained: the dataset {dataset['version']} of {factory_id} camera {dataset.get('camera_id')} "
               f"was not built in this run, and model {version} was already trained on it with this code and seed. "
               f"{FRESH_DATA_HINT} Set retrain_same_dataset: true in the run config to train again all the same.")
    context.log.info(message)
    return dg.AssetObservation(asset_key=context.asset_key, partition=factory_id, description=message, metadata={
        "retrained": dg.MetadataValue.bool(False), "model_version": dg.MetadataValue.text(version),
        "camera_id": dg.MetadataValue.text(str(dataset.get("camera_id"))),
        **dataset_metadata(dataset), "reason": dg.MetadataValue.text(message)})


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


def _warm_up_jpeg() -> bytes:
    import cv2
    import numpy as np

    return cv2.imencode(".jpg", np.full((240, 320, 3), 128, np.uint8))[1].tobytes()


def _verify_served(url: str, name: str, version: str, timeout: float) -> None:
    """The server at ``url`` answers a prediction by ``name`` with ``version`` (it loaded the model
    from the registry): a deployment is in service only once a caller can use it."""
    from factory_assets.serving.predictor import EndpointUnavailable, HttpEndpointPredictor, UnknownModel
    from factory_assets.serving.rollout import ServerUnreachable, ping_version

    try:
        ping_version(url)
    except ServerUnreachable as exc:  # transient: the retry policy tries again
        raise dg.Failure(f"{exc}. Start it with `factory-assets serve --endpoint NAME` (make run does).") from exc
    with HttpEndpointPredictor(url, timeout=timeout) as predictor:
        try:
            served = predictor.predict(_warm_up_jpeg(), target_model=name).model_version
        except UnknownModel as exc:
            raise dg.Failure(f"The server at {url} has no model {name}: it must host models by name from the "
                             f"registry (`factory-assets serve --endpoint NAME` does): {exc}",
                             allow_retries=False) from exc
        except EndpointUnavailable as exc:
            raise dg.Failure(f"The server at {url} could not serve {name}: {exc}") from exc
    if served != version:
        raise dg.Failure(f"The server at {url} answered {name} with model {served}, not {version}.",
                         allow_retries=False)


@dg.asset(
    deps=[stock_model],
    partitions_def=factory_partitions,
    group_name="models",
    kinds={"mongodb"},
    pool=SAGEMAKER_POOL,  # an endpoint update (on SageMaker with that backend; docs/scaling-out.md)
    owners=["team:factory-data"],
    # only an unreachable server is retried; "nothing passed its checks" raises allow_retries=False
    retry_policy=dg.RetryPolicy(max_retries=3, delay=5, backoff=dg.Backoff.EXPONENTIAL),
)
def model_endpoint(context: dg.AssetExecutionContext, mongo: MongoResource,
                   endpoint: EndpointResource) -> dg.MaterializeResult:
    """A factory's deployment on the fleet's endpoint: per camera, the ``endpoints`` document
    ``<endpoint>/<factory_id>/<camera_id>`` pointed at the newest model of that camera that
    passed its checks (the previous one kept for rollback). One inference server hosts every
    factory's models (SageMaker multi-model style): callers name the model
    ``<factory_id>--<camera_id>--<version>``, so deploying is one write and no server restarts;
    this asset records ``InService`` once the server answers a prediction by that name.
    Deploying or rolling back one factory leaves every other factory's deployment as it is; a run
    tagged ``factory/cameras`` (a new camera's first model) writes those cameras' deployments only."""
    from factory_assets.serving.models import model_name
    from factory_assets.storage.models import (deploy_model, deployment_name, get_deployment, latest_model,
                                               mark_in_service, model_cameras)

    fdb = mongo.fdb()
    rows = []
    wanted = run_cameras(context)  # a new camera's first model: the others' deployments stay as they are
    for factory_id in context.partition_keys:
        cameras = [c for c in model_cameras(fdb, factory_id) if wanted is None or c in wanted]
        for camera_id in cameras:
            model = latest_model(fdb, passed_checks=True, factory_id=factory_id, camera_id=camera_id)
            if model is None:
                rows.append({"factory_id": factory_id, "camera_id": camera_id,
                             "skipped": "no model of this camera passed its checks"})
                continue
            before = get_deployment(fdb, factory_id, camera_id, endpoint=endpoint.name) or {}
            version, name = model["version"], model_name(factory_id, camera_id, model["version"])
            if endpoint.backend == "sagemaker":  # after the same blocking checks; deployed on AWS
                from factory_assets.defs.models.sagemaker import sagemaker_deploy_camera

                row = sagemaker_deploy_camera(context, fdb, endpoint, model, factory_id, camera_id)
            else:
                url = endpoint.base_url()
                if before.get("model_version") != version:
                    deploy_model(fdb, factory_id, camera_id, version, endpoint=endpoint.name, url=url)
                    context.log.info(f"{factory_id} camera {camera_id}: {before.get('model_version')} -> {version}")
                _verify_served(url, name, version, timeout=DEPLOY_TIMEOUT_SECONDS)
                after = mark_in_service(fdb, deployment_name(factory_id, camera_id, endpoint.name), version) or {}
                row = {"status": str(after.get("status", "InService")), "url": url}
            rows.append({"factory_id": factory_id, "camera_id": camera_id, "model_version": version,
                         "target_model": name, "previous_version": before.get("model_version"), **row})
    deployed = [r for r in rows if "model_version" in r]
    if not deployed:
        raise dg.Failure(f"No model of {', '.join(context.partition_keys)} has passed its checks: nothing to deploy "
                         f"({'; '.join(r['camera_id'] + ': ' + r['skipped'] for r in rows) or 'no model trained'}).",
                         allow_retries=False)
    metadata = {"endpoint": dg.MetadataValue.text(endpoint.name), "deployments": dg.MetadataValue.json(rows)}
    if len(deployed) == 1:  # one camera: its figures at a glance
        row = deployed[0]
        metadata.update({"factory_id": dg.MetadataValue.text(row["factory_id"]),
                         "camera_id": dg.MetadataValue.text(row["camera_id"]),
                         "status": dg.MetadataValue.text(str(row.get("status"))),
                         "model_version": dg.MetadataValue.text(row["model_version"]),
                         "target_model": dg.MetadataValue.text(row["target_model"])})
        if row.get("previous_version"):
            metadata["previous_version"] = dg.MetadataValue.text(row["previous_version"])
        for key, value in row.items():  # what the backend did (SageMaker: action, config, console...)
            if key in metadata or key in ("factory_id", "camera_id", "previous_version") or value is None:
                continue
            if key in ("url", "console"):
                metadata[key] = dg.MetadataValue.url(str(value))
            elif isinstance(value, bool):
                metadata[key] = dg.MetadataValue.bool(value)
            elif isinstance(value, float):
                metadata[key] = dg.MetadataValue.float(value)
            else:
                metadata[key] = dg.MetadataValue.text(str(value))
    return dg.MaterializeResult(metadata=metadata)
