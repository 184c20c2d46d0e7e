"""Runs a ``Topology`` the way ``factory-assets up --dagster-postgres`` does: the same services
(``dagster api grpc`` per code location, webserver, daemon) as real processes, each in its own
process group with its log in a file, and waits for states with bounded polls."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    """Polls ``condition()`` until it returns something truthy (returned); fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class RunningTopology:
    def __init__(self, topology, base_env: dict, log_dir: Path):
        self.topology = topology
        self.base_env = base_env
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    # --- processes -------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> "RunningTopology":
        from factory_assets.cli.up import wait_port

        self.log_dir.mkdir(parents=True, exist_ok=True)
        for svc in self.topology.services():
            log = open(self.log_dir / f"{svc.name}.log", "ab", buffering=0)
            proc = subprocess.Popen(svc.argv, env={**self.base_env, **svc.env}, cwd=ROOT, start_new_session=True,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            log.close()
            self.procs.append((svc.name, proc))
            if svc.ready_port and not wait_port(svc.ready_port, timeout, proc):
                raise AssertionError(f"{svc.name} did not come up:\n{self.log_tail(svc.name)}")
        return self

    def stop(self, grace: float = 30.0) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs = []

    def pid(self, name: str) -> int:
        return next(p.pid for n, p in self.procs if n == name)

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    # --- the webserver's GraphQL API (public) ---------------------------------------------------
    def client(self):
        from dagster_graphql import DagsterGraphQLClient

        return DagsterGraphQLClient("127.0.0.1", port_number=self.topology.webserver_port, timeout=60)

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        import requests

        url = f"http://127.0.0.1:{self.topology.webserver_port}/graphql"
        answer = requests.post(url, json={"query": query, "variables": variables or {}}, timeout=60)
        answer.raise_for_status()
        body = answer.json()
        assert not body.get("errors"), body["errors"]
        return body["data"]

    def locations(self) -> dict[str, str]:
        """Each code location's load status and the type of what loaded (``RepositoryLocation`` or an error)."""
        data = self.graphql("""{ workspaceOrError { ... on Workspace { locationEntries {
            name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }""")
        return {e["name"]: (e["loadStatus"], (e["locationOrLoadError"] or {}).get("__typename"),
                            (e["locationOrLoadError"] or {}).get("message"))
                for e in data["workspaceOrError"]["locationEntries"]}

    def wait_until_loaded(self, timeout: float = 120.0) -> dict:
        names = {c.location_name for c in self.topology.code_servers}

        def loaded():
            try:
                locs = self.locations()
            except Exception:  # the webserver still starting
                return None
            if names <= set(locs) and all(locs[n][0] == "LOADED" for n in names):
                return locs
            return None

        return wait_for(loaded, timeout, f"code locations {sorted(names)} loaded by the webserver", 0.5)

    def submit(self, job: str, location: str, tags: dict[str, str]) -> str:
        return self.client().submit_job_execution(job, repository_location_name=location,
                                                  repository_name="__repository__", tags=tags)
