"""``factory-assets ingest mqtt|dir|video``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _ingestor(args):
    from factory_assets.ingest.service import Ingestor
    from factory_assets.storage.mongo import connect

    return Ingestor(connect(), camera_id=args.camera_id, factory_id=args.factory_id,
                    max_image_bytes=args.max_image_bytes, batch_size=args.batch_size,
                    max_message_bytes=getattr(args, "max_message_bytes", None))


def _summary(summary: dict, code: int = 0) -> int:
    print("summary: " + json.dumps(summary), flush=True)
    return code


def _stop_on_sigterm():
    """An event set by SIGTERM (``up`` stopping the service): the run stores what it read, then ends."""
    import signal
    import threading

    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


def _mqtt(args) -> int:
    import os

    from factory_assets.ingest.mqtt import MqttIngester
    from factory_assets.ingest.shards import ShardPlan
    from factory_assets.vocabulary.mqtt import MqttTarget, TopicPrefix

    try:
        target = MqttTarget.parse(args.url, ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file)
        prefixes = [TopicPrefix.parse(spec) for spec in args.prefix or ()]
        shard = args.shard if args.shard is not None else os.environ.get("FACTORY_INGEST_SHARD") or None
        shards = args.shards if args.shards is not None else os.environ.get("FACTORY_INGEST_SHARDS") or None
        if shards is not None:
            try:
                shards = int(shards)
            except ValueError:
                raise ValueError(f"--shards (FACTORY_INGEST_SHARDS) must be a whole number, got {shards!r}") from None
        plan = ShardPlan.make(prefixes, shard=shard, shards=shards)
        if args.camera_fps is not None and args.camera_fps < 0:
            raise ValueError("--camera-fps must be >= 0 (0 leaves the camera alone)")
    except ValueError as exc:
        print(f"error: {exc}", flush=True)
        return 2
    if bool(args.cert_file) != bool(args.key_file):
        print("error: --cert-file and --key-file go together (a client certificate and its key)", flush=True)
        return 2
    ingester = MqttIngester(_ingestor(args), target, client_id=args.client_id or plan.client_id,
                            progress_every=args.progress_every,
                            max_buffer_bytes=int(args.max_buffer_mb * 1024 * 1024),
                            camera_fps=args.camera_fps, prefixes=plan.own, fleet_prefixes=plan.fleet)
    if plan.name is not None:
        owned = ", ".join(f"{p.prefix}={p.factory_id or args.factory_id}" for p in plan.own) or "(none)"
        print(f"shard {plan.name}{f' of {shards}' if shards else ''}: factories {owned}", flush=True)
    print(f"ingesting from {target.redacted} as {ingester.client_id} (Ctrl-C to stop)", flush=True)
    summary = ingester.run_forever(duration=args.duration)
    if ingester.failed is not None:
        print(f"error: the ingester stopped: {type(ingester.failed).__name__}: {ingester.failed}", flush=True)
        return _summary(summary, 1)
    return _summary(summary)


def _dir(args) -> int:
    from factory_assets.ingest.files import ingest_dir

    return _summary(ingest_dir(_ingestor(args), Path(args.path), watch=args.watch, duration=args.duration,
                               rescan=args.rescan, stop=_stop_on_sigterm()))


def _video(args) -> int:
    from factory_assets.ingest.files import ingest_video

    return _summary(ingest_video(_ingestor(args), args.source, fps=args.fps, max_frames=args.max_frames,
                                 rescan=args.rescan, stop=_stop_on_sigterm(), live=args.live))


def register(sub) -> None:
    p = sub.add_parser("ingest", help="camera frames and factory messages -> MongoDB")
    kinds = p.add_subparsers(dest="kind", required=True)
    common = dict(camera_id=None, factory_id="factory-1")

    def add_common(q, camera_id):
        q.add_argument("--camera-id", default=camera_id)
        q.add_argument("--factory-id", default=common["factory_id"])
        q.add_argument("--max-image-bytes", type=int, default=None,
                       help="quarantine larger images (default 16 MB minus headroom)")
        q.add_argument("--batch-size", type=int, default=64, help="records per database write")

    q = kinds.add_parser("mqtt", help="subscribe to the factory's MQTT broker (i/cam, i/bme680, i/ldr, f/i/#...)")
    q.add_argument("--url", default="mqtt://127.0.0.1:1883",
                   help="mqtt://[user[:password]@]host[:port] or mqtts://host[:8883] (TLS); the password may "
                        "come from FACTORY_MQTT_PASSWORD instead (the TXT's own broker: user txt)")
    q.add_argument("--ca-file", default=None, help="CA certificate (PEM) to check the broker's TLS certificate "
                                                   "(implies TLS; default: the system's CAs with mqtts://)")
    q.add_argument("--cert-file", default=None, help="client certificate (PEM) for brokers that ask for one")
    q.add_argument("--key-file", default=None, help="the client certificate's private key (PEM)")
    q.add_argument("--prefix", action="append", default=None, metavar="PREFIX[=FACTORY_ID]",
                   help="follow the factory whose topics a bridge or the cloud put under PREFIX (e.g. "
                        "/j1/txt/1/=factory-7); documents are stamped with FACTORY_ID (else --factory-id). "
                        "Repeat for several factories; '' (or =ID) is the unprefixed one. Default: no prefix")
    q.add_argument("--camera-fps", type=float, default=2.0,
                   help="switch the TXT camera on at this rate (c/cam, sent on every connection; "
                        "0 leaves the camera to others; default %(default)s)")
    q.add_argument("--shard", default=None, metavar="NAME",
                   help="run shard NAME of a fleet: the MQTT session is factory-assets-ingest-shard-NAME, so a "
                        "replacement process resumes it (default FACTORY_INGEST_SHARD). With --shards N, NAME is "
                        "0..N-1 or ends in it (a StatefulSet pod: ingester-2) and the shard owns the --prefix "
                        "factories at its positions (k, k+N, ...); without, it owns every --prefix given")
    q.add_argument("--shards", type=int, default=None, metavar="N",
                   help="how many shards share the --prefix factories (default FACTORY_INGEST_SHARDS); "
                        "docs/mqtt.md#shards-more-than-one-ingester")
    q.add_argument("--client-id", default=None,
                   help="MQTT client id of the persistent session (default "
                        "factory-assets-ingest-<factory-id>-<camera-id>, or the shard's); one ingester per id")
    q.add_argument("--max-buffer-mb", type=float, default=64.0,
                   help="payload bytes held in memory while the database is slow or down; "
                        "beyond it the broker keeps the messages")
    q.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    q.add_argument("--progress-every", type=float, default=5.0)
    q.add_argument("--max-message-bytes", type=int, default=None,
                   help="quarantine larger messages on topics other than i/cam (default 1 MiB)")
    add_common(q, "txt-cam")
    q.set_defaults(func=_mqtt)

    q = kinds.add_parser("dir", help="JPEG/PNG files under a folder (recursive)")
    q.add_argument("path")
    q.add_argument("--watch", action="store_true", help="keep polling for new files")
    q.add_argument("--rescan", action="store_true",
                   help="ignore the recorded progress (resume after a crash is the default)")
    q.add_argument("--duration", type=float, default=None)
    add_common(q, "folder")
    q.set_defaults(func=_dir)

    q = kinds.add_parser("video", help="a video file or RTSP stream, sampled with OpenCV (a live "
                                         "rtsp:// stream, or an http(s):// one without a frame count, "
                                         "that drops is reopened with backoff)")
    q.add_argument("source", metavar="PATH_OR_RTSP_URL")
    q.add_argument("--fps", type=float, default=1.0)
    q.add_argument("--max-frames", type=int, default=None)
    q.add_argument("--rescan", action="store_true",
                   help="start a video file from the beginning, not after the last stored frame")
    q.add_argument("--live", action=argparse.BooleanOptionalAction, default=None,
                   help="treat the source as a live stream to reopen when it drops (default: rtsp://, "
                        "or http(s):// without a frame count)")
    add_common(q, "video")
    q.set_defaults(func=_video)
