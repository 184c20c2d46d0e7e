"""The embedded MongoDB: a SecantusDB daemon owned by the project.

Used whenever ``MONGODB_URI`` is unset. ``factory-assets db start`` spawns
``python -m factory_assets.storage.embedded serve`` detached; once it listens
it writes ``<home>/mongodb/daemon.json`` (uri, port, pid) so that every other
process (webserver, daemon, run workers, CLI, tests) can discover the URI.
Data lives in ``<home>/mongodb/data`` and survives restarts.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from factory_assets import config


logger = logging.getLogger("factory_assets.storage.embedded" if __name__ == "__main__" else __name__)  # also run with -m


class EmbeddedMongoError(RuntimeError):
    pass


@dataclass(frozen=True)
class EmbeddedStatus:
    running: bool
    uri: str | None
    pid: int | None
    data_dir: Path

    def describe(self) -> str:
        if self.running:
            return f"running pid={self.pid} uri={self.uri} data={self.data_dir}"
        return f"stopped data={self.data_dir}"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tcp_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


class EmbeddedMongo:
    """Start, stop and discover the embedded SecantusDB daemon under ``home``."""

    def __init__(self, home: Path | None = None):
        self.home = Path(home) if home else config.factory_home()
        self.root = self.home / "mongodb"
        self.data_dir = self.root / "data"
        self.state_file = self.root / "daemon.json"
        self.log_file = self.root / "secantus.log"

    # -- discovery -----------------------------------------------------
    def _read_state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def status(self) -> EmbeddedStatus:
        state = self._read_state()
        if state and _pid_alive(state["pid"]) and _tcp_open(state["port"]):
            return EmbeddedStatus(True, state["uri"], state["pid"], self.data_dir)
        return EmbeddedStatus(False, None, None, self.data_dir)

    def uri(self) -> str | None:
        return self.status().uri

    def died(self) -> bool:
        """The daemon was started and its process is gone (killed, out of memory), as opposed
        to stopped (``stop`` removes the state file) or merely slow to answer."""
        state = self._read_state()
        if not state:
            return False
        try:  # reap it when it is our own child, or a zombie would look alive
            os.waitpid(state["pid"], os.WNOHANG)
        except ChildProcessError:
            pass
        return not _pid_alive(state["pid"])

    def port(self) -> int | None:
        state = self._read_state()
        return int(state["port"]) if state else None

    # -- lifecycle -----------------------------------------------------
    def start(self, port: int | None = None, timeout: float = 30.0) -> EmbeddedStatus:
        current = self.status()
        if current.running:
            return current
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_file.unlink(missing_ok=True)
        if port is None:
            port = int(os.environ.get("FACTORY_MONGODB_PORT", config.DEFAULT_EMBEDDED_PORT))
            if port and not _port_free(port):
                port = 0  # the default is taken (another project?): let the OS choose
        elif port and not _port_free(port):
            raise EmbeddedMongoError(f"port {port} is already in use on 127.0.0.1")
        cmd = [sys.executable, "-m", "factory_assets.storage.embedded", "serve",
               "--data", str(self.data_dir), "--port", str(port), "--state", str(self.state_file)]
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status.running:
                return status
            if proc.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-2000:]
                raise EmbeddedMongoError(f"embedded MongoDB exited with code {proc.returncode}:\n{tail}")
            time.sleep(0.05)
        proc.terminate()
        raise EmbeddedMongoError(f"embedded MongoDB did not start within {timeout:.0f}s (log: {self.log_file})")

    def stop(self, timeout: float = 20.0) -> bool:
        """Stop the daemon; returns False when it was not running."""
        state = self._read_state()
        if not state or not _pid_alive(state["pid"]):
            self.state_file.unlink(missing_ok=True)
            return False
        os.kill(state["pid"], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _pid_alive(state["pid"]):
            try:  # reap it when it is our own child (tests)
                os.waitpid(state["pid"], os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.05)
        if _pid_alive(state["pid"]):
            os.kill(state["pid"], signal.SIGKILL)
        self.state_file.unlink(missing_ok=True)
        return True


def serve(data_dir: Path, port: int, state_file: Path) -> None:
    """Run SecantusDB in the foreground until SIGTERM/SIGINT."""
    from secantus import SecantusDBServer

    data_dir.mkdir(parents=True, exist_ok=True)
    server = SecantusDBServer(host="127.0.0.1", port=port, storage_path=str(data_dir),
                              enable_test_commands=False, cache_size="256M")
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    state = {"uri": f"mongodb://127.0.0.1:{server.port}/?directConnection=true",
             "port": server.port, "pid": os.getpid(), "data_dir": str(data_dir)}
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(state_file)
    logger.info("embedded MongoDB listening on %s (data in %s)", state["uri"], data_dir)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        try:
            if json.loads(state_file.read_text()).get("pid") == os.getpid():
                state_file.unlink()
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        server.stop()
        logger.info("embedded MongoDB stopped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m factory_assets.storage.embedded")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--state", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("FACTORY_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    serve(args.data, args.port, args.state)


if __name__ == "__main__":
    main(sys.argv[1:])
