"""The ``factory-assets`` command.

Each domain registers its own subcommands (``register(subparsers)``) so this
file stays a table of contents; heavy libraries load only in the command run.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
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
    "factory_assets.cli.dagster_topology",
)


LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# Libraries whose INFO lines are per-connection or per-message noise in a service's log.
QUIET_LOGGERS = ("amqtt", "transitions", "paho", "pymongo", "uvicorn.access", "httpx", "httpcore",
                 "botocore", "boto3", "urllib3", "s3transfer", "PIL", "matplotlib")


class _ShortNames(logging.Filter):
    """``factory_assets.ingest.mqtt`` reads ``ingest.mqtt`` in a log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("factory_assets."):
            record.name = record.name[len("factory_assets."):]
        return True


def configure_logging(level: str | int | None = None) -> None:
    """Configure the process's logging once: one line per record (time, level, logger, message)
    on stderr, through rich when stderr is a terminal. ``level`` defaults to ``FACTORY_LOG_LEVEL``
    or INFO; third-party libraries log at WARNING and above."""
    level = level or os.environ.get("FACTORY_LOG_LEVEL") or "INFO"
    if isinstance(level, str):
        level = level.upper()
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False,
                                               log_time_format="[%X]", rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
    handler.addFilter(_ShortNames())
    if logging.getLogger().handlers:  # configured already (a test runner, an embedding program)
        return
    logging.basicConfig(level=level, handlers=[handler])
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="factory-assets",
                                     description="Smart-factory camera -> MongoDB -> model -> digital twin.")
    parser.add_argument("--log-level", default=None, metavar="LEVEL",
                        type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
                        help="log level of the command and its services (default: FACTORY_LOG_LEVEL or INFO)")
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
    if args.log_level:  # the services `up` starts inherit it
        os.environ["FACTORY_LOG_LEVEL"] = args.log_level
    configure_logging(args.log_level)
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
