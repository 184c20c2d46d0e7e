"""``factory-assets serve`` and ``factory-assets endpoint status|set|rollback``."""
from __future__ import annotations

import json
from factory_assets.vocabulary import DEFAULT_ENDPOINT



def _serve(args) -> int:
    import signal

    from factory_assets.serving.server import InferenceLimits, build_server

    if not args.model and not args.endpoint:
        args.endpoint = DEFAULT_ENDPOINT
    limits = InferenceLimits(max_concurrent_requests=args.max_concurrent, body_timeout=args.body_timeout,
                             graceful_shutdown=args.graceful_shutdown, predict_threads=args.predict_threads)
    server = build_server(args.host, args.port, model_dir=args.model, endpoint_name=args.endpoint,
                          poll_seconds=args.poll, access_log=args.access_log, log=_print, limits=limits)
    source = f"model {args.model}" if args.model else f"endpoint {args.endpoint!r} from the registry"
    print(f"serving {source} on {server.url} (/ping, /invocations, /endpoints/NAME/invocations)", flush=True)
    # uvicorn drains on SIGTERM/SIGINT, restores this handler and re-raises the signal: ignoring it
    # then is what lets the process exit 0 after a graceful shutdown.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    print(f"summary: requests={server.requests} errors={server.errors} swaps={server.slot.swaps}", flush=True)
    return 0


def _print(message: str) -> None:
    print(message, flush=True)


def _endpoint_view(doc: dict | None) -> dict:
    if not doc:
        return {}
    return {k: doc.get(k) for k in ("name", "model_version", "served_version", "status", "url",
                                    "previous_versions", "updated_at")}


def _status(args) -> int:
    from factory_assets.storage.models import get_endpoint, list_models
    from factory_assets.storage.mongo import connect

    fdb = connect()
    doc = get_endpoint(fdb, args.name)
    out = {"endpoint": _endpoint_view(doc) or f"no endpoint named {args.name} yet",
           "models": [{"version": m["_id"], "passed_checks": m.get("passed_checks"),
                       "per_label_accuracy": ((m.get("metrics") or {}).get("valid") or {}).get("per_label_accuracy"),
                       "dataset_version": m.get("dataset_version"), "created_at": m.get("created_at")}
                      for m in list_models(fdb, args.limit)]}
    print(json.dumps(out, default=str, indent=2))
    return 0


def _set(args) -> int:
    from factory_assets.storage.models import set_endpoint_version
    from factory_assets.storage.mongo import connect

    doc = set_endpoint_version(connect(), args.name, args.version, require_passed=not args.force)
    print(json.dumps(_endpoint_view(doc), default=str))
    return 0


def _rollback(args) -> int:
    from factory_assets.storage.models import get_endpoint, rollback_endpoint
    from factory_assets.storage.mongo import connect

    fdb = connect()
    if (get_endpoint(fdb, args.name) or {}).get("backend") == "sagemaker":
        # a SageMaker endpoint: move the endpoint itself back to the previous config, then the registry
        from factory_assets.cli.sagemaker import rollback_sagemaker

        state = rollback_sagemaker(args.name)
        print(f"sagemaker endpoint {args.name}: back to {state.get('config')} ({state.get('status')})")
        print(json.dumps(state, default=str))
        return 0
    doc = rollback_endpoint(fdb, args.name)
    print(f"endpoint {args.name}: {doc.get('rolled_back_from')} -> {doc.get('model_version')} "
          "(the server swaps once it has loaded it)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="SageMaker-compatible inference server (/ping, /invocations)",
                       description="Serve the stock model over the SageMaker inference-container contract.")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="MODEL_DIR", help="serve this model folder (fixed)")
    src.add_argument("--endpoint", metavar="NAME",
                     help=f"follow this endpoint's model version in MongoDB (default {DEFAULT_ENDPOINT})")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between endpoint document checks")
    p.add_argument("--access-log", action="store_true")
    p.add_argument("--max-concurrent", type=int, default=32, help="requests in progress at once; 503 beyond")
    p.add_argument("--body-timeout", type=float, default=10.0, help="seconds for a request body to arrive; 408 after")
    p.add_argument("--predict-threads", type=int, default=None,
                   help="threads running the model (0: on the event loop; default 0 on up to 2 cores, "
                        "else one per core)")
    p.add_argument("--graceful-shutdown", type=float, default=30.0,
                   help="seconds requests in flight get after SIGTERM (SageMaker allows 30)")
    p.set_defaults(func=_serve)

    e = sub.add_parser("endpoint", help="inspect or change which model version an endpoint serves")
    actions = e.add_subparsers(dest="action", required=True)
    for name, func, helptext in (("status", _status, "the endpoint and the registered models"),
                                 ("rollback", _rollback, "return to the previously deployed version")):
        q = actions.add_parser(name, help=helptext)
        q.add_argument("--name", default=DEFAULT_ENDPOINT)
        if name == "status":
            q.add_argument("--limit", type=int, default=10)
        q.set_defaults(func=func)
    q = actions.add_parser("set", help="deploy a registered model version")
    q.add_argument("version")
    q.add_argument("--name", default=DEFAULT_ENDPOINT)
    q.add_argument("--force", action="store_true", help="deploy even if the model failed its checks")
    q.set_defaults(func=_set)
