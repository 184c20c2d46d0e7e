"""A fleet of simulated factories through one broker (``simulate --factories N``, ``up --factories N``).

Each factory of the fleet is a whole simulated factory (:mod:`factory_assets.simulation.factory`)
with its own MQTT clients, under its own topic prefix, with

* its own **stock history**: seed ``seed + k - 1`` for factory ``k`` (factory-1 keeps ``seed``);
* its own **camera pose**: a shift, zoom and rotation within
  :data:`~factory_assets.simulation.render.POSE_RANGES`, drawn from ``(seed, k)``;
* its own **clock**: the controller's clock offset, drawn within :data:`CLOCK_OFFSET_RANGE_S`
  from ``(seed, k)`` (plus a common ``clock_offset_s``);
* with ``cameras`` > 1, **further cameras** on the same rack: camera ``j`` (2..``cameras``) is
  ``cam-j``, at a pose drawn from ``(seed, k, j)``; its ``i/cam`` messages carry
  ``"camera_id": "cam-j"`` under the factory's prefix, while camera 1 is the controller's own
  (``{ts, data}`` as the TXT sends it: the ingester's ``--camera-id`` names it, ``txt-cam``).

Factory 1 is the reference factory: the reference camera pose, no clock offset of its own and
``seed`` itself, so ``--factories 1`` (``make run``) is exactly the single unprefixed factory it
always was, and the first factory of any fleet is that same factory under its prefix.
Everything here is a pure function of ``(n, seed, cameras)``: the same fleet every time, and
more cameras add cameras without changing the first one.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from factory_assets.simulation.factory import Camera
from factory_assets.simulation.render import CameraPose

logger = logging.getLogger(__name__)

FLEET_PREFIX = "fleet/"  # factory k publishes under fleet/factory-k/
CLOCK_OFFSET_RANGE_S = (-20.0, 20.0)  # each factory's own controller clock error, seconds
MAX_FACTORIES = 500
MAX_CAMERAS = 16  # cameras per factory
_POSE_STREAM = 0xF1EE7  # the random stream the fleet's poses and clocks are drawn from
_CAMERA_STREAM = 0xCA3E7  # ... and the further cameras' poses


@dataclass(frozen=True)
class FleetFactory:
    number: int  # 1..N
    factory_id: str  # factory-<number>
    prefix: str  # the topic prefix ("" for a lone factory)
    seed: int
    pose: CameraPose  # the controller's own camera
    clock_offset_s: float
    extra_cameras: tuple[Camera, ...] = ()  # cam-2, cam-3...: further cameras on the same rack

    @property
    def cameras(self) -> int:
        return 1 + len(self.extra_cameras)

    @property
    def prefix_spec(self) -> str:
        """``PREFIX=FACTORY_ID``, as ``ingest mqtt --prefix`` and ``api --prefix`` take it."""
        return f"{self.prefix}={self.factory_id}"

    def describe(self) -> str:
        cameras = "".join(f", {c.camera_id} {c.pose.describe()}" for c in self.extra_cameras)
        return (f"{self.factory_id}: topics under {self.prefix or '(no prefix)'}, seed {self.seed}, camera "
                f"{self.pose.describe()}{cameras}, clock {self.clock_offset_s:+.1f} s")


def factory_prefix(number: int, root: str = FLEET_PREFIX) -> str:
    """``fleet/factory-3/`` (``root`` ends with ``/`` or is empty)."""
    if root and not root.endswith("/"):
        root += "/"
    return f"{root}factory-{number}/"


def extra_cameras(number: int, seed: int, cameras: int) -> tuple[Camera, ...]:
    """The further cameras of factory ``number``: ``cam-2`` .. ``cam-<cameras>``, each at a pose
    drawn from ``(seed, number, j)``."""
    return tuple(Camera(f"cam-{j}", CameraPose.draw(np.random.default_rng(
        [int(seed) & 0xFFFFFFFF, int(number), j, _CAMERA_STREAM]))) for j in range(2, int(cameras) + 1))


def fleet_plan(n: int, seed: int = 0, *, root: str = FLEET_PREFIX, clock_offset_s: float = 0.0,
               cameras: int = 1) -> list[FleetFactory]:
    """The ``n`` factories of a fleet (see the module's docstring), each with ``cameras`` cameras.
    ``n == 1``: the lone unprefixed ``factory-1``, exactly as without a fleet."""
    if not 1 <= int(n) <= MAX_FACTORIES:
        raise ValueError(f"a fleet has 1 to {MAX_FACTORIES} factories, not {n}")
    if not 1 <= int(cameras) <= MAX_CAMERAS:
        raise ValueError(f"a factory has 1 to {MAX_CAMERAS} cameras, not {cameras}")
    if any(c in (root or "") for c in "#+"):
        raise ValueError(f"a topic prefix cannot hold MQTT wildcards: {root!r}")
    if n == 1:
        return [FleetFactory(1, "factory-1", "", int(seed), CameraPose(), float(clock_offset_s),
                             extra_cameras(1, seed, cameras))]
    plan = []
    for k in range(1, int(n) + 1):
        if k == 1:
            pose, own_offset = CameraPose(), 0.0
        else:
            rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, k, _POSE_STREAM])
            pose = CameraPose.draw(rng)
            own_offset = round(float(rng.uniform(*CLOCK_OFFSET_RANGE_S)), 1)
        plan.append(FleetFactory(k, f"factory-{k}", factory_prefix(k, root), int(seed) + k - 1, pose,
                                 round(own_offset + float(clock_offset_s), 3), extra_cameras(k, seed, cameras)))
    return plan


def run_fleet(mqtt_url: str, plan: list[FleetFactory], *, stop_event: threading.Event | None = None,
              **kwargs) -> dict[str, object]:
    """Run every factory of ``plan`` (each :func:`~factory_assets.simulation.publisher.run_simulation`
    on its own thread, with its own MQTT clients) until each ends (``duration_s``/``max_frames``
    in ``kwargs`` apply to each) or ``stop_event`` is set. Returns ``{factory_id: SimulationResult}``;
    a factory that failed stops the others and its error is raised."""
    from factory_assets.simulation.publisher import run_simulation

    stop = stop_event or threading.Event()
    results: dict[str, object] = {}
    errors: dict[str, BaseException] = {}
    for key in ("seed", "factory_id", "prefix", "pose", "clock_offset_s", "client_id", "extra_cameras"):
        if key in kwargs:
            raise TypeError(f"run_fleet sets {key} per factory")

    def one(member: FleetFactory) -> None:
        try:
            results[member.factory_id] = run_simulation(
                mqtt_url, seed=member.seed, factory_id=member.factory_id, prefix=member.prefix, pose=member.pose,
                clock_offset_s=member.clock_offset_s, extra_cameras=member.extra_cameras, stop_event=stop, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others stopped
            errors[member.factory_id] = exc
            logger.error("%s stopped: %s: %s", member.factory_id, type(exc).__name__, exc)
            stop.set()

    threads = [threading.Thread(target=one, args=(m,), name=f"sim-{m.factory_id}", daemon=True) for m in plan]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except KeyboardInterrupt:
        stop.set()  # every factory stops its clients cleanly, then the interrupt goes on
        for t in threads:
            t.join()
        raise
    if errors:
        raise next(iter(errors.values()))
    return results
