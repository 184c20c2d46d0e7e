"""Synthetic pictures of the Fischertechnik high-bay warehouse (pure: no I/O).

The picture imitates the real warehouse camera (320x240 BGR): a bright window and
a wooden floor behind a black 3x3 rack with orange-red plastic connectors and
shelf brackets; a stored workpiece is a flat disc (light blue, crimson red or
white) lying on the beam at the bottom of its slot. Rows ``A..C`` run top to
bottom and columns ``1..3`` left to right, so ``A1`` is top-left and ``C3``
bottom-right. Each frame gets its own lighting level and colour cast, gaussian
sensor noise and a small camera jitter (a few pixels of shift, up to 1 degree of
rotation), all drawn from the ``rng`` passed in, so a seeded generator gives the
same picture every time.

A :class:`CameraPose` places the camera of one factory: a shift, a zoom and a rotation of
the whole picture (about its centre) within :data:`POSE_RANGES`, fixed for that camera
(the per-frame jitter comes on top). The reference pose (no shift, zoom 1, no rotation) is
the camera every earlier picture was taken with.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from factory_assets.vocabulary import SLOTS, TYPES  # noqa: F401 (re-exported for the simulation)

WIDTH, HEIGHT = 320, 240
ROWS: tuple[str, ...] = ("A", "B", "C")
COLUMNS: tuple[str, ...] = ("1", "2", "3")

# rack geometry (pixels of the 320x240 picture, before jitter)
POST_X: tuple[int, ...] = (52, 132, 212, 292)  # centres of the 4 vertical posts
BEAM_Y: tuple[int, ...] = (26, 89, 152, 215)  # centres of the 4 horizontal beams
POST_W, BEAM_H = 12, 8

# workpiece colours (BGR), close to the real parts under neutral light
WORKPIECE_BGR: dict[str, tuple[int, int, int]] = {
    "BLUE": (205, 135, 45),  # light blue disc
    "RED": (45, 25, 175),  # crimson disc
    "WHITE": (228, 230, 232),
}
RACK_BGR = (34, 30, 30)  # black aluminium / plastic
CONNECTOR_BGR = (40, 80, 225)  # orange-red plastic
DISC_W, DISC_H, DISC_TOP_H = 46, 12, 14  # disc width, side height, height of the top ellipse


# A factory's camera pose, drawn uniformly within these ranges (CameraPose.draw): every slot
# stays in the picture at the extremes (tests/simulation/test_fleet.py checks the corners).
POSE_RANGES: dict[str, tuple[float, float]] = {
    "shift_x": (-12.0, 12.0),  # pixels, + to the right
    "shift_y": (-8.0, 8.0),  # pixels, + downwards
    "zoom": (0.92, 1.08),  # > 1: closer
    "rotation": (-4.0, 4.0),  # degrees, + counter-clockwise (OpenCV's convention)
}


@dataclass(frozen=True)
class CameraPose:
    """Where one factory's camera looks at its rack, relative to the reference camera: the
    picture is zoomed by ``zoom`` and turned by ``rotation`` degrees about its centre, then
    shifted by ``shift_x``/``shift_y`` pixels."""

    shift_x: float = 0.0
    shift_y: float = 0.0
    zoom: float = 1.0
    rotation: float = 0.0

    def __post_init__(self):
        if not (self.zoom > 0 and all(math.isfinite(v) for v in (self.shift_x, self.shift_y, self.zoom,
                                                                  self.rotation))):
            raise ValueError(f"a camera pose needs finite values and zoom > 0, got {self}")

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "CameraPose":
        """A pose uniformly within :data:`POSE_RANGES` (rounded: 0.1 px, 0.001, 0.1 degree)."""
        v = {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in POSE_RANGES.items()}
        return cls(round(v["shift_x"], 1), round(v["shift_y"], 1), round(v["zoom"], 3), round(v["rotation"], 1))

    @property
    def is_reference(self) -> bool:
        return (self.shift_x, self.shift_y, self.zoom, self.rotation) == (0.0, 0.0, 1.0, 0.0)

    def matrix(self, extra_rotation: float = 0.0, extra_shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
        """The 2x3 affine map from reference pixels to this camera's pixels (plus a frame's jitter)."""
        import cv2

        m = cv2.getRotationMatrix2D((WIDTH / 2, HEIGHT / 2), self.rotation + extra_rotation, self.zoom)
        m[:, 2] += (self.shift_x + extra_shift[0], self.shift_y + extra_shift[1])
        return m

    def apply(self, points) -> np.ndarray:
        """Reference pixel coordinates ``[(x, y), ...]`` -> where this camera shows them."""
        pts = np.asarray(points, np.float64).reshape(-1, 2)
        return pts @ self.matrix()[:, :2].T + self.matrix()[:, 2]

    def describe(self) -> str:
        return (f"shift {self.shift_x:+.1f},{self.shift_y:+.1f} px, zoom {self.zoom:.3f}, "
                f"rotation {self.rotation:+.1f} deg")


def slot_box(slot: str) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` of the open space of a slot (between posts and beams), unjittered."""
    row, col = ROWS.index(slot[0]), COLUMNS.index(slot[1])
    x0, x1 = POST_X[col] + POST_W // 2, POST_X[col + 1] - POST_W // 2
    y0, y1 = BEAM_Y[row] + BEAM_H // 2, BEAM_Y[row + 1] - BEAM_H // 2
    return x0, y0, x1, y1


def workpiece_box(slot: str) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` of the disc drawn in ``slot`` (unjittered, at its nominal place)."""
    x0, _, x1, y1 = slot_box(slot)
    cx = (x0 + x1) // 2
    bottom = y1 - 1
    top = bottom - DISC_H - DISC_TOP_H // 2
    return cx - DISC_W // 2, top - DISC_TOP_H // 2, cx + DISC_W // 2, bottom + DISC_TOP_H // 2 - 2


@functools.lru_cache(maxsize=1)
def _scene() -> np.ndarray:
    """The empty room and rack (the same in every picture: drawn once, copied per frame)."""
    img = _background()
    _rack(img)
    img.flags.writeable = False
    return img


@functools.lru_cache(maxsize=1)
def _vignette() -> np.ndarray:
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    r2 = ((xx - WIDTH / 2) / (WIDTH / 2)) ** 2 + ((yy - HEIGHT / 2) / (HEIGHT / 2)) ** 2
    mask = (1.0 - 0.18 * r2)[..., None]
    mask.flags.writeable = False
    return mask


def _background() -> np.ndarray:
    import cv2

    img = np.empty((HEIGHT, WIDTH, 3), np.float32)
    horizon = 150
    # a bright window (slightly blue-green daylight) fading towards the horizon
    t = np.linspace(0.0, 1.0, horizon, dtype=np.float32)[:, None]
    sky = np.array([236, 238, 228], np.float32) * (1 - 0.18 * t[..., None])
    img[:horizon] = sky
    # wooden floor / table, darker towards the camera
    t = np.linspace(0.0, 1.0, HEIGHT - horizon, dtype=np.float32)[:, None]
    floor = np.array([150, 190, 215], np.float32) * (1 - 0.45 * t[..., None])
    img[horizon:] = floor
    # window frames and a dark cabinet on the left, as in the real room
    for x in (8, 178, 250):
        cv2.rectangle(img, (x, 0), (x + 7, horizon), (40, 40, 38), -1)
    cv2.rectangle(img, (0, 0), (30, HEIGHT), (48, 44, 46), -1)
    # a perforated black base plate under the rack
    cv2.rectangle(img, (30, 218), (WIDTH, HEIGHT), (42, 40, 40), -1)
    for y in range(224, HEIGHT, 8):
        for x in range(36, WIDTH, 10):
            cv2.circle(img, (x, y), 1, (70, 70, 70), -1)
    # a little fixed texture so flat areas are not perfectly flat
    texture = np.random.default_rng(12345).normal(0.0, 3.0, (HEIGHT // 8, WIDTH // 8, 1)).astype(np.float32)
    img += cv2.resize(texture, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)[..., None]
    return img


def _rack(img: np.ndarray) -> None:
    import cv2

    # the inside of the rack is in the shade of the structure
    x0, x1 = POST_X[0], POST_X[-1]
    y0, y1 = BEAM_Y[0], BEAM_Y[-1]
    shade = img[y0:y1, x0:x1]
    shade *= 0.62
    # shelves: a thin dark plate at the bottom of every slot
    for slot in SLOTS:
        sx0, _, sx1, sy1 = slot_box(slot)
        cv2.rectangle(img, (sx0, sy1 - 3), (sx1, sy1), (60, 58, 58), -1)
    # posts and beams
    for x in POST_X:
        cv2.rectangle(img, (x - POST_W // 2, BEAM_Y[0] - BEAM_H), (x + POST_W // 2, HEIGHT - 18), RACK_BGR, -1)
        for y in range(BEAM_Y[0], HEIGHT - 22, 9):  # the holes of the building blocks
            cv2.rectangle(img, (x - 2, y), (x + 1, y + 3), (12, 12, 12), -1)
    for y in BEAM_Y:
        cv2.rectangle(img, (POST_X[0] - POST_W // 2, y - BEAM_H // 2), (POST_X[-1] + POST_W // 2, y + BEAM_H // 2),
                      RACK_BGR, -1)
        for x in range(POST_X[0], POST_X[-1], 12):
            cv2.circle(img, (x, y), 1, (90, 90, 90), -1)
    # orange-red connectors at the joints and shelf brackets beside each slot
    for x in POST_X:
        for y in BEAM_Y:
            cv2.rectangle(img, (x - 4, y - 4), (x + 4, y + 4), CONNECTOR_BGR, -1)
    for slot in SLOTS:
        sx0, sy0, sx1, sy1 = slot_box(slot)
        cv2.rectangle(img, (sx0, sy1 - 9), (sx0 + 6, sy1), CONNECTOR_BGR, -1)
        cv2.rectangle(img, (sx1 - 6, sy1 - 9), (sx1, sy1), CONNECTOR_BGR, -1)


def _disc(img: np.ndarray, slot: str, kind: str, dx: float, dy: float) -> None:
    """A flat cylinder seen slightly from above: shaded side, lighter top ellipse, a highlight."""
    import cv2

    x0, _, x1, y1 = slot_box(slot)
    cx = (x0 + x1) / 2 + dx
    bottom = y1 - 1 + dy
    top = bottom - DISC_H
    color = np.array(WORKPIECE_BGR[kind], np.float32)
    side = tuple(float(c) for c in color * 0.78)
    rim = tuple(float(c) for c in color * 0.62)
    topc = tuple(float(min(255.0, c * 1.06 + 6)) for c in color)
    hi = tuple(float(min(255.0, c * 0.5 + 125)) for c in color)
    s = 16  # sub-pixel precision for the anti-aliased drawing
    p = lambda v: int(round(v * s))  # noqa: E731
    axes = (p(DISC_W / 2), p(DISC_TOP_H / 2))
    cv2.ellipse(img, (p(cx), p(bottom)), axes, 0, 0, 180, rim, -1, cv2.LINE_AA, 4)
    cv2.rectangle(img, (p(cx - DISC_W / 2), p(top)), (p(cx + DISC_W / 2), p(bottom)), side, -1, cv2.LINE_AA, 4)
    cv2.ellipse(img, (p(cx), p(top)), axes, 0, 0, 360, topc, -1, cv2.LINE_AA, 4)
    cv2.ellipse(img, (p(cx - DISC_W / 6), p(top - 1)), (p(DISC_W / 6), p(2)), 0, 0, 360, hi, -1, cv2.LINE_AA, 4)


def render_warehouse(stock: dict[str, str | None], *, rng: np.random.Generator, lighting: float = 1.0,
                     jitter: bool = True, pose: CameraPose | None = None) -> np.ndarray:
    """The warehouse camera's picture of ``stock`` (slot -> ``"BLUE"|"RED"|"WHITE"|None``): BGR uint8 240x320x3.

    ``lighting`` scales the exposure (1.0 = a normally lit room, 0.5 = dim). With
    ``jitter`` each frame also gets a random lighting level (+-10 %), a colour cast,
    a shift of up to 3 px and a rotation of up to 1 degree; without it the geometry
    is exact and the light is exactly ``lighting`` (sensor noise is always added).
    ``pose`` (default: the reference camera) moves, zooms and turns the whole picture;
    the random draws are the same whatever the pose.
    """
    import cv2

    unknown = {k: v for k, v in stock.items() if k not in SLOTS or (v is not None and v not in TYPES)}
    if unknown:
        raise ValueError(f"unknown slots or workpiece types: {unknown}")
    img = _scene().copy()
    for slot in SLOTS:
        kind = stock.get(slot)
        if kind:
            dx, dy = (rng.uniform(-3, 3), rng.uniform(-1, 0.5)) if jitter else (0.0, 0.0)
            _disc(img, slot, kind, dx, dy)

    level = lighting * (rng.uniform(0.9, 1.1) if jitter else 1.0)
    cast = rng.normal(1.0, 0.04, 3).clip(0.88, 1.12).astype(np.float32) if jitter else np.ones(3, np.float32)
    img *= level * cast
    # vignetting, as with the cheap wide-angle camera
    img *= _vignette()

    pose = pose or CameraPose()
    if jitter or not pose.is_reference:
        angle, shift = (rng.uniform(-1.0, 1.0), rng.uniform(-3.0, 3.0, 2)) if jitter else (0.0, (0.0, 0.0))
        m = pose.matrix(angle, (float(shift[0]), float(shift[1])))
        img = cv2.warpAffine(img, m, (WIDTH, HEIGHT), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    # slight blur of the lens, then sensor noise (stronger in the dark)
    img = cv2.GaussianBlur(img, (3, 3), 0.6)
    sigma = 3.0 + 3.0 * max(0.0, 1.0 - level)
    img += rng.normal(0.0, sigma, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode_jpeg(img: np.ndarray, quality: int = 85) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()
