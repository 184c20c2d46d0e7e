"""A real MQTT broker for tests, demos and ``make run``: Mosquitto, or amqtt as the pip-only fallback.

``python -m factory_assets.simulation.broker --port 1883`` runs a broker bound to
127.0.0.1 in the foreground until SIGTERM/SIGINT, then shuts it down cleanly.
``--port 0`` picks a free port; the first line on stdout is always
``listening mqtt://127.0.0.1:PORT`` once the listener accepts connections.

``start_broker(port=0)`` runs that same command as a subprocess and returns a
:class:`BrokerProcess` (``.url``, ``.port``, ``.stop()``, ``.restart()`` on the same
port, context manager) once the port accepts connections.

Which broker: ``FACTORY_MQTT_BROKER=auto|mosquitto|amqtt`` (or ``--broker``);
``auto`` (default) uses Mosquitto when it is installed (Debian ``mosquitto``, the
broker the factory's TXT controller runs). Only Mosquitto keeps the QoS 1
messages published for an *offline persistent session* (the ingester while it is
down or restarting) and, with ``persistence true``, across its own restart:
amqtt 0.12 delivered 0 of 10 such messages in a test, Mosquitto 2.0 10 of 10.
amqtt stays as the fallback when only pip packages are available.

Mosquitto configuration (written to the data directory): one listener on
127.0.0.1, anonymous, persistence in the data directory, no ``$SYS`` topics,
unlimited queues for offline sessions (hours of frames) and no packet size
limit below MQTT's 256 MB, 100 unacknowledged QoS 1 messages in flight per client.

amqtt configuration notes (0.12): anonymous access needs the
``AnonymousAuthPlugin`` explicitly (with no auth plugin answering, every CONNECT is
refused); the default plugin set also publishes ``$SYS`` topics every 20 s and logs
every packet, so we list only the auth plugin. amqtt has no maximum message size:
anything up to MQTT's 256 MB remaining-length limit passes.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

logger = logging.getLogger("factory_assets.simulation.broker" if __name__ == "__main__" else __name__)  # also run with -m

HOST = "127.0.0.1"
BROKERS = ("auto", "mosquitto", "amqtt")
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
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
    print(f"{READY_PREFIX}mqtt://{host}:{actual_port}", flush=True)  # the readiness line (stdout), not a log record
    logger.info("amqtt broker listening on %s:%d", host, actual_port)

    async def watch_parent() -> None:
        while not stop.is_set():
            if os.getppid() != parent_pid:  # parent died: we were re-parented
                stop.set()
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch_parent()) if parent_pid else None
    await stop.wait()
    if watcher:
        watcher.cancel()
    logger.info("broker on port %d: shutting down", actual_port)
    server.close()  # accept no new connection while the sessions are being closed
    try:
        # amqtt's shutdown sometimes hangs in a session's handler when a client disconnects at
        # the same moment (seen with 0.12.1); the process exits anyway and asyncio.run() cancels
        # what is left, so the sockets are closed either way.
        await asyncio.wait_for(broker.shutdown(), timeout=SHUTDOWN_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - we are exiting anyway
        logger.warning("broker shutdown incomplete after %ss (%r); exiting anyway", SHUTDOWN_TIMEOUT_S, exc)


# -- Mosquitto ---------------------------------------------------------------------------

def mosquitto_binary() -> str | None:
    """The Mosquitto executable, or None when it is not installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((path for path in MOSQUITTO_PATHS if os.access(path, os.X_OK)), None)


def broker_kind(requested: str | None = None) -> str:
    """``mosquitto`` or ``amqtt``: the ``--broker``/``FACTORY_MQTT_BROKER`` choice, ``auto`` resolved."""
    kind = (requested or os.environ.get("FACTORY_MQTT_BROKER") or "auto").strip().lower()
    if kind not in BROKERS:
        raise ValueError(f"unknown MQTT broker {kind!r} (use one of {', '.join(BROKERS)})")
    if kind == "auto":
        return "mosquitto" if mosquitto_binary() else "amqtt"
    if kind == "mosquitto" and not mosquitto_binary():
        raise BrokerError("FACTORY_MQTT_BROKER=mosquitto but mosquitto is not installed "
                          "(apt-get install mosquitto)")
    return kind


def mosquitto_config(port: int, data_dir: Path, host: str = HOST) -> str:
    """A Mosquitto 2.0 configuration: see the module docstring for why each line."""
    lines = [
        f"listener {port} {host}",
        "allow_anonymous true",
        "persistence true",
        f"persistence_location {data_dir.resolve()}/",
        "autosave_interval 5",  # persist queued messages of offline sessions every 5 s, and at exit
        "sys_interval 0",  # no $SYS topics
        "max_queued_messages 0",  # unlimited: the ingester may be down for hours
        "max_queued_bytes 0",
        "max_inflight_messages 100",  # per client: unacknowledged QoS 1 deliveries (flow control)
        # max_packet_size stays at its default, unlimited (MQTT's 256 MB): a 20 MB frame passes
        "persistent_client_expiration 2d",
        "set_tcp_nodelay true",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages false",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # as root Mosquitto drops to the user "mosquitto", which cannot write our data directory
        lines.append("user root")
    return "\n".join(lines) + "\n"


def _free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # preexec_fn: SIGTERM the child when this process dies (Linux)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _serve_mosquitto(port: int, host: str, parent_pid: int | None, data_dir: Path | None) -> int:
    """Run Mosquitto as our child until SIGTERM/SIGINT (or our parent dies); its exit code."""
    binary = mosquitto_binary()
    if data_dir is None:
        from factory_assets import config

        data_dir = config.factory_home() / "mosquitto"
    data_dir.mkdir(parents=True, exist_ok=True)
    if port == 0:
        port = _free_port(host)
    conf = data_dir / f"mosquitto-{port}.conf"
    conf.write_text(mosquitto_config(port, data_dir, host))
    proc = subprocess.Popen([binary, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
    running = threading.Event()

    mosquitto_log = logging.getLogger(f"{logger.name}.mosquitto")

    def pump() -> None:  # forward Mosquitto's log; "running" means every listener is open
        for line in proc.stderr:
            if " running" in line:
                running.set()
            if "should not be run as root" not in line:
                mosquitto_log.log(_mosquitto_level(line), "%s", _mosquitto_message(line))

    threading.Thread(target=pump, daemon=True).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not running.wait(0.05):
        if proc.poll() is not None:
            logger.error("broker failed to start: mosquitto exited with code %s", proc.returncode)
            return 1
    print(f"{READY_PREFIX}mqtt://{host}:{port}", flush=True)  # the readiness line (stdout), not a log record
    while not stop.wait(0.5):
        if parent_pid and os.getppid() != parent_pid:  # parent died: we were re-parented
            break
        if proc.poll() is not None:
            logger.error("mosquitto exited with code %s", proc.returncode)
            return proc.returncode or 1
    logger.info("broker on port %d: shutting down", port)
    proc.send_signal(signal.SIGTERM)  # Mosquitto saves its persistence database on SIGTERM
    try:
        code = proc.wait(timeout=SHUTDOWN_TIMEOUT_S * 3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return 1
    if code != 0:
        # Mosquitto 2.0 can report 1 when the SIGTERM we sent interrupts its event loop: a
        # requested, completed stop (it has saved its persistence) is still a clean one.
        logger.info("mosquitto stopped on request with exit code %s", code)
    return 0


def _mosquitto_message(line: str) -> str:
    """Mosquitto's line without its own ``1700000000: `` timestamp (the log record has one)."""
    stamp, sep, rest = line.rstrip().partition(": ")
    return rest if sep and stamp.isdigit() else line.rstrip()


def _mosquitto_level(line: str) -> int:
    lowered = line.lower()
    if "error" in lowered:
        return logging.ERROR
    if "warning" in lowered:
        return logging.WARNING
    if "saving in-memory database" in lowered:  # every autosave_interval: noise
        return logging.DEBUG
    return logging.INFO


def _not_a_port_probe(record: logging.LogRecord) -> bool:
    """amqtt logs an ERROR and a WARNING for every connection that closes without a packet:
    what a readiness probe (``factory-assets up``, a load balancer) does. Not a problem."""
    return "No data to decode MQTT packet fixed header" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    import asyncio

    from factory_assets.cli import configure_logging

    p = argparse.ArgumentParser(prog="python -m factory_assets.simulation.broker",
                                description="Run an MQTT broker (Mosquitto, else amqtt) on 127.0.0.1 until SIGTERM/SIGINT.")
    p.add_argument("--port", type=int, default=1883, help="TCP port (0 = any free port)")
    p.add_argument("--host", default=HOST, help="address to bind (default 127.0.0.1)")
    p.add_argument("--exit-with-parent", type=int, default=None, metavar="PID",
                   help="exit when the process PID (our parent) goes away")
    p.add_argument("--log-level", default=None, type=str.upper,
                   help="default: FACTORY_LOG_LEVEL or INFO (amqtt's own records: WARNING unless given)")
    p.add_argument("--broker", choices=BROKERS, default=None,
                   help="default: FACTORY_MQTT_BROKER, else auto (Mosquitto when installed)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="Mosquitto persistence directory (default <factory home>/mosquitto)")
    args = p.parse_args(argv)
    configure_logging(args.log_level)
    if args.log_level:
        logging.getLogger("amqtt").setLevel(args.log_level)
    logging.getLogger("amqtt.broker").addFilter(_not_a_port_probe)
    try:
        kind = broker_kind(args.broker)
    except (ValueError, BrokerError) as exc:
        logger.error("broker failed to start: %s", exc)
        return 1
    if kind == "mosquitto":
        return _serve_mosquitto(args.port, args.host, args.exit_with_parent, args.data_dir)

    try:
        asyncio.run(_serve(args.port, args.host, args.exit_with_parent))
    except OSError as exc:  # e.g. port already in use
        logger.error("broker failed to start: %s", exc)
        return 1
    except Exception as exc:  # amqtt wraps bind errors in BrokerError
        logger.error("broker failed to start: %s", exc)
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
    """A Mosquitto (or amqtt) broker in a subprocess. Use :func:`start_broker` to create one.

    Mosquitto's persistence directory lives as long as this object, so messages queued
    for offline persistent sessions survive :meth:`restart`."""

    def __init__(self, port: int = 0, *, host: str = HOST, startup_timeout: float = 20.0,
                 broker: str | None = None, data_dir: Path | None = None):
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self.kind = broker_kind(broker)
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile(mode="w+", prefix=f"{self.kind}-", suffix=".log")
        self._tmp = None
        if self.kind == "mosquitto" and data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mosquitto-")
            data_dir = Path(self._tmp.name)
        self.data_dir = data_dir

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
        cmd = [sys.executable, "-m", "factory_assets.simulation.broker", "--port", str(self.port),
               "--host", self.host, "--exit-with-parent", str(os.getpid()), "--broker", self.kind]
        if self.data_dir is not None:
            cmd += ["--data-dir", str(self.data_dir)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     stdin=subprocess.DEVNULL)
        line = self._read_ready_line(self.proc, self.startup_timeout)
        if not line.startswith(READY_PREFIX):
            self._terminate()
            raise BrokerError(f"{self.kind} broker did not start on {self.host}:{self.port}: "
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
        """SIGTERM (clean shutdown; Mosquitto saves its persistence); SIGKILL after 10 s."""
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
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> BrokerProcess:
        return self.start() if not self.running else self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BrokerProcess(kind={self.kind!r}, url={self.url!r}, running={self.running})"


def start_broker(port: int = 0, *, host: str = HOST, startup_timeout: float = 20.0,
                 broker: str | None = None, data_dir: Path | None = None) -> BrokerProcess:
    """Start a broker subprocess on ``host:port`` (0 = free port); returns once it accepts connections.

    ``broker``: ``mosquitto``, ``amqtt`` or ``auto`` (default: ``FACTORY_MQTT_BROKER``, else auto)."""
    return BrokerProcess(port, host=host, startup_timeout=startup_timeout, broker=broker,
                         data_dir=data_dir).start()


if __name__ == "__main__":
    sys.exit(main())
