"""A fleet of simulated factories: each under its own prefix with its own seed, camera pose and
clock (simulation/fleet.py, render.CameraPose), and with ``--cameras K`` further cameras on each
rack; run by ``simulate --factories N`` through a real broker, and what ``up --factories N`` starts
for it."""
from __future__ import annotations

import base64
import dataclasses
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from factory_assets.simulation.factory import FactorySimulator
from factory_assets.simulation.fleet import CLOCK_OFFSET_RANGE_S, FLEET_PREFIX, fleet_plan
from factory_assets.simulation.render import (HEIGHT, POSE_RANGES, SLOTS, TYPES, WIDTH, CameraPose, render_warehouse,
                                              slot_box)
from factory_assets.vocabulary import parse_ts
from factory_assets_tests.fixtures.mqtt import MqttRecorder, mqtt_broker  # noqa: F401
from factory_assets_tests.simulation.pictures import read_stock

FULL = {s: TYPES[i % 3] for i, s in enumerate(SLOTS)}


def unposed(img: np.ndarray, pose: CameraPose) -> np.ndarray:
    """A posed camera's picture brought back to the reference camera's geometry."""
    return cv2.warpAffine(img, cv2.invertAffineTransform(pose.matrix()), (WIDTH, HEIGHT), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT)


# -- the plan ----------------------------------------------------------------------------------

def test_each_factory_of_a_fleet_has_its_own_prefix_seed_pose_and_clock_the_same_for_the_same_seed():
    plan = fleet_plan(5, seed=7)
    assert [m.factory_id for m in plan] == [f"factory-{k}" for k in range(1, 6)]
    assert [m.prefix for m in plan] == [f"{FLEET_PREFIX}factory-{k}/" for k in range(1, 6)]
    assert [m.prefix_spec for m in plan][2] == "fleet/factory-3/=factory-3"
    assert [m.seed for m in plan] == [7, 8, 9, 10, 11]
    # factory-1 is the reference factory: the reference camera, no clock error of its own
    assert plan[0].pose == CameraPose() and plan[0].clock_offset_s == 0.0
    poses = [m.pose for m in plan[1:]]
    assert len(set(poses)) == 4 and not any(p.is_reference for p in poses)
    for p in poses:
        for name, (lo, hi) in POSE_RANGES.items():
            assert lo <= getattr(p, name) <= hi
    offsets = [m.clock_offset_s for m in plan[1:]]
    assert len(set(offsets)) == 4 and all(CLOCK_OFFSET_RANGE_S[0] <= o <= CLOCK_OFFSET_RANGE_S[1] for o in offsets)
    assert fleet_plan(5, seed=7) == plan  # deterministic
    assert fleet_plan(5, seed=8)[1].pose != plan[1].pose  # another seed, another fleet
    assert fleet_plan(3, seed=7) == plan[:3]  # a bigger fleet adds factories, changes none
    shifted = fleet_plan(3, seed=7, clock_offset_s=5.0, root="/j1/")
    assert [m.clock_offset_s for m in shifted] == [5.0, plan[1].clock_offset_s + 5, plan[2].clock_offset_s + 5]
    assert shifted[1].prefix == "/j1/factory-2/"


def test_a_fleet_of_one_is_todays_single_unprefixed_factory():
    (only,) = fleet_plan(1, seed=3)
    assert (only.factory_id, only.prefix, only.seed, only.pose, only.clock_offset_s) == \
        ("factory-1", "", 3, CameraPose(), 0.0)
    with pytest.raises(ValueError):
        fleet_plan(0)
    with pytest.raises(ValueError):
        fleet_plan(2, root="fleet/#/")


# -- the camera pose ---------------------------------------------------------------------------

def test_every_slot_stays_in_the_picture_at_the_extremes_of_the_pose_ranges():
    corners = [(x, y) for s in SLOTS for x, y in ((slot_box(s)[0], slot_box(s)[1]), (slot_box(s)[2], slot_box(s)[3]),
                                                  (slot_box(s)[0], slot_box(s)[3]), (slot_box(s)[2], slot_box(s)[1]))]
    extremes = [CameraPose(sx, sy, z, r) for sx in POSE_RANGES["shift_x"] for sy in POSE_RANGES["shift_y"]
                for z in POSE_RANGES["zoom"] for r in POSE_RANGES["rotation"]]
    for pose in extremes:
        seen = pose.apply(corners)
        assert seen[:, 0].min() >= 0 and seen[:, 0].max() <= WIDTH - 1, pose
        assert seen[:, 1].min() >= 0 and seen[:, 1].max() <= HEIGHT - 1, pose


def test_a_posed_camera_shows_the_rack_where_its_pose_puts_it_not_where_the_reference_camera_does():
    stock = {"A1": "BLUE", "B2": "RED", "C3": "WHITE", "A3": "RED", "C1": "BLUE"}
    pose = CameraPose(shift_x=-12.0, shift_y=8.0, zoom=1.08, rotation=4.0)
    img = render_warehouse(stock, rng=np.random.default_rng(1), jitter=False, pose=pose)
    assert read_stock(unposed(img, pose)) == {s: stock.get(s) for s in SLOTS}
    assert read_stock(img) != {s: stock.get(s) for s in SLOTS}  # the reference geometry misreads it
    # the reference pose is the picture as it always was
    reference = render_warehouse(stock, rng=np.random.default_rng(1))
    assert np.array_equal(reference, render_warehouse(stock, rng=np.random.default_rng(1), pose=CameraPose()))


def test_each_factory_of_a_fleet_photographs_its_own_rack_through_its_own_pose():
    plan = fleet_plan(3, seed=0)
    frames = {m.factory_id: FactorySimulator(m.seed, pose=m.pose).frame(0.0) for m in plan}
    for m in plan:
        jpeg, stock = frames[m.factory_id]
        img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert read_stock(unposed(img, m.pose)) == stock, m.describe()
    assert len({frames[m.factory_id][0] for m in plan}) == 3


# -- simulate --factories N over a real broker ------------------------------------------------

def test_simulate_factories_publishes_each_factory_under_its_prefix_with_its_seed_pose_and_clock(mqtt_broker):
    plan = fleet_plan(3, seed=4)
    cmd = [sys.executable, "-m", "factory_assets.cli", "simulate", "--mqtt", mqtt_broker.url, "--factories", "3",
           "--seed", "4", "--camera-on", "--fps", "4", "--frames", "3", "--time-scale", "0.01",
           "--sensor-interval", "0.2", "--progress-every", "0"]
    with MqttRecorder(mqtt_broker.url, topics=("fleet/#",)) as rec:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for m in plan:
        assert m.describe() in done.stdout
        assert f"done {m.factory_id}: 3 frames" in done.stdout
    topics = {t for t, _, _ in rec.messages}
    assert topics and all(any(t.startswith(m.prefix) for m in plan) for t in topics)
    for m in plan:
        frames = rec.payloads(m.prefix + "i/cam")
        assert len(frames) == 3
        # the first frame is the picture of this factory's seed through this factory's pose
        expected, _ = FactorySimulator(m.seed, pose=m.pose).frame(0.0)
        assert base64.b64decode(frames[0]["data"].split(",", 1)[1]) == expected, m.factory_id
        first_stock = rec.payloads(m.prefix + "f/i/stock")[0]
        assert first_stock["stockItems"] == FactorySimulator(m.seed).stock_message(0.0)["stockItems"]
    # each controller stamps its messages in its own clock: the fleet's start differs by the offsets
    starts = {m.factory_id: parse_ts(rec.payloads(m.prefix + "i/broadcast")[0]["ts"]) for m in plan}
    for m in plan[1:]:
        gap = (starts[m.factory_id] - starts["factory-1"]).total_seconds()
        assert abs(gap - m.clock_offset_s) < 2.0, (m.factory_id, gap, m.clock_offset_s)


# -- up --factories N ---------------------------------------------------------------------------

def test_up_with_a_fleet_passes_each_factorys_prefix_to_the_ingester_the_simulator_and_the_api():
    from factory_assets.cli.up import build_services

    def argv(services, name):
        return next(s.argv for s in services if s.name == name)

    def prefixes(args):
        return [args[i + 1] for i, a in enumerate(args) if a == "--prefix"]

    fleet = build_services(1883, 3000, 8080, 1.0, 5, dagster=False, factories=3)
    specs = [m.prefix_spec for m in fleet_plan(3, seed=5)]
    assert prefixes(argv(fleet, "ingester")) == specs
    assert prefixes(argv(fleet, "twin-api")) == specs
    sim = argv(fleet, "simulator")
    assert sim[sim.index("--factories") + 1] == "3" and sim[sim.index("--seed") + 1] == "5"
    # one factory: today's command lines, no prefix anywhere
    single = build_services(1883, 3000, 8080, 1.0, 5, dagster=False)
    assert all("--prefix" not in s.argv and "--factories" not in s.argv for s in single)
    assert [s.name for s in single] == [s.name for s in fleet]


def test_a_fleet_message_stream_is_the_controllers_format_under_each_prefix(mqtt_broker):
    """Every message each factory of a fleet publishes passes the controller's format rules."""
    from factory_assets.simulation.factory import Timings
    from factory_assets.simulation.fleet import run_fleet
    from factory_assets.vocabulary.formats import problems

    plan = fleet_plan(2, seed=1)
    with MqttRecorder(mqtt_broker.url, topics=("fleet/#",)) as rec:
        results = run_fleet(mqtt_broker.url, plan, fps=5, max_frames=2, camera_on=True,
                            timings=Timings(scale=0.01), sensor_interval_s=0.1, customer=False)
        assert rec.wait_until(lambda: all(rec.count(m.prefix + "i/cam") >= 2 for m in plan), 10)
    assert {fid: r.frames for fid, r in results.items()} == {"factory-1": 2, "factory-2": 2}
    for topic, payload, _ in rec.messages:
        member = next(m for m in plan if topic.startswith(m.prefix))
        inner = topic[len(member.prefix):]
        assert problems(inner, json.loads(payload)) == [], (topic, payload[:200])


# -- several cameras in one factory ------------------------------------------------------------

def test_more_cameras_give_each_factory_further_cameras_at_poses_of_their_own_and_change_nothing_else():
    one, three = fleet_plan(3, seed=7), fleet_plan(3, seed=7, cameras=3)
    assert [dataclasses.replace(m, extra_cameras=()) for m in three] == one  # the first camera, seed, clock: as before
    assert all(m.extra_cameras == () and m.cameras == 1 for m in one)
    for m in three:
        assert m.cameras == 3 and [c.camera_id for c in m.extra_cameras] == ["cam-2", "cam-3"]
        poses = [m.pose] + [c.pose for c in m.extra_cameras]
        assert len(set(poses)) == 3
        for p in poses[1:]:
            for name, (lo, hi) in POSE_RANGES.items():
                assert lo <= getattr(p, name) <= hi
    assert fleet_plan(3, seed=7, cameras=2) == [dataclasses.replace(m, extra_cameras=m.extra_cameras[:1])
                                                for m in three]  # deterministic; more cameras add cameras
    assert fleet_plan(1, seed=7, cameras=2)[0].extra_cameras[0].camera_id == "cam-2"  # a lone factory too
    for bad in (0, 17):
        with pytest.raises(ValueError):
            fleet_plan(2, cameras=bad)


def test_each_camera_of_a_factory_photographs_the_same_rack_through_its_own_pose_and_names_itself_but_the_controllers():
    [member] = fleet_plan(1, seed=3, cameras=2)
    sim = FactorySimulator(member.seed, pose=member.pose, extra_cameras=member.extra_cameras)
    (own, stock), (other, other_stock) = sim.camera_message(0.0, 0), sim.camera_message(0.0, 1)
    assert "camera_id" not in own and other["camera_id"] == "cam-2"  # the TXT's i/cam is {ts, data}
    assert own["ts"] == other["ts"] and stock == other_stock
    for msg, pose in ((own, member.pose), (other, member.extra_cameras[0].pose)):
        img = cv2.imdecode(np.frombuffer(base64.b64decode(msg["data"].split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
        assert read_stock(unposed(img, pose)) == stock
    assert own["data"] != other["data"]
    # the controller's camera is the picture it always was
    assert sim.frame(0.0)[0] == FactorySimulator(member.seed, pose=member.pose).frame(0.0)[0]
    with pytest.raises(ValueError):  # two cameras of one factory cannot share an id
        FactorySimulator(0, extra_cameras=member.extra_cameras * 2)


def test_simulate_cameras_publishes_each_cameras_frames_under_its_factorys_prefix_the_further_ones_named(mqtt_broker):
    base = [sys.executable, "-m", "factory_assets.cli", "simulate", "--mqtt", mqtt_broker.url, "--seed", "4",
            "--cameras", "2", "--camera-on", "--fps", "4", "--frames", "3", "--time-scale", "0.01",
            "--progress-every", "0", "--no-customer"]
    for factories, plan in ((1, fleet_plan(1, seed=4, cameras=2)), (2, fleet_plan(2, seed=4, cameras=2))):
        with MqttRecorder(mqtt_broker.url, topics=("#",)) as rec:
            done = subprocess.run(base + ["--factories", str(factories)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        for m in plan:
            frames = rec.payloads(m.prefix + "i/cam")
            assert [f.get("camera_id") for f in frames] == [None, "cam-2"] * 3, m.factory_id
            assert frames[0]["ts"] == frames[1]["ts"]  # both cameras at every frame time
            expected = FactorySimulator(m.seed, pose=m.pose, extra_cameras=m.extra_cameras).frame(0.0, 1)[0]
            assert base64.b64decode(frames[1]["data"].split(",", 1)[1]) == expected, m.factory_id
        assert done.stdout.count("6 frames from 2 cameras") == factories
        assert "cam-2 shift" in done.stdout or "camera cam-2:" in done.stdout


def test_up_with_cameras_asks_the_simulator_for_them_and_nothing_else_changes():
    from factory_assets.cli.up import build_services

    def argv(services, name):
        return next(s.argv for s in services if s.name == name)

    for factories in (1, 3):
        plain = build_services(1883, 3000, 8080, 1.0, 5, dagster=False, factories=factories)
        two = build_services(1883, 3000, 8080, 1.0, 5, dagster=False, factories=factories, cameras=2)
        sim = argv(two, "simulator")
        assert sim[sim.index("--cameras") + 1] == "2" and "--cameras" not in argv(plain, "simulator")
        # the ingester stamps each frame with the camera id its message names: it is started as before
        assert argv(two, "ingester") == argv(plain, "ingester")
