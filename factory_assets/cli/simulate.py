"""``simulate``: run the simulated factory against an MQTT broker.

``factory_assets.cli`` adds it with :func:`register`; standalone:
``python -m factory_assets.cli.simulate simulate --mqtt mqtt://127.0.0.1:1883``.
"""
from __future__ import annotations

import argparse
import sys


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``simulate`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser("simulate", help="run a simulated Fischertechnik factory publishing over MQTT",
                              description="Publish a simulated warehouse camera (i/cam), stock reports "
                                          "(f/i/stock) and sensors (i/bme680, i/ldr) like the TXT controller.")
    p.add_argument("--mqtt", required=True, metavar="URL", help="broker URL, e.g. mqtt://127.0.0.1:1883")
    p.add_argument("--fps", type=float, default=2.0, help="camera frames per second (default 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same stocks and pictures")
    p.add_argument("--duration", type=float, default=None, metavar="S", help="stop after S seconds")
    p.add_argument("--frames", type=int, default=None, metavar="N", help="stop after N frames")
    p.add_argument("--camera-id", default="cam-1")
    p.add_argument("--factory-id", default="factory-1")
    p.add_argument("--change-every", type=float, default=20.0, metavar="S",
                   help="a workpiece is stored or retrieved about every S seconds (default 20)")
    p.add_argument("--stock-interval", type=float, default=10.0, metavar="S",
                   help="republish f/i/stock every S seconds (default 10)")
    p.add_argument("--sensor-interval", type=float, default=5.0, metavar="S",
                   help="publish i/bme680 and i/ldr every S seconds (default 5)")
    p.add_argument("--progress-every", type=float, default=10.0, metavar="S",
                   help="log a progress line every S simulated seconds (0 = never)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from factory_assets.simulation.publisher import run_simulation

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)

    print(f"simulating factory {args.factory_id} (camera {args.camera_id}, seed {args.seed}, {args.fps:g} fps) "
          f"-> {args.mqtt}", flush=True)
    try:
        result = run_simulation(args.mqtt, fps=args.fps, duration_s=args.duration, max_frames=args.frames,
                                seed=args.seed, stock_interval_s=args.stock_interval, camera_id=args.camera_id,
                                factory_id=args.factory_id, change_every_s=args.change_every,
                                sensor_interval_s=args.sensor_interval, stop_event=stop,
                                progress_every_s=args.progress_every)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        return 130
    print(f"done: {result.frames} frames, {result.stock_changes} stock changes, {result.stock_reports} stock "
          f"reports, {result.sensor_reports} sensor messages, {result.dropped_frames} dropped frames, "
          f"{result.connects} connection(s) in {result.elapsed_s:.1f}s", flush=True)
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
