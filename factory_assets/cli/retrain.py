"""``factory-assets retrain [--factory F] --from D --to D``: retrain one factory over a date range.

Runs ``retrain_job`` (labeled_images of the factory's days -> training_manifests from
exactly those days, one dataset per camera) as one run, then ``model_job`` for that factory
(stock_model with its blocking checks -> model_endpoint), on the project's Dagster instance
(``DAGSTER_HOME``, default ``.factory/dagster_home``), so they show in the UI like runs
launched there. No other factory is touched (docs/fleet.md).
"""
from __future__ import annotations

import os


def _retrain(args) -> int:
    import dagster as dg

    from factory_assets.cli import up as stack
    from factory_assets.vocabulary.clock import day_range

    days = day_range(args.from_day, args.to_day)  # ValueError naming a bad day, or --from after --to
    os.environ.setdefault("DAGSTER_HOME", str(stack.dagster_home()))
    os.environ.setdefault("FACTORY_ENDPOINT_URL", "http://127.0.0.1:8080")  # what `factory-assets serve` binds
    from factory_assets.definitions import defs
    from factory_assets.defs.fleet import valid_factory_id
    from factory_assets.defs.partitions import FACTORY_DIMENSION, factory_day_range_tags
    from factory_assets.defs.pools import FACTORY_TAG

    if not valid_factory_id(args.factory):
        raise ValueError(f"{args.factory!r} is not a factory id (letters, digits, '_', with '.' or '-' between them)")
    tags = {FACTORY_TAG: args.factory, "factory/launched_by": "cli"}
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(FACTORY_DIMENSION, [args.factory])  # as factory_discovery_sensor would
        result = defs.resolve_job_def("retrain_job").execute_in_process(
            instance=instance, tags={**tags, **factory_day_range_tags(args.factory, days)}, raise_on_error=False)
        print(f"retrain {args.factory} {args.from_day}..{args.to_day}: datasets run {result.run_id} "
              f"{'succeeded' if result.success else 'failed'}")
        if result.success:
            result = defs.resolve_job_def("model_job").execute_in_process(
                instance=instance, partition_key=args.factory, tags=tags, raise_on_error=False)
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    print(f"retrain {args.factory}: run {result.run_id} {'succeeded' if result.success else 'failed'}; "
          f"checks {checks or 'not reached'}")
    deployed = result.asset_materializations_for_node("model_endpoint")
    if deployed:
        print(f"deployed model {deployed[0].metadata['model_version'].value}")
    elif checks and not all(checks.values()):
        print("the new model failed a blocking check: the factory keeps its current model")
    return 0 if result.success else 1


def register(sub) -> None:
    from factory_assets.vocabulary import DEFAULT_FACTORY_ID

    p = sub.add_parser("retrain", help="label, build manifests, train, check and deploy one factory's models from a "
                                       "date range")
    p.add_argument("--factory", default=DEFAULT_FACTORY_ID, help=f"the factory (default {DEFAULT_FACTORY_ID})")
    p.add_argument("--from", dest="from_day", required=True, metavar="YYYY-MM-DD")
    p.add_argument("--to", dest="to_day", required=True, metavar="YYYY-MM-DD")
    p.set_defaults(func=_retrain)
