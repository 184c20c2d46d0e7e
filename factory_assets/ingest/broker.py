"""A real MQTT broker (amqtt) for tests, demos and ``make run``.

``python -m factory_assets.ingest.broker --port 1883`` runs an amqtt broker bound to
127.0.0.1 in the foreground until SIGTERM/SIGINT, then shuts it down cleanly.
``--port 0`` picks a free port; the first line on stdout is always
``listening mqtt://127.0.0.1:PORT`` once the listener accepts connections.

``start_broker(port=0)`` runs that same command as a subprocess and returns a
:class:`BrokerProcess` (``.url``, ``.port``, ``.stop()``, ``.restart()`` on the same
port, context manager) once the port accepts connections.

amqtt configuration notes (0.12): anonymous access needs the
``AnonymousAuthPlugin`` explicitly (with no auth plugin answering, every CONNECT is
refused); the default plugin set also publishes ``$SYS`` topics every 20 s and logs
every packet, so we list only the auth plugin. amqtt has no maximum message size:
anything up to MQTT's 256 MB remaining-length limit passes.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HOST = "127.0.0.1"
READY_PREFIX = "listening "
SHUTDOWN_TIMEOUT_S = 3.0


def broker_config(port: int, host: str = HOST) -> dict:
    """The amqtt ``BrokerConfig`` dictionary: one TCP listener, anonymous, no $SYS, no persistence."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        # drop sessions of vanished clients after a minute instead of keeping them forever
        "session_expiry_interval": 60,
    }


# -- the broker process (foreground) ------------------------------------------------------

async def _serve(port: int, host: str, parent_pid: int | None) -> None:
    import asyncio

    from amqtt.broker import Broker

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    broker = Broker(broker_config(port, host))
    await broker.start()
    server = broker._servers["default"].instance  # noqa: SLF001 - amqtt exposes no public accessor
    actual_port = server.sockets[0].getsockname()[1]
    print(f"{READY_PREFIX}mqtt://{host}:{actual_port}", flush=True)

    async def watch_parent() -> None:
        while not stop.is_set():
            if os.getppid() != parent_pid:  # parent died: we were re-parented
                stop.set()
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch_parent()) if parent_pid else None
    await stop.wait()
    if watcher:
        watcher.cancel()
    print(f"broker on port {actual_port}: shutting down", file=sys.stderr, flush=True)
    server.close()  # accept no new connection while the sessions are being closed
    try:
        # amqtt's shutdown sometimes hangs in a session's handler when a client disconnects at
        # the same moment (seen with 0.12.1); the process exits anyway and asyncio.run() cancels
        # what is left, so the sockets are closed either way.
        await asyncio.wait_for(broker.shutdown(), timeout=SHUTDOWN_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - we are exiting anyway
        print(f"broker shutdown incomplete after {SHUTDOWN_TIMEOUT_S}s ({exc!r}); exiting anyway",
              file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    import asyncio
    import logging

    p = argparse.ArgumentParser(prog="python -m factory_assets.ingest.broker",
                                description="Run an amqtt MQTT broker on 127.0.0.1 until SIGTERM/SIGINT.")
    p.add_argument("--port", type=int, default=1883, help="TCP port (0 = any free port)")
    p.add_argument("--host", default=HOST, help="address to bind (default 127.0.0.1)")
    p.add_argument("--exit-with-parent", type=int, default=None, metavar="PID",
                   help="exit when the process PID (our parent) goes away")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("transitions").setLevel(logging.WARNING)
    try:
        asyncio.run(_serve(args.port, args.host, args.exit_with_parent))
    except OSError as exc:  # e.g. port already in use
        print(f"broker failed to start: {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # amqtt wraps bind errors in BrokerError
        print(f"broker failed to start: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


# -- the Python helper ------------------------------------------------------------------------

def port_accepts(port: int, host: str = HOST, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class BrokerError(RuntimeError):
    pass


class BrokerProcess:
    """An amqtt broker in a subprocess. Use :func:`start_broker` to create one."""

    def __init__(self, port: int = 0, *, host: str = HOST, startup_timeout: float = 20.0):
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile(mode="w+", prefix="amqtt-", suffix=".log")

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        """What the broker wrote on stderr so far (for error messages)."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def start(self) -> BrokerProcess:
        if self.running:
            return self
        cmd = [sys.executable, "-m", "factory_assets.ingest.broker", "--port", str(self.port),
               "--host", self.host, "--exit-with-parent", str(os.getpid())]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     stdin=subprocess.DEVNULL)
        line = self._read_ready_line(self.proc, self.startup_timeout)
        if not line.startswith(READY_PREFIX):
            self._terminate()
            raise BrokerError(f"amqtt broker did not start on {self.host}:{self.port}: "
                              f"{line!r}\n{self.log_text()[-2000:]}")
        # the child prints the line only once asyncio's server socket is listening, so the port
        # accepts connections now (no probe connection: amqtt logs an ERROR for each empty one)
        self.port = int(line.rsplit(":", 1)[1])
        return self

    @staticmethod
    def _read_ready_line(proc: subprocess.Popen, timeout: float) -> str:
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        return result[0].strip() if result else ""

    def _terminate(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout:
            proc.stdout.close()

    def stop(self) -> None:
        """SIGTERM (clean amqtt shutdown); SIGKILL if it takes more than 10 s."""
        self._terminate()

    def restart(self, downtime_s: float = 0.0) -> BrokerProcess:
        """Stop and start again on the same port (clients see a broker outage)."""
        self.stop()
        if downtime_s:
            time.sleep(downtime_s)
        return self.start()

    def close(self) -> None:
        self.stop()
        self._log.close()

    def __enter__(self) -> BrokerProcess:
        return self.start() if not self.running else self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BrokerProcess(url={self.url!r}, running={self.running})"


def start_broker(port: int = 0, *, host: str = HOST, startup_timeout: float = 20.0) -> BrokerProcess:
    """Start an amqtt broker subprocess on ``host:port`` (0 = free port); returns once it accepts connections."""
    return BrokerProcess(port, host=host, startup_timeout=startup_timeout).start()


if __name__ == "__main__":
    sys.exit(main())
