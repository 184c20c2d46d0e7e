"""Perturbed copies of a frame, as in the robustness target of the issue: camera shift up
to 8 px, rotation up to 2.5 degrees, scale +-4 %, contrast x0.7-1.3, brightness +-30,
sensor noise and JPEG quality 40-90. Used to *measure* robustness (``benchmarks/train_eval.py``)
on perturbed copies of held-out train scenes (model selection) and of the validation photos
(the final report); never to pick anything on the validation split."""
from __future__ import annotations

import numpy as np


def perturb(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random perturbed copy of a BGR frame (same size), JPEG round trip included."""
    import cv2

    h, w = img.shape[:2]
    m = random_similarity(rng, w, h, max_angle=2.5, max_zoom=0.04)
    x = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return photometric(x, rng)


def random_similarity(rng: np.random.Generator, w: int, h: int, *, max_angle: float, max_zoom: float,
                      max_shift: float = 8.0) -> np.ndarray:
    """A camera that moved a little: the 2x3 map of a rotation within +-``max_angle`` degrees
    and a zoom within +-``max_zoom`` about the centre, then a shift within +-``max_shift`` px
    (of a 320 px wide frame, scaled to ``w``). Draws angle, zoom, then the shift."""
    import cv2

    angle = rng.uniform(-max_angle, max_angle)
    scale = rng.uniform(1.0 - max_zoom, 1.0 + max_zoom)
    shift = rng.uniform(-max_shift, max_shift, 2) * (w / 320.0)
    m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, scale)
    m[:, 2] += shift
    return m


def photometric(img: np.ndarray, rng: np.random.Generator, min_quality: int = 40) -> np.ndarray:
    """The photometric part of the target: contrast x0.7-1.3 about the mean, brightness
    +-30, sensor noise sigma 0-6, then a JPEG round trip at quality ``min_quality``-90.
    ``features.augment(degrade=True)`` trains on the same draws (with ``min_quality`` 30)."""
    import cv2

    x = img.astype(np.float32)
    mean = float(x.mean())
    x = (x - mean) * rng.uniform(0.7, 1.3) + mean + rng.uniform(-30.0, 30.0)
    x += rng.normal(0.0, rng.uniform(0.0, 6.0), x.shape).astype(np.float32)
    x = np.clip(x, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", x, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(min_quality, 91))])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR) if ok else x


def perturbed_copies(images: list[np.ndarray], n: int, seed: int = 0) -> list[list[np.ndarray]]:
    """``n`` perturbed copies of each image (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    return [[perturb(img, rng) for _ in range(n)] for img in images]
