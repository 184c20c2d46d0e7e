"""The ``factory-assets`` command.

Each domain registers its own subcommands (``register(subparsers)``) so this
file stays a table of contents; heavy libraries load only in the command run.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

# Domain modules that contribute subcommands, in help order.
COMMAND_MODULES = (
    "factory_assets.cli.db",
    "factory_assets.cli.ingest",
    "factory_assets.cli.simulate",
    "factory_assets.cli.dataset",
    "factory_assets.cli.model",
    "factory_assets.cli.serve",
    "factory_assets.cli.twin",
    "factory_assets.cli.api",
    "factory_assets.cli.retrain",
    "factory_assets.cli.sagemaker",
    "factory_assets.cli.up",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="factory-assets",
                                     description="Smart-factory camera -> MongoDB -> model -> digital twin.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that domain has no commands (yet)
                continue
            raise
        module.register(sub)
    return parser


def print_json(obj) -> None:
    print(json.dumps(obj, indent=None, default=str), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clear one-line error instead of a traceback for expected failures
        if getattr(args, "debug", False) or not isinstance(exc, (RuntimeError, ValueError, OSError)):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
