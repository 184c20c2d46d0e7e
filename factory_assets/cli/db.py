"""``factory-assets db start|stop|status|uri``."""
from __future__ import annotations


def _db(args) -> int:
    from factory_assets.storage.embedded import EmbeddedMongo
    from factory_assets.storage.mongo import redact_uri, resolve_uri
    import os

    embedded = EmbeddedMongo()
    if args.action == "start":
        if os.environ.get("MONGODB_URI"):
            print("MONGODB_URI is set: that server is used; the embedded MongoDB is not needed")
            return 0
        status = embedded.start(port=args.port)
        print(status.describe())
    elif args.action == "stop":
        print("stopped" if embedded.stop() else "not running")
    elif args.action == "status":
        if os.environ.get("MONGODB_URI"):
            print(f"using MONGODB_URI={redact_uri(os.environ['MONGODB_URI'])}")
        status = embedded.status()
        print(f"embedded: {status.describe()}")
        return 0 if status.running or os.environ.get("MONGODB_URI") else 3
    elif args.action == "uri":
        print(resolve_uri())
    return 0


def register(sub) -> None:
    p = sub.add_parser("db", help="the embedded MongoDB (used when MONGODB_URI is unset)")
    p.add_argument("action", choices=["start", "stop", "status", "uri"])
    p.add_argument("--port", type=int, default=None, help="port for start (default 27117 or a free one)")
    p.set_defaults(func=_db)
