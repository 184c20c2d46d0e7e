"""A tiny code location for the topology tests, served by ``dagster api grpc -m`` beside the real
``factory_assets.definitions``: jobs whose only step waits for a gate file, so a test decides when
each run may finish, and a sensor that requests a run for each request file.

Every file lives under ``FACTORY_TEST_GATES`` (set in the code server's environment; run workers
inherit it): ``<name>.started`` holds the pid of the run worker that reached the step,
``<name>.open`` lets it finish, ``requests/<factory>-<n>.request`` asks the sensor for a run.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import dagster as dg

from factory_assets.defs.pools import FACTORY_TAG, MONGODB_POOL

GATES_ENV = "FACTORY_TEST_GATES"
GATE_TIMEOUT_S = 120.0


def gates() -> Path:
    return Path(os.environ[GATES_ENV])


def _pass_gate(context) -> None:
    name = context.run.tags["gate"]
    (gates() / f"{name}.started").write_text(str(os.getpid()))
    gate = gates() / f"{name}.open"
    deadline = time.monotonic() + GATE_TIMEOUT_S
    while not gate.exists():  # the test opens it; a bounded wait, not a sleep to settle
        if time.monotonic() > deadline:
            raise dg.Failure(f"gate {name} was not opened in {GATE_TIMEOUT_S:.0f} s")
        time.sleep(0.05)
    (gates() / f"{name}.done").write_text(str(os.getpid()))


@dg.op
def gated_step(context):
    _pass_gate(context)


@dg.op(pool=MONGODB_POOL)
def mongodb_step(context):
    """A step in the MongoDB pool: it holds one of the pool's slots until its gate opens."""
    _pass_gate(context)


@dg.op
def hello(context) -> str:
    return context.run.tags.get(FACTORY_TAG, "")


# in-process executor: the step runs in the run worker itself, so killing that one process
# kills the run mid-step
@dg.job(executor_def=dg.in_process_executor)
def gated():
    gated_step()


@dg.job(executor_def=dg.in_process_executor)
def pooled():
    mongodb_step()


@dg.job(executor_def=dg.in_process_executor)
def greet():
    hello()


@dg.sensor(job=greet, minimum_interval_seconds=1, default_status=dg.DefaultSensorStatus.RUNNING)
def request_sensor(context):
    """A run for each new ``requests/<factory>-<n>.request`` file, tagged with its factory. Cursor:
    the request names already turned into runs."""
    seen = json.loads(context.cursor) if context.cursor else []
    new = sorted(p.stem for p in (gates() / "requests").glob("*.request") if p.stem not in seen)
    if not new:
        return dg.SkipReason("no new request")
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=n, tags={FACTORY_TAG: n.rsplit("-", 1)[0]})
                                         for n in new], cursor=json.dumps(seen + new))


factory_days = dg.MultiPartitionsDefinition({
    "factory": dg.StaticPartitionsDefinition(["factory-1", "factory-2"]),
    "day": dg.DailyPartitionsDefinition(start_date="2026-11-01", end_date="2026-11-03", timezone="UTC"),
})


@dg.asset(partitions_def=factory_days)
def factory_day(context):
    """One factory's day: what a backfill over factories x days runs, one run per partition."""
    keys = context.partition_key.keys_by_dimension
    return dg.MaterializeResult(metadata={"factory": keys["factory"], "day": keys["day"]})


factory_days_job = dg.define_asset_job("factory_days_job", selection=[factory_day], partitions_def=factory_days)

defs = dg.Definitions(jobs=[gated, pooled, greet, factory_days_job], sensors=[request_sensor], assets=[factory_day])
