"""``factory-assets twin live|show``."""
from __future__ import annotations

import json

from factory_assets.vocabulary import DEFAULT_ENDPOINT, DEFAULT_FACTORY_ID


def _live(args) -> int:
    from factory_assets.backends import predictor_from_env
    from factory_assets.storage.mongo import connect
    from factory_assets.twin.live import LiveTwinUpdater

    fdb = connect()
    predictor = predictor_from_env(args.endpoint_url)  # FACTORY_MODEL_BACKEND=sagemaker: invoke_endpoint
    # each frame is inferred by its factory's own deployment on this endpoint (<endpoint>/<factory>/<camera>)
    updater = LiveTwinUpdater(fdb, predictor, max_backlog=args.max_backlog, endpoint=args.endpoint)
    print(f"live twin updater following frames from seq {updater.cursor} via {predictor!r} "
          f"(deployments of endpoint {args.endpoint})", flush=True)
    try:
        stats = updater.run(duration=args.duration)
    except KeyboardInterrupt:
        stats = updater.stats
    finally:
        predictor.close()
    print(f"summary: inferred={stats.inferred} rejected={stats.rejected} "
          f"left_to_batch={stats.skipped_to_batch}", flush=True)
    return 0


def factory_models(fdb, factory_id: str, endpoint: str = DEFAULT_ENDPOINT) -> dict:
    """The models that serve ``factory_id``: its own deployments on ``endpoint``, one per camera
    (``<endpoint>/<factory_id>/<camera_id>``: a range of the ``name`` index), else the endpoint's
    own model (before the fleet is served per factory) under the endpoint's name."""
    from factory_assets.storage.models import deployments, get_endpoint

    def shown(doc: dict) -> dict:
        return {"model_version": doc.get("served_version") or doc.get("model_version"), "status": doc.get("status")}

    own = {doc["name"]: shown(doc) for doc in deployments(fdb, endpoint=endpoint, factory_ids=[factory_id])}
    if own:
        return own
    doc = get_endpoint(fdb, endpoint)
    return {endpoint: shown(doc)} if doc else {}


def _show(args) -> int:
    from factory_assets.storage.mongo import connect
    from factory_assets.twin.store import get_twin

    fdb = connect()
    doc = get_twin(fdb, args.factory)
    if not doc:
        print(f"no twin for {args.factory} yet")
        return 0
    print(json.dumps({**doc, "models": factory_models(fdb, args.factory, args.endpoint)}, default=str, indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser("twin", help="the digital twin: live updater, current state")
    actions = p.add_subparsers(dest="action", required=True)
    q = actions.add_parser("live", help="follow new frames and keep the twin live (what `make run` starts)")
    q.add_argument("--endpoint-url", default="http://127.0.0.1:8080")
    q.add_argument("--endpoint", default=DEFAULT_ENDPOINT,
                   help="the endpoint whose per-factory deployments (<endpoint>/<factory>/<camera>) say which "
                        f"model infers a factory's frames (default {DEFAULT_ENDPOINT})")
    q.add_argument("--max-backlog", type=int, default=200)
    q.add_argument("--duration", type=float, default=None)
    q.set_defaults(func=_live)
    q = actions.add_parser("show", help="print the twin document and the models that serve the factory")
    q.add_argument("--factory", "--factory-id", dest="factory", default=DEFAULT_FACTORY_ID,
                   help="the factory (default %(default)s)")
    q.add_argument("--endpoint", default=DEFAULT_ENDPOINT,
                   help="its deployments on this endpoint (<endpoint>/<factory>/<camera>), else the endpoint's "
                        "own model (default %(default)s)")
    q.set_defaults(func=_show)
