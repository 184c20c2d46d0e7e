"""``factory-assets retrain --from D --to D``: the retraining job over a date range.

Runs ``retrain_job`` (labeled_images for the days -> training_manifests from exactly
those days -> stock_model with its blocking checks -> model_endpoint) as one run on
the project's Dagster instance (``DAGSTER_HOME``, default ``.factory/dagster_home``),
so it shows in the UI like a backfill launched there.
"""
from __future__ import annotations

import os


def _retrain(args) -> int:
    import dagster as dg

    from factory_assets.cli import up as stack
    from factory_assets.vocabulary.clock import day_range

    day_range(args.from_day, args.to_day)  # ValueError naming a bad day, or --from after --to
    os.environ.setdefault("DAGSTER_HOME", str(stack.dagster_home()))
    os.environ.setdefault("FACTORY_ENDPOINT_URL", "http://127.0.0.1:8080")  # what `factory-assets serve` binds
    from factory_assets.definitions import defs

    job = defs.resolve_job_def("retrain_job")
    tags = {"dagster/asset_partition_range_start": args.from_day,
            "dagster/asset_partition_range_end": args.to_day, "factory/launched_by": "cli"}
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(instance=instance, tags=tags, raise_on_error=False)
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    print(f"retrain {args.from_day}..{args.to_day}: run {result.run_id} "
          f"{'succeeded' if result.success else 'failed'}; checks {checks or 'not reached'}")
    deployed = result.asset_materializations_for_node("model_endpoint")
    if deployed:
        print(f"deployed model {deployed[0].metadata['model_version'].value}")
    elif checks and not all(checks.values()):
        print("the new model failed a blocking check: the endpoint keeps its current model")
    return 0 if result.success else 1


def register(sub) -> None:
    p = sub.add_parser("retrain", help="label, build manifests, train, check and deploy from a date range")
    p.add_argument("--from", dest="from_day", required=True, metavar="YYYY-MM-DD")
    p.add_argument("--to", dest="to_day", required=True, metavar="YYYY-MM-DD")
    p.set_defaults(func=_retrain)
