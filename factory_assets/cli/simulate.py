"""``simulate``: run the simulated factory against an MQTT broker.

``factory_assets.cli`` adds it with :func:`register`; standalone:
``python -m factory_assets.cli.simulate simulate --mqtt mqtt://127.0.0.1:1883``.
What the simulated factory does, and every option: ``docs/simulator.md``.
"""
from __future__ import annotations

import argparse
import sys


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``simulate`` subcommand to an argparse ``subparsers`` object."""
    from factory_assets.vocabulary import CRANE_TRAVEL_S

    p = subparsers.add_parser(
        "simulate", help="run a simulated Fischertechnik factory publishing over MQTT",
        description="Behave like the factory's TXT controller: the warehouse camera (i/cam, once c/cam switches "
                    "it on), stock reports (f/i/stock), order states (f/i/order), station states "
                    "(f/i/state/*) and sensors (i/bme680, i/ldr); ship a piece on each valid f/o/order; "
                    "take raw pieces in at the input station; another customer orders pieces too.")
    p.add_argument("--mqtt", required=True, metavar="URL",
                   help="broker URL: mqtt://[user[:password]@]host:port or mqtts://host:8883 (the password "
                        "may come from FACTORY_MQTT_PASSWORD)")
    p.add_argument("--ca-file", default=None, metavar="PEM", help="CA certificate for mqtts (default: the system's)")
    p.add_argument("--cert-file", default=None, metavar="PEM", help="client certificate (mqtts)")
    p.add_argument("--key-file", default=None, metavar="PEM", help="client key (mqtts)")
    p.add_argument("--prefix", default="", metavar="PREFIX",
                   help="publish and subscribe every topic under PREFIX (a bridge's or the cloud's, e.g. /j1/txt/1/); "
                        "with --factories N > 1 the fleet's root (default fleet/): factory k under PREFIXfactory-k/")
    p.add_argument("--factories", type=int, default=1, metavar="N",
                   help="simulate N factories through the broker, factory-1..N, each under its own prefix with its "
                        "own seed, camera pose and clock (docs/fleet.md); 1 (default): one unprefixed factory")
    p.add_argument("--cameras", type=int, default=1, metavar="K",
                   help="K cameras on each factory's rack, each at its own pose: camera 1 is the controller's "
                        "({ts, data}: the ingester's --camera-id names it), camera k publishes i/cam under the "
                        "same prefix with \"camera_id\": \"cam-k\" (docs/fleet.md; default 1)")
    p.add_argument("--fps", type=float, default=None,
                   help="camera frames per second, whatever c/cam asks (default: the rate c/cam asks for)")
    p.add_argument("--camera-on", action="store_true",
                   help="the camera is already on (else no frame until c/cam {\"on\": true})")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same stocks and pictures")
    p.add_argument("--duration", type=float, default=None, metavar="S", help="stop after S seconds")
    p.add_argument("--frames", type=int, default=None, metavar="N", help="stop after N frames")
    p.add_argument("--camera-id", default="cam-1")
    p.add_argument("--factory-id", default="factory-1")
    p.add_argument("--change-every", type=float, default=20.0, metavar="S",
                   help="about every S seconds a raw piece arrives or the other customer orders one (default 20)")
    p.add_argument("--no-customer", action="store_true", help="no other customer: pieces leave only on your orders")
    p.add_argument("--no-arrivals", action="store_true", help="no raw pieces arrive at the input station")
    p.add_argument("--busy-orders", choices=("latch", "ignore"), default="latch",
                   help="an order arriving while one is in work: kept and done next, the newest one only, as the "
                        "controller does (latch, default), or dropped (ignore)")
    p.add_argument("--time-scale", type=float, default=1.0, metavar="X",
                   help="multiply every duration of the factory (crane, processing, delivery) by X (default 1)")
    p.add_argument("--crane-travel", type=float, nargs=2, default=list(CRANE_TRAVEL_S), metavar=("MIN", "MAX"),
                   help="crane travel between the conveyor and the nearest (C1) and farthest (A3) slot, seconds "
                        f"(default {CRANE_TRAVEL_S[0]:g} {CRANE_TRAVEL_S[1]:g})")
    p.add_argument("--fault-clear", type=float, default=60.0, metavar="S",
                   help="a warehouse fault is quit after S seconds (0: only by f/o/state/ack; default 60)")
    p.add_argument("--clock-offset", type=float, default=0.0, metavar="S",
                   help="the controller's clock minus the true time, seconds (default 0)")
    p.add_argument("--stock-interval", type=float, default=0.0, metavar="S",
                   help="also republish f/i/stock every S seconds (the controller does not; default 0: never)")
    p.add_argument("--sensor-interval", type=float, default=60.0, metavar="S",
                   help="publish i/bme680 and i/ldr every S seconds (default 60, as the controller)")
    p.add_argument("--progress-every", type=float, default=10.0, metavar="S",
                   help="log a progress line every S simulated seconds (0 = never)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from factory_assets.simulation.factory import Timings
    from factory_assets.simulation.publisher import run_simulation
    from factory_assets.vocabulary.mqtt import redact

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
    try:
        timings = Timings(crane_travel_s=tuple(args.crane_travel), scale=args.time_scale,
                          fault_clear_s=args.fault_clear or None)
    except ValueError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    rate = f"{args.fps:g} fps" if args.fps else "the fps c/cam asks for"
    if args.factories != 1:
        return _run_fleet(args, timings, stop, rate)
    from factory_assets.simulation.fleet import fleet_plan

    try:
        [member] = fleet_plan(1, args.seed, cameras=args.cameras)
    except ValueError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    print(f"simulating factory {args.factory_id} (camera {args.camera_id}, seed {args.seed}, {rate}) "
          f"-> {redact(args.mqtt)}{' under ' + args.prefix if args.prefix else ''}", flush=True)
    for extra in member.extra_cameras:
        print(f"  camera {extra.camera_id}: {extra.pose.describe()}", flush=True)
    try:
        result = run_simulation(args.mqtt, fps=args.fps, duration_s=args.duration, max_frames=args.frames,
                                seed=args.seed, stock_interval_s=args.stock_interval or None,
                                camera_id=args.camera_id, factory_id=args.factory_id,
                                change_every_s=args.change_every, sensor_interval_s=args.sensor_interval,
                                stop_event=stop, progress_every_s=args.progress_every, camera_on=args.camera_on,
                                timings=timings, clock_offset_s=args.clock_offset, prefix=args.prefix,
                                ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file,
                                customer=not args.no_customer, arrivals=not args.no_arrivals,
                                busy_orders=args.busy_orders, extra_cameras=member.extra_cameras)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        return 130
    except ValueError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    print(f"done: {_summary(result)}", flush=True)
    return 0


def _summary(result) -> str:
    cameras = f" from {result.cameras} cameras" if result.cameras > 1 else ""
    return (f"{result.frames} frames{cameras}, {result.stock_changes} stock changes, {result.stock_reports} stock "
            f"reports, {result.orders} orders taken ({result.customer_orders} by the other customer), "
            f"{result.ignored_orders} ignored, {result.faults} warehouse faults, {result.sensor_reports} sensor "
            f"messages, {result.dropped_frames} dropped frames, {result.connects} connection(s) in "
            f"{result.elapsed_s:.1f}s")


def _run_fleet(args: argparse.Namespace, timings, stop, rate: str) -> int:
    """``--factories N``: N factories through one broker (simulation/fleet.py)."""
    from factory_assets.simulation.fleet import FLEET_PREFIX, fleet_plan, run_fleet
    from factory_assets.vocabulary.mqtt import redact

    try:
        plan = fleet_plan(args.factories, args.seed, root=args.prefix or FLEET_PREFIX,
                          clock_offset_s=args.clock_offset, cameras=args.cameras)
    except ValueError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    print(f"simulating {len(plan)} factories ({rate} each) -> {redact(args.mqtt)}", flush=True)
    for member in plan:
        print(f"  {member.describe()}", flush=True)
    try:
        results = run_fleet(args.mqtt, plan, stop_event=stop, fps=args.fps, duration_s=args.duration,
                            max_frames=args.frames, stock_interval_s=args.stock_interval or None,
                            camera_id=args.camera_id, change_every_s=args.change_every,
                            sensor_interval_s=args.sensor_interval, progress_every_s=args.progress_every,
                            camera_on=args.camera_on, timings=timings, ca_file=args.ca_file,
                            cert_file=args.cert_file, key_file=args.key_file, customer=not args.no_customer,
                            arrivals=not args.no_arrivals, busy_orders=args.busy_orders)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        return 130
    except ValueError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    for member in plan:
        print(f"done {member.factory_id}: {_summary(results[member.factory_id])}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from factory_assets.cli import configure_logging

    parser = argparse.ArgumentParser(prog="python -m factory_assets.cli.simulate")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    configure_logging()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
