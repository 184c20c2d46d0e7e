"""Where the per-slot model puts the rack's nine slots (``vision.slots.SlotGeometry.fit``), on
frames the simulated camera renders: learned from slots seen both empty and occupied, or,
before enough slots have changed, from where each colour the controller reports shows."""
from __future__ import annotations

import numpy as np
import pytest

from factory_assets.simulation.render import CameraPose, render_warehouse
from factory_assets.vision.features import build_reference
from factory_assets.vision.slots import FeatureConfig, GeometryError, SlotGeometry, aligned_maps
from factory_assets.vocabulary import SLOTS, TYPE_TO_STATE

FIRST_STOCK = {"B2": "BLUE", "B3": "WHITE", "C2": "RED"}  # pieces in two rows and two columns, six slots empty
EXTREME_POSES = [CameraPose(), CameraPose(12.0, 8.0, 1.08, 4.0), CameraPose(-12.0, -8.0, 0.92, -4.0)]


def frames_of(stocks: list[dict], pose: CameraPose, per_stock: int = 4, seed: int = 0):
    """Jittered frames of each stock (a few per stock, as a camera at 2 frames/s gives them) and
    their slot states."""
    rng = np.random.default_rng(seed)
    images, states = [], []
    for stock in stocks:
        for _ in range(per_stock):
            images.append(render_warehouse(stock, rng=rng, pose=pose))
            states.append([TYPE_TO_STATE.get(stock.get(s)) or 0 for s in SLOTS])
    return images, np.array(states)


def maps_of(images, reference):
    return np.stack([aligned_maps(im, reference, FeatureConfig()) for im in images])


def largest_gap(a: SlotGeometry, b: SlotGeometry) -> float:
    return max(float(np.hypot(*np.subtract(a.centre(s), b.centre(s)))) for s in SLOTS)


@pytest.mark.parametrize("pose", EXTREME_POSES, ids=["reference", "right-down-closer-turned", "left-up-farther-turned"])
def test_one_stock_with_pieces_in_two_rows_and_columns_places_the_rack_from_the_reported_colours(pose):
    rng = np.random.default_rng(1)
    varied = [{s: rng.choice(["BLUE", "RED", "WHITE", None]) for s in SLOTS} for _ in range(12)]
    images, states = frames_of([FIRST_STOCK] + varied, pose)
    reference = np.round(build_reference(images), 4).astype(np.float32)
    maps = maps_of(images, reference)
    learned = SlotGeometry.fit(maps, states)  # every slot seen empty and occupied: the lattice from changes
    assert learned.source == "learned"

    first = SlotGeometry.fit(maps[:4], states[:4])  # the first stock's frames alone: nothing changed yet
    assert first.source == "colours"
    assert largest_gap(first, learned) <= 2.5  # pixels of the 160x120 work image; slots are ~40x31 apart


def test_pieces_in_one_column_cannot_place_the_rack_and_say_why():
    images, states = frames_of([{"A1": "BLUE", "B1": "RED", "C1": "WHITE"}], CameraPose())
    maps = maps_of(images, np.round(build_reference(images), 4).astype(np.float32))
    with pytest.raises(GeometryError, match="two rows and two columns"):
        SlotGeometry.fit(maps, states)


def test_the_way_the_rack_was_placed_is_kept_with_the_geometry():
    g = SlotGeometry((46.0, 36.7), (39.6, -0.5), (-0.1, 31.1), source="colours")
    assert SlotGeometry.from_dict(g.to_dict()) == g
