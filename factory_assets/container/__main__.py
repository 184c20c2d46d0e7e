"""``python -m factory_assets.container train|serve [--ml-root DIR]`` (the image's entry point)."""
from __future__ import annotations

import argparse
import logging
import sys

from factory_assets.container.paths import MLPaths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m factory_assets.container")
    parser.add_argument("mode", choices=("train", "serve"))
    parser.add_argument("--ml-root", default=None, help="the /opt/ml-shaped folder (default SM_ML_ROOT or /opt/ml)")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = MLPaths.resolve(args.ml_root)
    if args.mode == "train":
        from factory_assets.container.train import run

        return run(paths)
    from factory_assets.container.serve import run

    return run(paths, args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
