"""Cheap, lighting-tolerant features for the stock model.

Pipeline for one BGR frame (any size, designed for 320x240):

1. shrink to ``WORK_SIZE`` (160x120) with area averaging;
2. lighting normalisation (``FeatureConfig.normalise``):

   * ``"gray-world"`` (the first models): every channel scaled so its mean is
     ``GRAY_TARGET`` (removes the colour cast and most of an exposure *gain*);
   * ``"affine"``: every channel shifted so its mean is ``GRAY_TARGET`` and the
     image scaled so its (channel-averaged) standard deviation is ``AFFINE_STD``:
     undoes a brightness *offset* and a contrast change exactly (up to clipping),
     which gray-world scaling does not; optionally after a Gaussian blur of
     ``FeatureConfig.blur`` px (sensor noise and JPEG block artefacts fall below
     the evidence thresholds instead of crossing them);
3. three *evidence maps* in CIE Lab, one per class (``CLASSES`` order):

   * blue  - strongly negative b* on a reasonably bright pixel (the blue disc is
     light blue; the rack's black beams are bluish but dark);
   * red   - a* minus the yellow part of b*: the red disc is crimson, while the
     rack's many plastic parts are orange-red (high a*, high b*);
   * white - high L* with low chroma;

4. alignment: the camera is fixed but moves a little between sessions, so the
   frame's gradient-magnitude image is registered (translation, by phase
   correlation) to a reference learned from the training images, and the
   evidence maps are shifted into the reference frame;
5. pooling into ``cell`` x ``cell`` cells, a 3x3 max filter over cells (tolerates
   a few pixels of residual shift / rotation), and per-image standardisation of
   each map (removes what is left of the lighting level).

The result is ``(3, n_cells)``: one spatial evidence vector per class. Where on
the rack each class is stored is *learned* (see ``model.py``), nothing about the
rack is hard-coded here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

WORK_SIZE = (160, 120)  # (width, height) the features are computed at
GRAY_TARGET = 110.0
AFFINE_STD = 70.0  # typical per-channel spread of the gray-world-normalised training photos
NORMALISATIONS = ("gray-world", "affine")


@dataclass(frozen=True)
class FeatureConfig:
    cell: int = 4  # pooling cell, in pixels of the 160x120 work image
    pool: int = 3  # max filter over cells (odd); 1 disables it
    pools: tuple[int, ...] | None = None  # per-class override of ``pool`` (CLASSES order)
    blue_b: float = 10.0  # blue evidence starts at b* < -blue_b
    blue_l: float = 45.0  # ... on pixels with L* above this
    red_a: float = 4.0  # red evidence: a* - red_yellow * max(b*, 0) above this
    red_yellow: float = 1.3  # how much yellow (orange rack parts) counts against red
    white_l: float = 65.0  # white evidence: L* above this ...
    white_chroma: float = 15.0  # ... fading out as chroma grows by this much
    align: bool = True
    normalise: str = "gray-world"  # see the module docstring; the default is the first models' one
    blur: float = 0.0  # Gaussian sigma (work-image px) before the evidence maps; 0 disables it

    def __post_init__(self):
        if self.normalise not in NORMALISATIONS:
            raise ValueError(f"normalise must be one of {NORMALISATIONS}, not {self.normalise!r}")

    @property
    def is_v1(self) -> bool:
        """True when the features are the first models' (artifact format 1 can describe them)."""
        return self.normalise == "gray-world" and not self.blur

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if known.get("pools") is not None:
            known["pools"] = tuple(int(p) for p in known["pools"])
        return cls(**known)

    def class_pool(self, c: int) -> int:
        return int(self.pools[c]) if self.pools else int(self.pool)

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the pooled grid."""
        return WORK_SIZE[1] // self.cell, WORK_SIZE[0] // self.cell


def shrink(img: np.ndarray) -> np.ndarray:
    import cv2

    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    if (img.shape[1], img.shape[0]) == WORK_SIZE:
        return img
    return cv2.resize(img, WORK_SIZE, interpolation=cv2.INTER_AREA)


def gradient_image(small: np.ndarray) -> np.ndarray:
    """Mean-normalised gradient magnitude: the structure used for alignment
    (insensitive to brightness and colour cast)."""
    import cv2

    g = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY).astype(np.float32)
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1)
    m = cv2.magnitude(gx, gy)
    return m / (float(m.mean()) + 1e-6)


def evidence_maps(small: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """(H, W, 3) float32 maps in [0, 1], class order blue, red, white."""
    import cv2

    f = small.astype(np.float32)
    if cfg.blur:
        f = cv2.GaussianBlur(f, (0, 0), float(cfg.blur))
    mu = f.reshape(-1, 3).mean(axis=0)
    if cfg.normalise == "affine":
        sd = float(f.reshape(-1, 3).std(axis=0).mean())
        f = np.clip((f - mu) * np.float32(AFFINE_STD / (sd + 1e-3)) + np.float32(GRAY_TARGET), 0.0, 255.0) * (1.0 / 255.0)
    else:
        f = np.clip(f * (GRAY_TARGET / (mu + 1e-3)), 0.0, 255.0) * (1.0 / 255.0)
    lab = cv2.cvtColor(f, cv2.COLOR_BGR2Lab)  # float: L 0..100, a/b about -127..127
    L, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    chroma = np.sqrt(a * a + b * b)
    blue = np.clip((-b - cfg.blue_b) / 15.0, 0, 1) * np.clip((L - cfg.blue_l) / 20.0, 0, 1)
    red = np.clip((a - cfg.red_yellow * np.maximum(b, 0) - cfg.red_a) / 15.0, 0, 1) * np.clip((L - 30.0) / 20.0, 0, 1)
    white = np.clip((L - cfg.white_l) / 20.0, 0, 1) * np.clip(1.0 - (chroma - 5.0) / cfg.white_chroma, 0, 1)
    return np.stack([blue, red, white], axis=-1).astype(np.float32)


_HANN: dict[tuple[int, int], np.ndarray] = {}


def _hann() -> np.ndarray:
    import cv2

    if WORK_SIZE not in _HANN:
        _HANN[WORK_SIZE] = cv2.createHanningWindow(WORK_SIZE, cv2.CV_32F)
    return _HANN[WORK_SIZE]


def estimate_shift(reference: np.ndarray, grad: np.ndarray) -> tuple[float, float]:
    """Translation (dx, dy) of ``grad`` relative to ``reference``, work-image pixels.
    Shifts beyond a quarter of the frame are implausible for a fixed camera and
    are treated as a failed registration (no shift)."""
    import cv2

    # Copies: cv2.phaseCorrelate (OpenCV 5.0) multiplies the window into its
    # inputs in place, which would slowly erase the model's reference.
    (dx, dy), _response = cv2.phaseCorrelate(reference.copy(), grad.copy(), _hann())
    if abs(dx) > WORK_SIZE[0] / 4 or abs(dy) > WORK_SIZE[1] / 4:
        return 0.0, 0.0
    # Quantised to 1/64 px: OpenCV's DFT differs in the last bits with its
    # threading state, and features must be bit-for-bit reproducible.
    return round(dx * 64) / 64, round(dy * 64) / 64


def build_reference(images: list[np.ndarray]) -> np.ndarray:
    """Mean gradient image of the training frames, each first registered to the
    first frame, so sessions with a moved camera still average into one view."""
    if not images:
        raise ValueError("no images to build the alignment reference from")
    import cv2

    grads = [gradient_image(shrink(im)) for im in images]
    anchor = grads[0]
    acc = np.zeros_like(anchor)
    for g in grads:
        dx, dy = estimate_shift(anchor, g)
        m = np.float32([[1, 0, -dx], [0, 1, -dy]])
        acc += cv2.warpAffine(g, m, WORK_SIZE, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return (acc / len(grads)).astype(np.float32)


def pooled_evidence(img: np.ndarray, reference: np.ndarray | None, cfgs: list[FeatureConfig],
                    extra_shift: tuple[float, float] = (0.0, 0.0)) -> list[np.ndarray]:
    """Aligned evidence maps averaged into cells, ``(rows, cols, 3)`` float32, one per
    config (the configs share the frame, its alignment and the cell size of ``cfgs[0]``)."""
    import cv2

    small = shrink(img)
    cfg0 = cfgs[0]
    dx, dy = (0.0, 0.0)
    if cfg0.align and reference is not None:
        dx, dy = estimate_shift(reference, gradient_image(small))
    dx -= extra_shift[0]
    dy -= extra_shift[1]
    rows, cols = cfg0.grid
    out = []
    for cfg in cfgs:
        maps = evidence_maps(small, cfg)
        if dx or dy:
            m = np.float32([[1, 0, -dx], [0, 1, -dy]])
            maps = cv2.warpAffine(maps, m, WORK_SIZE, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        out.append(cv2.resize(maps, (cols, rows), interpolation=cv2.INTER_AREA))
    return out


_KERNELS: dict[int, np.ndarray] = {}


def finish(pooled: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Cell maps ``(rows, cols, 3)`` -> features ``(3, n_cells)``: per class a max filter
    over ``class_pool(c)`` cells, then per-image standardisation of each map."""
    import cv2

    pools = [cfg.class_pool(c) for c in range(pooled.shape[2])]
    if all(p == pools[0] for p in pools):
        if pools[0] > 1:
            k = _KERNELS.setdefault(pools[0], np.ones((pools[0], pools[0]), np.uint8))
            pooled = cv2.dilate(pooled, k)
        v = pooled.reshape(-1, pooled.shape[2]).T
    else:
        chans = []
        for c, p in enumerate(pools):
            ch = np.ascontiguousarray(pooled[..., c])
            if p > 1:
                ch = cv2.dilate(ch, _KERNELS.setdefault(p, np.ones((p, p), np.uint8)))
            chans.append(ch.ravel())
        v = np.stack(chans)
    v = v.astype(np.float32)
    return (v - v.mean(axis=1, keepdims=True)) / (v.std(axis=1, keepdims=True) + 0.02)


def extract(img: np.ndarray, reference: np.ndarray | None, cfg: FeatureConfig,
            extra_shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Features of one BGR frame: ``(3, n_cells)`` float32."""
    return finish(pooled_evidence(img, reference, [cfg], extra_shift)[0], cfg)


def augment(img: np.ndarray, rng: np.random.Generator, perspective: float = 0.03,
            degrade: bool = False) -> np.ndarray:
    """A plausible other session: the camera moved a little (shift, rotation, zoom
    and a perspective change - each corner moves by up to ``perspective`` of the
    frame size), exposure, contrast and white-balance change, sensor noise.

    ``degrade`` then applies, on top, the photometric part of the robustness target
    (``vision.perturb``) at a little more than its ranges: contrast x0.7-1.3 about the
    mean, brightness offset +-30, sensor noise sigma 0-6 and a JPEG round trip at
    quality 30-90 (the presence model's training; without it the draws, and so the
    copies, are those of the first models)."""
    import cv2

    from factory_assets.vision.perturb import photometric, random_similarity

    h, w = img.shape[:2]
    m = random_similarity(rng, w, h, max_angle=3.0, max_zoom=0.05)
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = src @ m[:, :2].T.astype(np.float32) + m[:, 2].astype(np.float32)
    dst += (rng.uniform(-perspective, perspective, (4, 2)) * (w, h)).astype(np.float32)
    p = cv2.getPerspectiveTransform(src, dst.astype(np.float32))
    out = cv2.warpPerspective(img, p, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    out = out.astype(np.float32) * (1.0 / 255.0)
    out = np.power(out, np.float32(np.exp(rng.uniform(-0.4, 0.4))))  # gamma / tone curve
    out = out * (255.0 * rng.uniform(0.5, 1.5) * rng.uniform(0.9, 1.1, 3)).astype(np.float32)
    mean = float(out.mean())
    out = (out - mean) * rng.uniform(0.75, 1.25) + mean
    out += rng.normal(0.0, 2.0, out.shape).astype(np.float32)
    out = np.clip(out, 0, 255).astype(np.uint8)
    return photometric(out, rng, min_quality=30) if degrade else out
