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
127.0.0.1 (TLS with ``--certfile/--keyfile``; logins only with ``--password-file``, else
anonymous), persistence in the data directory, no ``$SYS`` topics, no packet size limit
below MQTT's 256 MB. Offline persistent sessions (the ingester while it is down or
restarting) get QoS 0 messages queued too (``queue_qos0_messages true``: the controller
publishes its camera frames at QoS 0), up to ``max_queued_messages`` /
``max_queued_bytes`` sized for a stated outage (:class:`QueueLimits`: by default 30
minutes at 2 frames/s). ``max_inflight_messages 0`` (no limit): measured on Mosquitto
2.0.11, a reconnecting client that is sent more queued QoS 0 messages than that limit gets
no QoS 1 message for the rest of the connection (each queued QoS 0 message it dequeues
takes a unit of the QoS 1 send quota and never gives it back). docs/mqtt.md has the
measurements.

amqtt configuration notes (0.12): anonymous access needs the
``AnonymousAuthPlugin`` explicitly (with no auth plugin answering, every CONNECT is
refused); the default plugin set also publishes ``$SYS`` topics every 20 s and logs
every packet, so we list only the auth plugin. amqtt has no maximum message size:
anything up to MQTT's 256 MB remaining-length limit passes.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
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


# The controller's frames as the broker holds them: a 320x240 JPEG in base64 JSON (the
# simulator's are ~19 KiB), with a margin for busier real pictures.
DEFAULT_FRAME_BYTES = 32 * 1024
DEFAULT_OUTAGE_MINUTES = 30.0
DEFAULT_OUTAGE_FPS = 2.0
OTHER_MESSAGES_PER_S = 1.0  # stock, states, orders, sensors: far fewer than 1/s; a generous allowance
OTHER_MESSAGE_BYTES = 4 * 1024


@dataclass(frozen=True)
class QueueLimits:
    """What Mosquitto keeps for one offline persistent session (the ingester while it is down).

    ``messages``/``bytes`` become ``max_queued_messages``/``max_queued_bytes`` (0: no limit);
    ``qos0``: ``queue_qos0_messages`` (frames are QoS 0). :meth:`for_outage` sizes them for
    an outage of ``minutes`` at ``fps`` frames per second plus other messages."""
    messages: int = 0
    bytes: int = 0
    qos0: bool = True
    outage_minutes: float | None = None  # what they were sized for (shown in the log)
    fps: float | None = None
    frame_bytes: int | None = None

    @classmethod
    def for_outage(cls, minutes: float = DEFAULT_OUTAGE_MINUTES, fps: float = DEFAULT_OUTAGE_FPS,
                   frame_bytes: int = DEFAULT_FRAME_BYTES, qos0: bool = True) -> "QueueLimits":
        if minutes <= 0 or fps < 0 or frame_bytes <= 0:
            raise ValueError("an outage needs minutes > 0, fps >= 0 and frame_bytes > 0")
        seconds = minutes * 60.0
        frames, others = math.ceil(seconds * fps), math.ceil(seconds * OTHER_MESSAGES_PER_S)
        return cls(messages=frames + others, bytes=frames * frame_bytes + others * OTHER_MESSAGE_BYTES,
                   qos0=qos0, outage_minutes=minutes, fps=fps, frame_bytes=frame_bytes)

    def describe(self) -> str:
        size = "no limit" if not self.messages and not self.bytes else (
            f"{self.messages or 'unlimited'} messages / {self.bytes / 2**20:.0f} MiB" if self.bytes
            else f"{self.messages} messages")
        sized = (f", sized for {self.outage_minutes:g} min at {self.fps:g} frames/s"
                 if self.outage_minutes else "")
        return f"offline queue {size}{sized}; QoS 0 {'queued' if self.qos0 else 'dropped'} for offline sessions"


def mosquitto_config(port: int, data_dir: Path, host: str = HOST, *, queue: QueueLimits | None = None,
                     password_file: Path | None = None, certfile: Path | None = None,
                     keyfile: Path | None = None, cafile: Path | None = None,
                     connection_messages: bool = False) -> str:
    """A Mosquitto 2.0 configuration: see the module docstring for why each line."""
    queue = queue or QueueLimits.for_outage()
    lines = [f"listener {port} {host}"]
    if certfile:
        lines += [f"certfile {Path(certfile).resolve()}", f"keyfile {Path(keyfile).resolve()}"]
        if cafile:  # clients may then present certificates signed by it (not required)
            lines += [f"cafile {Path(cafile).resolve()}"]
    if password_file:
        lines += ["allow_anonymous false", f"password_file {Path(password_file).resolve()}"]
    else:
        lines += ["allow_anonymous true"]
    lines += [
        "persistence true",
        f"persistence_location {data_dir.resolve()}/",
        "autosave_interval 5",  # persist queued messages of offline sessions every 5 s, and at exit
        "sys_interval 0",  # no $SYS topics
        f"queue_qos0_messages {'true' if queue.qos0 else 'false'}",  # frames are QoS 0
        f"max_queued_messages {int(queue.messages)}",
        f"max_queued_bytes {int(queue.bytes)}",
        # 0 = no limit: a finite one stalls QoS 1 after a backlog of queued QoS 0 (module docstring)
        "max_inflight_messages 0",
        # max_packet_size stays at its default, unlimited (MQTT's 256 MB): a 20 MB frame passes
        "persistent_client_expiration 2d",
        "set_tcp_nodelay true",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        f"connection_messages {'true' if connection_messages else 'false'}",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # as root Mosquitto drops to the user "mosquitto", which cannot write our data directory
        lines.append("user root")
    return "\n".join(lines) + "\n"


def write_password_file(path: Path, users: dict[str, str]) -> Path:
    """A Mosquitto password file for ``users`` (name -> password), made by ``mosquitto_passwd``."""
    tool = shutil.which("mosquitto_passwd") or next(
        (p for p in ("/usr/bin/mosquitto_passwd", "/usr/sbin/mosquitto_passwd") if os.access(p, os.X_OK)), None)
    if tool is None:
        raise BrokerError("mosquitto_passwd is not installed (it comes with the mosquitto package)")
    path = Path(path)
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    for name, password in users.items():
        if ":" in name:
            raise ValueError(f"a Mosquitto user name cannot hold ':' ({name!r})")
        # -b takes the password as an argument: fine for the test and demo brokers this serves
        done = subprocess.run([tool, "-b", str(path), name, password], capture_output=True, text=True)
        if done.returncode != 0:
            raise BrokerError(f"mosquitto_passwd failed: {done.stderr.strip() or done.stdout.strip()}")
    return path


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


def _serve_mosquitto(port: int, host: str, parent_pid: int | None, data_dir: Path | None,
                     **options) -> int:
    """Run Mosquitto as our child until SIGTERM/SIGINT (or our parent dies); its exit code.
    ``options``: the keyword arguments of :func:`mosquitto_config` (queue limits, logins, TLS)."""
    binary = mosquitto_binary()
    if data_dir is None:
        from factory_assets import config

        data_dir = config.factory_home() / "mosquitto"
    data_dir.mkdir(parents=True, exist_ok=True)
    if port == 0:
        port = _free_port(host)
    conf = data_dir / f"mosquitto-{port}.conf"
    conf.write_text(mosquitto_config(port, data_dir, host, **options))
    queue = options.get("queue") or QueueLimits.for_outage()
    logger.info("mosquitto on %s:%d: %s%s%s", host, port, queue.describe(),
                ", TLS" if options.get("certfile") else "",
                ", logins from a password file" if options.get("password_file") else ", anonymous")
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
    scheme = "mqtts" if options.get("certfile") else "mqtt"
    print(f"{READY_PREFIX}{scheme}://{host}:{port}", flush=True)  # the readiness line (stdout), not a log record
    while not stop.wait(0.5):
        if parent_pid and os.getppid() != parent_pid:  # parent died: we were re-parented
            break
        if proc.poll() is not None:
            logger.error("mosquitto exited with code %s", proc.returncode)
            return proc.returncode or 1
    logger.info("broker on port %d: shutting down", port)
    # Mosquitto saves its persistence database on SIGTERM. 2.0.11 logs "running" before it sets
    # its run flag, so a SIGTERM right after start can be lost: send it again each second.
    deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S * 3
    code = None
    while code is None:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline:
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
    add_queue_arguments(p)
    p.add_argument("--password-file", type=Path, default=None,
                   help="Mosquitto password file (mosquitto_passwd): refuse anonymous clients")
    p.add_argument("--certfile", type=Path, default=None, help="server certificate (PEM): a TLS listener")
    p.add_argument("--keyfile", type=Path, default=None, help="the server certificate's private key (PEM)")
    p.add_argument("--cafile", type=Path, default=None,
                   help="CA of client certificates the broker accepts (optional, with --certfile)")
    p.add_argument("--connection-messages", action="store_true",
                   help="log every client connecting and disconnecting")
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
        if bool(args.certfile) != bool(args.keyfile):
            logger.error("broker failed to start: --certfile and --keyfile go together")
            return 1
        try:
            queue = queue_limits(args)
        except ValueError as exc:
            logger.error("broker failed to start: %s", exc)
            return 1
        return _serve_mosquitto(args.port, args.host, args.exit_with_parent, args.data_dir, queue=queue,
                                password_file=args.password_file, certfile=args.certfile,
                                keyfile=args.keyfile, cafile=args.cafile,
                                connection_messages=args.connection_messages)
    if args.password_file or args.certfile:
        logger.error("broker failed to start: logins and TLS need Mosquitto (apt-get install mosquitto)")
        return 1

    try:
        asyncio.run(_serve(args.port, args.host, args.exit_with_parent))
    except OSError as exc:  # e.g. port already in use
        logger.error("broker failed to start: %s", exc)
        return 1
    except Exception as exc:  # amqtt wraps bind errors in BrokerError
        logger.error("broker failed to start: %s", exc)
        return 1
    return 0


def add_queue_arguments(p: argparse.ArgumentParser, fps_default: str | None = None) -> None:
    """The offline-queue options, shared with ``factory-assets up`` (``fps_default``: how it
    names its own default of ``--outage-fps``, which it then fills in)."""
    p.add_argument("--outage-minutes", type=float, default=DEFAULT_OUTAGE_MINUTES,
                   help="size the offline queue for an ingester outage this long (default %(default)s)")
    p.add_argument("--outage-fps", type=float, default=None if fps_default else DEFAULT_OUTAGE_FPS,
                   help=f"camera frames per second the queue is sized for (default {fps_default or '%(default)s'})")
    p.add_argument("--frame-bytes", type=int, default=DEFAULT_FRAME_BYTES,
                   help="bytes of one camera message the queue is sized for (default %(default)s)")
    p.add_argument("--max-queued-messages", type=int, default=None,
                   help="set Mosquitto's max_queued_messages directly (0: no limit)")
    p.add_argument("--max-queued-bytes", type=int, default=None,
                   help="set Mosquitto's max_queued_bytes directly (0: no limit)")
    p.add_argument("--no-queue-qos0", dest="queue_qos0", action="store_false",
                   help="drop QoS 0 messages (camera frames) for offline sessions, Mosquitto's default")


def queue_limits(args) -> QueueLimits:
    sized = QueueLimits.for_outage(args.outage_minutes, args.outage_fps, args.frame_bytes, qos0=args.queue_qos0)
    if args.max_queued_messages is None and args.max_queued_bytes is None:
        return sized
    if (args.max_queued_messages or 0) < 0 or (args.max_queued_bytes or 0) < 0:
        raise ValueError("--max-queued-messages and --max-queued-bytes must be >= 0")
    return QueueLimits(messages=sized.messages if args.max_queued_messages is None else args.max_queued_messages,
                       bytes=sized.bytes if args.max_queued_bytes is None else args.max_queued_bytes,
                       qos0=args.queue_qos0)


def queue_argv(queue: QueueLimits) -> list[str]:
    """``queue`` as arguments of this module's command line."""
    if queue.outage_minutes:
        argv = ["--outage-minutes", f"{queue.outage_minutes:g}", "--outage-fps", f"{queue.fps:g}",
                "--frame-bytes", str(int(queue.frame_bytes or DEFAULT_FRAME_BYTES))]
    else:
        argv = ["--max-queued-messages", str(int(queue.messages)), "--max-queued-bytes", str(int(queue.bytes))]
    return argv + ([] if queue.qos0 else ["--no-queue-qos0"])


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
                 broker: str | None = None, data_dir: Path | None = None, queue: QueueLimits | None = None,
                 users: dict[str, str] | None = None, tls: "ServerTls | None" = None,
                 connection_messages: bool = False):
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self.kind = broker_kind(broker)
        if self.kind != "mosquitto" and (users or tls or queue):
            raise BrokerError("logins, TLS and queue limits need Mosquitto (apt-get install mosquitto)")
        self.queue = queue
        self.tls = tls
        self.connection_messages = connection_messages
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile(mode="w+", prefix=f"{self.kind}-", suffix=".log")
        self._tmp = None
        if self.kind == "mosquitto" and data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mosquitto-")
            data_dir = Path(self._tmp.name)
        self.data_dir = data_dir
        # a password file refuses every anonymous client (users: name -> password)
        self.password_file = write_password_file(Path(data_dir) / "passwd", users) if users else None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def url_for(self, user: str, password: str | None = None) -> str:
        """The broker's URL with a login (for the clients of a broker made with ``users``)."""
        from urllib.parse import quote

        login = quote(user, safe="") + (f":{quote(password, safe='')}" if password is not None else "")
        return f"{'mqtts' if self.tls else 'mqtt'}://{login}@{self.host}:{self.port}"

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
        if self.queue is not None:
            cmd += queue_argv(self.queue)
        if self.password_file is not None:
            cmd += ["--password-file", str(self.password_file)]
        if self.tls is not None:
            cmd += ["--certfile", str(self.tls.certfile), "--keyfile", str(self.tls.keyfile)]
            if self.tls.cafile:
                cmd += ["--cafile", str(self.tls.cafile)]
        if self.connection_messages:
            cmd += ["--connection-messages"]
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


@dataclass(frozen=True)
class ServerTls:
    """The broker's TLS listener: its certificate and key (PEM); ``cafile`` to accept client certificates."""
    certfile: Path
    keyfile: Path
    cafile: Path | None = None


def start_broker(port: int = 0, *, host: str = HOST, startup_timeout: float = 20.0,
                 broker: str | None = None, data_dir: Path | None = None, **options) -> BrokerProcess:
    """Start a broker subprocess on ``host:port`` (0 = free port); returns once it accepts connections.

    ``broker``: ``mosquitto``, ``amqtt`` or ``auto`` (default: ``FACTORY_MQTT_BROKER``, else auto).
    ``options`` (Mosquitto only): ``queue`` (:class:`QueueLimits`), ``users`` (name -> password:
    anonymous clients are refused), ``tls`` (:class:`ServerTls`), ``connection_messages``."""
    return BrokerProcess(port, host=host, startup_timeout=startup_timeout, broker=broker,
                         data_dir=data_dir, **options).start()


if __name__ == "__main__":
    sys.exit(main())
