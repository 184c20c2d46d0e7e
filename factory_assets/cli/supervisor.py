"""Keeping ``factory-assets up``'s services running: a crashed service is restarted.

Every service resumes where it stopped (the ingester's broker session, the live
updater's cursor, Dagster's own storage), so restarting one is how the stack rides out
a bug or a kill in one process instead of stopping everything. Restarts back off
exponentially (1 s, 2 s, 4 s … 30 s); a service that stayed up for ``healthy_after``
seconds starts again from the shortest delay. One that crashes more than
``max_crashes`` times within ``window`` seconds is in a crash loop: ``up`` stops and
says which service and where its log is, rather than restarting it for ever.

The clock is passed in (``step(now)``), so the policy is tested without waiting.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

logger = logging.getLogger(__name__)


class CrashLoop(RuntimeError):
    """A service keeps exiting shortly after each start."""

    def __init__(self, service: str, message: str):
        super().__init__(message)
        self.service = service


@dataclass(frozen=True)
class RestartPolicy:
    backoff_first: float = 1.0
    backoff_max: float = 30.0
    healthy_after: float = 60.0
    max_crashes: int = 5
    window: float = 300.0


@dataclass
class _State:
    started_at: float
    backoff: float
    restart_at: float | None = None
    crashes: list[float] = field(default_factory=list)


class Supervisor:
    """Watches ``services`` (objects with ``name``, ``proc`` and ``restarts``) and restarts the
    ones that exit. ``start(svc)`` returns the new ``subprocess.Popen``."""

    def __init__(self, services, start: Callable, now: float, policy: RestartPolicy | None = None,
                 say: Callable[[str], None] | None = None):
        self.services = list(services)
        self.start = start
        self.policy = policy or RestartPolicy()
        self.say = say or logger.warning
        self._state = {s.name: _State(started_at=now, backoff=self.policy.backoff_first) for s in self.services}

    def step(self, now: float) -> None:
        """Restart what is due; note what exited. Raises ``CrashLoop``."""
        p = self.policy
        for svc in self.services:
            st = self._state[svc.name]
            if st.restart_at is not None:
                if now >= st.restart_at:
                    svc.proc = self.start(svc)
                    svc.restarts += 1
                    st.started_at, st.restart_at = now, None
                    self.say(f"restarted {svc.name} (pid {svc.proc.pid}, restart {svc.restarts})")
                continue
            code = svc.proc.poll()
            if code is None:
                if now - st.started_at >= p.healthy_after:
                    st.backoff = p.backoff_first
                continue
            st.crashes = [t for t in st.crashes if now - t < p.window] + [now]
            if len(st.crashes) > p.max_crashes:
                raise CrashLoop(svc.name, f"{svc.name} exited {len(st.crashes)} times in {p.window:.0f} s "
                                f"(last exit code {code})")
            self.say(f"{svc.name} exited with code {code}; restarting it in {st.backoff:.0f} s")
            st.restart_at = now + st.backoff
            st.backoff = min(st.backoff * 2, p.backoff_max)

    def waiting(self) -> list[str]:
        """The services that exited and wait for their restart."""
        return [s.name for s in self.services if self._state[s.name].restart_at is not None]


class DatabaseWatch:
    """Restarts the embedded MongoDB ``up`` relies on when its process died, on the same port
    (every service has that URI); retries back off like a service's. A daemon stopped on
    purpose (``factory-assets db stop``) is left stopped."""

    def __init__(self, embedded, now: float, policy: RestartPolicy | None = None,
                 say: Callable[[str], None] | None = None, check_every: float = 2.0):
        self.embedded = embedded
        self.port = embedded.port()
        self.policy = policy or RestartPolicy()
        self.say = say or logger.warning
        self.check_every = check_every
        self.restarts = 0
        self._next = now
        self._backoff = self.policy.backoff_first
        # Set when the daemon was found dead, cleared once a restart succeeds: a failed start
        # removes the state file, after which died() can no longer tell a death from a stop.
        self._down = False

    def step(self, now: float) -> None:
        if now < self._next or self.port is None:
            return
        self._next = now + self.check_every
        if not self._down and not self.embedded.died():
            if self.restarts:
                self._backoff = self.policy.backoff_first
            return
        if not self._down:
            self.say(f"embedded MongoDB stopped unexpectedly; restarting it on port {self.port}")
        self._down = True
        try:
            self.embedded.start(port=self.port)
        except Exception as exc:  # noqa: BLE001 - e.g. the port taken meanwhile: try again later
            self.say(f"embedded MongoDB did not restart ({exc}); retrying in {self._backoff:.0f} s")
            self._next = now + self._backoff
            self._backoff = min(self._backoff * 2, self.policy.backoff_max)
            return
        self._down = False
        self.restarts += 1
        self.say(f"embedded MongoDB is back (restart {self.restarts}); services reconnect by themselves")
