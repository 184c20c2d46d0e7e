"""``factory-assets api`` (serve the twin API and page) and ``factory-assets api token create|list|revoke``."""
from __future__ import annotations

import json
import logging
import os
import sys

from factory_assets.vocabulary import ORDER_TOPIC

logger = logging.getLogger(__name__)


def _serve(args) -> int:
    from factory_assets.api.app import ApiSettings, build_asgi, create_app
    from factory_assets.storage.mongo import connect
    from factory_assets.twin.orders import OrderRules
    from factory_assets.vocabulary.mqtt import TopicPrefix
    from factory_assets.web import ServerLimits, WebServer

    open_reads = {"open": True, "closed": False, "auto": None}[args.reads]
    prefixes = tuple(args.prefix or ())
    try:
        for spec in prefixes:
            TopicPrefix.parse(spec)
        settings = ApiSettings(open_reads=open_reads, host=args.host,
                               cors_origins=tuple(o for o in (args.cors or "").split(",") if o),
                               mqtt_url=args.mqtt or os.environ.get("FACTORY_MQTT_URL"),
                               mqtt_ca_file=args.ca_file, mqtt_cert_file=args.cert_file, mqtt_key_file=args.key_file,
                               mqtt_prefixes=prefixes, order_topic=args.order_topic, change_streams=not args.poll,
                               order_rules=OrderRules(**{k: v for k, v in (
                                   ("ack_timeout_s", args.order_ack_timeout), ("max_attempts", args.order_attempts))
                                   if v is not None}))
        target = settings.mqtt_target()
    except ValueError as exc:
        print(f"api: {exc}", file=sys.stderr, flush=True)
        return 2
    app = create_app(connect(), settings)
    # live streams never end by themselves: a short graceful shutdown so Ctrl-C returns at once
    server = WebServer(build_asgi(app, settings), args.host, args.port,
                       limits=ServerLimits(limit_concurrency=2048, timeout_graceful_shutdown=3, backlog=512))
    if target is not None:
        where = ", ".join(f"{p.full(settings.order_topic)} ({p.factory_id or 'every other factory'})"
                          for p in settings.topic_prefixes()) or settings.order_topic
        orders = f"sent through {target.redacted} on {where}"
    else:
        orders = "queued, not sent: no --mqtt"
    print(f"twin API and page on {server.url}/ (OpenAPI: {server.url}/docs; reads "
          f"{'open' if settings.reads_open else 'need a token'}; orders {orders})", flush=True)
    server.run()
    return 0


def _create(args) -> int:
    from factory_assets.api.tokens import create_token
    from factory_assets.storage.mongo import connect

    token = create_token(connect(), args.name, args.scope)
    print(token)
    print(f"token {args.name!r} ({args.scope}): shown once, stored hashed", flush=True)
    return 0


def _list(args) -> int:
    from factory_assets.api.tokens import list_tokens
    from factory_assets.storage.mongo import connect

    for t in list_tokens(connect()):
        print(json.dumps(t, default=str))
    return 0


def _revoke(args) -> int:
    from factory_assets.api.tokens import revoke_token
    from factory_assets.storage.mongo import connect

    n = revoke_token(connect(), args.name)
    print(f"revoked {n} token(s) named {args.name!r}")
    return 0 if n else 1


def register(sub) -> None:
    p = sub.add_parser("api", help="the twin API and live page (what `make run` starts on 127.0.0.1:8000)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--mqtt", default=None,
                   help="broker the orders go out through: mqtt://[user[:password]@]host:1883 or mqtts://host:8883 "
                        "(or FACTORY_MQTT_URL); a password left out of the URL comes from FACTORY_MQTT_PASSWORD")
    p.add_argument("--ca-file", default=None, help="CA certificate(s) for mqtts (default: the system's)")
    p.add_argument("--cert-file", default=None, help="client certificate for mqtts")
    p.add_argument("--key-file", default=None, help="client certificate's key for mqtts")
    p.add_argument("--prefix", action="append", default=[], metavar="PREFIX=FACTORY_ID",
                   help="a factory's topics travel under PREFIX (a bridge, the Fischertechnik cloud: "
                        "/j1/txt/1/=factory-7); its orders go out as PREFIX + f/o/order; repeatable; a PREFIX "
                        "without =FACTORY_ID applies to every factory without its own")
    p.add_argument("--order-topic", default=os.environ.get("FACTORY_ORDER_TOPIC", ORDER_TOPIC))
    p.add_argument("--order-ack-timeout", type=float, default=None,
                   help="seconds without f/i/order ORDERED before an order is sent again with a fresh ts (15)")
    p.add_argument("--order-attempts", type=int, default=None,
                   help="sends without ORDERED before an order is failed: the factory never acknowledged it (3)")
    p.add_argument("--reads", choices=("auto", "open", "closed"), default="auto",
                   help="auto: reads open only when bound to a loopback address")
    p.add_argument("--cors", default="", help="comma-separated allowed origins")
    p.add_argument("--poll", action="store_true", help="poll instead of using change streams")
    p.set_defaults(func=_serve)
    actions = p.add_subparsers(dest="api_action")
    t = actions.add_parser("token", help="bearer tokens: create | list | revoke")
    ta = t.add_subparsers(dest="token_action", required=True)
    c = ta.add_parser("create", help="create a token (printed once)")
    c.add_argument("name")
    c.add_argument("--scope", choices=("read", "write"), default="write")
    c.set_defaults(func=_create)
    ta.add_parser("list", help="list tokens (names, scopes, never the tokens)").set_defaults(func=_list)
    r = ta.add_parser("revoke", help="revoke the tokens with this name")
    r.add_argument("name")
    r.set_defaults(func=_revoke)
