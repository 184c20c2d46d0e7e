"""``factory-assets twin live|show``."""
from __future__ import annotations

import json


def _live(args) -> int:
    from factory_assets.backends import predictor_from_env
    from factory_assets.storage.mongo import connect
    from factory_assets.twin.live import LiveTwinUpdater

    fdb = connect()
    predictor = predictor_from_env(args.endpoint_url)  # FACTORY_MODEL_BACKEND=sagemaker: invoke_endpoint
    updater = LiveTwinUpdater(fdb, predictor, max_backlog=args.max_backlog)
    print(f"live twin updater following frames from seq {updater.cursor} via {predictor!r}", flush=True)
    try:
        stats = updater.run(duration=args.duration)
    except KeyboardInterrupt:
        stats = updater.stats
    finally:
        predictor.close()
    print(f"summary: inferred={stats.inferred} rejected={stats.rejected} "
          f"left_to_batch={stats.skipped_to_batch}", flush=True)
    return 0


def _show(args) -> int:
    from factory_assets.storage.mongo import connect
    from factory_assets.twin.store import get_twin

    doc = get_twin(connect(), args.factory_id)
    print(json.dumps(doc, default=str, indent=2) if doc else f"no twin for {args.factory_id} yet")
    return 0


def register(sub) -> None:
    p = sub.add_parser("twin", help="the digital twin: live updater, current state")
    actions = p.add_subparsers(dest="action", required=True)
    q = actions.add_parser("live", help="follow new frames and keep the twin live (what `make run` starts)")
    q.add_argument("--endpoint-url", default="http://127.0.0.1:8080")
    q.add_argument("--max-backlog", type=int, default=200)
    q.add_argument("--duration", type=float, default=None)
    q.set_defaults(func=_live)
    q = actions.add_parser("show", help="print the twin document")
    q.add_argument("--factory-id", default="factory-1")
    q.set_defaults(func=_show)
