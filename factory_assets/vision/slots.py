"""The per-slot stock model: each of the nine rack slots (A1..C3) as empty / blue / red / white.

Where labels carry the controller's per-slot stock, every frame teaches nine
examples, and a mix of colours never seen as a whole is still recognised slot
by slot. Colour presence is derived from the slots (``p_colour = max over slots
of P(slot holds colour)``), so every consumer of the presence model keeps working.

Pipeline for one BGR frame:

1. the colour-evidence maps of ``features.evidence_maps`` (gray-world
   normalised Lab, one map per colour) at 160x120, aligned to the model's
   reference view by phase correlation of gradient images (``features``);
2. slot geometry, *learned from labelled frames* (``SlotGeometry.fit``): per slot,
   the evidence difference between frames where it is occupied and frames where it
   is empty peaks where its workpiece lies; an affine 3x3 lattice
   (``centre(row, col) = origin + col * u + row * v``) is fitted robustly to those
   peaks, so slots never seen occupied still get a place, and a moved camera is
   re-calibrated by retraining on a few labelled frames (no pixel box is written in code);
3. per slot, a box around its centre (0.45 of the lattice spacing each way, so a
   few pixels of residual shift keep the workpiece inside): a coarse 4x3 patch of
   each colour map plus its mean, 90th percentile and fraction above 0.5;
4. two parts, both shared by all nine slots (the slot's position is not a feature)
   and both colour-agnostic, so a colour never stored during training (the
   simulated factory may take minutes to store its first red piece) is still
   recognised from its evidence map:

   * occupancy: a logistic regression on the statistics of the slot's strongest and
     second-strongest colour map (whichever colours they are);
   * colour: ``softmax(beta * mean_evidence_k / scale_k)`` over the three maps, with
     ``scale_k`` the typical evidence of a colour-k piece (learned when colour k was
     seen, else the mean of the seen colours) and ``beta`` by maximum likelihood;

   ``P(empty) = 1 - p_occupied``, ``P(colour k) = p_occupied * P(k | occupied)``.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from factory_assets.vocabulary import CLASSES, SLOT_STATES, SLOTS, STATE_TO_TYPE
from factory_assets.vision.model import _json_array, _npy_bytes, pack_artifact
from factory_assets.vision.features import WORK_SIZE, FeatureConfig, estimate_shift, evidence_maps, gradient_image, shrink

logger = logging.getLogger(__name__)

SLOT_FORMAT = "factory-assets-slot-model/1"
PATCH = (4, 3)  # (cols, rows) of the coarse patch per slot and colour
BOX_FRACTION = 0.45  # half box = this fraction of the lattice spacing
N_FEATURES = PATCH[0] * PATCH[1] * 3 + 9


class GeometryError(ValueError):
    """The labelled frames do not say where the slots are (too few slots ever changed)."""


def slot_grid(slot: str) -> tuple[int, int]:
    """``'B3'`` -> (row 1, col 2)."""
    return "ABC".index(slot[0]), "123".index(slot[1])


def aligned_maps(img: np.ndarray, reference: np.ndarray | None, cfg: FeatureConfig,
                 extra_shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Colour-evidence maps ``(120, 160, 3)`` in the reference view."""
    import cv2

    small = shrink(img)
    dx, dy = 0.0, 0.0
    if cfg.align and reference is not None:
        dx, dy = estimate_shift(reference, gradient_image(small))
    dx -= extra_shift[0]
    dy -= extra_shift[1]
    maps = evidence_maps(small, cfg)
    if dx or dy:
        m = np.float32([[1, 0, -dx], [0, 1, -dy]])
        maps = cv2.warpAffine(maps, m, WORK_SIZE, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return maps


@dataclass(frozen=True)
class SlotGeometry:
    """Where the slots are in the reference view (work-image pixels, 160x120)."""

    origin: tuple[float, float]  # centre of A1
    u: tuple[float, float]  # one column to the right
    v: tuple[float, float]  # one row down
    source: str = "learned"  # learned (slots seen changing) | colours (reported colours) | calibrated

    def centre(self, slot: str) -> tuple[float, float]:
        r, c = slot_grid(slot)
        return (self.origin[0] + c * self.u[0] + r * self.v[0], self.origin[1] + c * self.u[1] + r * self.v[1])

    @property
    def half_box(self) -> tuple[float, float]:
        return (max(3.0, BOX_FRACTION * float(np.hypot(*self.u))), max(3.0, BOX_FRACTION * float(np.hypot(*self.v))))

    def to_dict(self) -> dict:
        return {"origin": [round(float(x), 3) for x in self.origin], "u": [round(float(x), 3) for x in self.u],
                "v": [round(float(x), 3) for x in self.v], "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> "SlotGeometry":
        return cls(tuple(d["origin"]), tuple(d["u"]), tuple(d["v"]), d.get("source", "learned"))

    def in_image(self, width: int = 320, height: int = 240) -> dict:
        """Slot centres in pixels of a ``width`` x ``height`` frame of the reference view."""
        sx, sy = width / WORK_SIZE[0], height / WORK_SIZE[1]
        return {s: (round(self.centre(s)[0] * sx, 1), round(self.centre(s)[1] * sy, 1)) for s in SLOTS}

    @classmethod
    def fit(cls, maps: np.ndarray, states: np.ndarray, tolerance: float = 4.0) -> "SlotGeometry":
        """Learn the lattice from aligned evidence maps ``(n, 120, 160, 3)`` and slot states ``(n, 9)``."""
        import cv2

        evidence = maps.sum(axis=-1)
        peaks = []  # (row, col, x, y, weight, difference map)
        for s, slot in enumerate(SLOTS):
            occ = states[:, s] > 0
            if occ.all() or not occ.any():
                continue
            diff = evidence[occ].mean(axis=0) - evidence[~occ].mean(axis=0)
            diff = cv2.GaussianBlur(diff.astype(np.float32), (0, 0), 1.5)
            y, x = np.unravel_index(int(np.argmax(diff)), diff.shape)
            if diff[y, x] < 0.05:
                continue
            r, c = slot_grid(slot)
            peaks.append((r, c, float(x), float(y), float(diff[y, x]), diff))
        if not _two_rows_and_columns((p[0], p[1]) for p in peaks):
            # the slots seen changing do not span two rows and two columns (yet): place the rack
            # from where each reported colour shows in the frames of each situation instead
            try:
                return _colour_lattice(maps, states, tolerance)
            except GeometryError as exc:
                raise GeometryError(f"only {len(peaks)} slot(s) were seen both empty and occupied (need "
                                    f"two rows and two columns), and {exc}") from None
        geom = _robust_lattice(peaks, tolerance)
        # refine each peak to the evidence-weighted centroid near its lattice place, then refit
        hx, hy = geom.half_box
        refined = []
        for r, c, _x, _y, w, diff in peaks:
            cx, cy = geom.centre(SLOTS[r * 3 + c])
            x0, x1 = int(max(0, np.floor(cx - hx))), int(min(WORK_SIZE[0], np.ceil(cx + hx) + 1))
            y0, y1 = int(max(0, np.floor(cy - hy))), int(min(WORK_SIZE[1], np.ceil(cy + hy) + 1))
            win = diff[y0:y1, x0:x1]
            if win.size == 0 or win.max() <= 0:
                continue
            wts = np.where(win > 0.5 * win.max(), win, 0.0)
            yy, xx = np.mgrid[y0:y1, x0:x1]
            refined.append((r, c, float((wts * xx).sum() / wts.sum()), float((wts * yy).sum() / wts.sum()), w, diff))
        if len(refined) >= 2:
            try:
                geom = _robust_lattice(refined, tolerance)
            except GeometryError:
                pass
        return geom


COLOUR_BLOB_MIN_PX, COLOUR_BLOB_MAX_PX = 6, 600  # a workpiece's blob in the 160x120 work image
COLOUR_BLOB_EXTRA = 3  # blobs of a colour considered beyond the number of slots reported holding it


def _two_rows_and_columns(cells) -> bool:
    """``(row, col)`` pairs in at least two rows and two columns: enough to place the lattice."""
    rows, cols = set(), set()
    for r, c in cells:
        rows.add(r)
        cols.add(c)
    return len(rows) >= 2 and len(cols) >= 2


def _colour_blobs(mean_maps: np.ndarray, k: int, n: int) -> list[tuple[float, float, float]]:
    """Where colour ``k`` stands out in a situation's mean evidence maps: the ``n`` heaviest
    workpiece-sized blobs of (colour k's evidence - the strongest other colour's), as
    evidence-weighted centroids ``(x, y, weight)``."""
    import cv2

    others = [j for j in range(mean_maps.shape[-1]) if j != k]
    contrast = mean_maps[..., k] - mean_maps[..., others].max(axis=-1)
    contrast = cv2.GaussianBlur(contrast.astype(np.float32), (0, 0), 1.5)
    count, labels = cv2.connectedComponents((contrast > 0.5).astype(np.uint8))
    blobs = []
    for j in range(1, count):
        ys, xs = np.nonzero(labels == j)
        if not COLOUR_BLOB_MIN_PX <= len(ys) <= COLOUR_BLOB_MAX_PX:  # noise, or the rack's own white
            continue
        w = contrast[ys, xs]
        blobs.append((float((w * xs).sum() / w.sum()), float((w * ys).sum() / w.sum()), float(w.sum())))
    return sorted(blobs, key=lambda b: -b[2])[:n]


def _colour_lattice(maps: np.ndarray, states: np.ndarray, tolerance: float) -> SlotGeometry:
    """The lattice from the colours the controller reported, before enough slots changed: in each
    stock situation (frames with the same slot states), a slot reported holding colour k should
    sit on a blob of colour k. RANSAC over triples of (slot, blob of its colour) in three slots
    not all in one row or column; the lattice placing the most occupied slots on a blob of their
    colour wins (ties: the least skewed, as a camera facing the rack sees it, then the heaviest
    blobs); least squares on those. Tested against the lattice learned from changes: within
    2.5 px on the simulated factory's first 40 s for ten stocks and the extreme camera poses."""
    from itertools import combinations

    situations: dict = {}  # slot states -> the frames showing them
    for i, row in enumerate(states):
        situations.setdefault(tuple(int(v) for v in row), []).append(i)
    frames_of = [len(idx) for idx in situations.values()]
    observed = []  # (situation, row, col, blobs of the slot's reported colour in its situation)
    for n, (key, idx) in enumerate(situations.items()):
        mean = maps[idx].mean(axis=0)
        for k in range(len(CLASSES)):
            held = [s for s, v in enumerate(key) if v == k + 1]
            if held:
                blobs = _colour_blobs(mean, k, len(held) + COLOUR_BLOB_EXTRA)
                observed.extend((n, *slot_grid(SLOTS[s]), blobs) for s in held)
    if not _two_rows_and_columns((o[1], o[2]) for o in observed):
        raise GeometryError("the slots reported occupied do not span two rows and two columns")

    def spread(n):  # rows x columns its occupied slots span, then its frames
        rows, cols = {o[1] for o in observed if o[0] == n}, {o[2] for o in observed if o[0] == n}
        return min(len(rows), 2) * min(len(cols), 2), len(rows) * len(cols), frames_of[n]

    # lattices are proposed from one situation (bounded work), judged on all of them
    chosen = max({o[0] for o in observed}, key=spread)
    candidates = [(r, c, x, y, w) for n, r, c, blobs in observed if n == chosen for x, y, w in blobs]
    best, best_key = None, None
    for sub in combinations(candidates, 3):
        if len({(p[0], p[1]) for p in sub}) < 3:
            continue
        g = _lstsq_lattice(list(sub))
        if g is None or not _plausible(g):
            continue
        inliers = []
        for _, r, c, blobs in observed:
            cx, cy = g.centre(SLOTS[r * 3 + c])
            near = min(((float(np.hypot(x - cx, y - cy)), x, y, w) for x, y, w in blobs), default=None)
            if near is not None and near[0] <= tolerance:
                inliers.append((r, c, near[1], near[2], near[3]))
        skew = abs(float(np.dot(g.u, g.v))) / (float(np.hypot(*g.u)) * float(np.hypot(*g.v)))
        key = (len(inliers), -round(skew, 2), sum(p[4] for p in inliers))
        if best_key is None or key > best_key:
            best, best_key = inliers, key
    if not best or not _two_rows_and_columns((p[0], p[1]) for p in best):
        raise GeometryError("the reported colours were not found in two rows and two columns of the frames")
    g = _lstsq_lattice(best)
    if g is None or not _plausible(g):
        raise GeometryError("the reported colours do not lie on a plausible lattice")
    return SlotGeometry(g.origin, g.u, g.v, source="colours")


def _lstsq_lattice(pts: list) -> SlotGeometry | None:
    a = np.array([[1.0, c, r] for r, c, *_ in pts])
    w = np.sqrt(np.array([p[4] for p in pts]))
    xs = np.array([p[2] for p in pts])
    ys = np.array([p[3] for p in pts])
    if np.linalg.matrix_rank(a) == 3:
        px = np.linalg.lstsq(a * w[:, None], xs * w, rcond=None)[0]
        py = np.linalg.lstsq(a * w[:, None], ys * w, rcond=None)[0]
        return SlotGeometry((px[0], py[0]), (px[1], py[1]), (px[2], py[2]))
    rows = {p[0] for p in pts}
    cols = {p[1] for p in pts}
    if len(rows) < 2 or len(cols) < 2:
        return None
    # only two distinct points (or collinear ones): an axis-aligned lattice
    ax = np.array([[1.0, c] for r, c, *_ in pts])
    ay = np.array([[1.0, r] for r, c, *_ in pts])
    px = np.linalg.lstsq(ax * w[:, None], xs * w, rcond=None)[0]
    py = np.linalg.lstsq(ay * w[:, None], ys * w, rcond=None)[0]
    return SlotGeometry((px[0], py[0]), (px[1], 0.0), (0.0, py[1]))


def _plausible(g: SlotGeometry) -> bool:
    # columns run left to right, rows top to bottom, spacing at least 4 px
    return g.u[0] > 4 and g.v[1] > 4 and abs(g.u[1]) < 0.5 * g.u[0] and abs(g.v[0]) < 0.5 * g.v[1]


def _robust_lattice(pts: list, tolerance: float) -> SlotGeometry:
    """RANSAC over triples (or pairs) of slot peaks, then least squares on the inliers:
    a slot whose difference map peaked on a correlated neighbour is an outlier."""
    from itertools import combinations

    best, best_key = None, None
    k = 3 if len(pts) >= 3 else 2
    for sub in combinations(range(len(pts)), k):
        g = _lstsq_lattice([pts[i] for i in sub])
        if g is None or not _plausible(g):
            continue
        inl = [p for p in pts if np.hypot(*(np.subtract(g.centre(SLOTS[p[0] * 3 + p[1]]), p[2:4]))) <= tolerance]
        key = (len(inl), sum(p[4] for p in inl))
        if best_key is None or key > best_key:
            best, best_key = inl, key
    if best is None:  # only collinear triples: try pairs in different rows and columns
        return _robust_pairs(pts, tolerance)
    g = _lstsq_lattice(best) if best and len(best) >= 2 else None
    if g is None or not _plausible(g):
        raise GeometryError("the slots seen changing do not span two rows and two columns")
    return g


def _robust_pairs(pts: list, tolerance: float) -> SlotGeometry:
    from itertools import combinations

    for a, b in combinations(pts, 2):
        g = _lstsq_lattice([a, b])
        if g is not None and _plausible(g):
            return g
    raise GeometryError("the slots seen changing do not span two rows and two columns")


def slot_features(maps: np.ndarray, geometry: SlotGeometry) -> np.ndarray:
    """Aligned maps ``(120, 160, 3)`` -> ``(9, N_FEATURES)`` float32."""
    import cv2

    hx, hy = geometry.half_box
    size = (int(round(2 * hx)) | 1, int(round(2 * hy)) | 1)
    out = np.empty((len(SLOTS), N_FEATURES), np.float32)
    m = np.ascontiguousarray(maps, dtype=np.float32)
    for i, slot in enumerate(SLOTS):
        crop = cv2.getRectSubPix(m, size, geometry.centre(slot))
        patch = cv2.resize(crop, PATCH, interpolation=cv2.INTER_AREA)
        flat = crop.reshape(-1, 3)
        q90 = np.partition(flat, int(0.9 * (len(flat) - 1)), axis=0)[int(0.9 * (len(flat) - 1))]
        out[i] = np.concatenate([patch.transpose(2, 0, 1).ravel(), flat.mean(axis=0), q90, (flat > 0.5).mean(axis=0)])
    return out


_PATCH_N = PATCH[0] * PATCH[1]
N_OCC_FEATURES = 6 + _PATCH_N
BETAS = (5.0, 10.0, 20.0, 40.0)


def occupancy_features(feats: np.ndarray) -> np.ndarray:
    """``(..., N_FEATURES)`` -> ``(..., N_OCC_FEATURES)``: mean, 90th percentile and fraction
    above 0.5 of the strongest and second-strongest colour map, and the strongest one's patch."""
    patches = feats[..., :3 * _PATCH_N].reshape(feats.shape[:-1] + (3, _PATCH_N))
    stats = np.stack([feats[..., 3 * _PATCH_N + 3 * j:3 * _PATCH_N + 3 * j + 3] for j in range(3)], axis=-1)  # (...,3 colours,3 stats)
    order = np.argsort(-stats[..., 0], axis=-1, kind="stable")
    top = np.take_along_axis(stats, order[..., :1, None], axis=-2)[..., 0, :]
    second = np.take_along_axis(stats, order[..., 1:2, None], axis=-2)[..., 0, :]
    patch = np.take_along_axis(patches, order[..., :1, None], axis=-2)[..., 0, :]
    return np.concatenate([top, second, patch], axis=-1)


def colour_means(feats: np.ndarray) -> np.ndarray:
    return feats[..., 3 * _PATCH_N:3 * _PATCH_N + 3]


class SlotStockModel:
    """Per-slot model with the presence model's interface (``predict_proba`` gives
    ``[blue, red, white]``), plus ``predict_slots`` and ``predict_details``."""

    kind = "slots"

    def __init__(self, reference: np.ndarray, geometry: SlotGeometry, mean: np.ndarray, scale: np.ndarray,
                 coef: np.ndarray, intercept: float, colour_scale: np.ndarray, beta: float,
                 thresholds: dict[str, float] | None = None, config: FeatureConfig | None = None,
                 metadata: dict | None = None):
        from factory_assets.vision.model import ModelFormatError

        self.classes = CLASSES
        self.states = SLOT_STATES
        self.slots = SLOTS
        self.config = config or FeatureConfig()
        self.reference = np.asarray(reference, dtype=np.float32)
        self.geometry = geometry
        self.mean = np.asarray(mean, np.float32)
        self.scale = np.asarray(scale, np.float32)
        self.coef = np.asarray(coef, np.float32)
        self.intercept = float(intercept)
        self.colour_scale = np.asarray(colour_scale, np.float32)
        self.beta = float(beta)
        self.thresholds = {c: float((thresholds or {}).get(c, 0.5)) for c in CLASSES}
        self.metadata = dict(metadata or {})
        if self.reference.shape != (WORK_SIZE[1], WORK_SIZE[0]):
            raise ModelFormatError(f"reference has shape {self.reference.shape}")
        if self.coef.shape != (N_OCC_FEATURES,) or self.colour_scale.shape != (len(CLASSES),):
            raise ModelFormatError(f"occupancy weights have shape {self.coef.shape}, expected {(N_OCC_FEATURES,)}")
        self._model_json = {"format": SLOT_FORMAT, "classes": list(CLASSES), "states": list(SLOT_STATES),
                            "slots": list(SLOTS), "config": self.config.to_dict(), "geometry": geometry.to_dict(),
                            "thresholds": self.thresholds, "patch": list(PATCH), "box_fraction": BOX_FRACTION,
                            "occupancy_intercept": self.intercept, "beta": self.beta}
        h = hashlib.sha256()
        for part in self._arrays().values():
            h.update(part)
        self.version: str = h.hexdigest()[:16]

    def _arrays(self) -> dict[str, bytes]:
        return {"model_json.npy": _npy_bytes(_json_array(self._model_json)),
                "reference.npy": _npy_bytes(self.reference), "mean.npy": _npy_bytes(self.mean),
                "scale.npy": _npy_bytes(self.scale), "coef.npy": _npy_bytes(self.coef),
                "colour_scale.npy": _npy_bytes(self.colour_scale)}

    def __repr__(self) -> str:
        return f"SlotStockModel(version={self.version!r})"

    # ---- inference -------------------------------------------------------
    def slot_features(self, images: list[np.ndarray]) -> np.ndarray:
        if not images:
            return np.zeros((0, len(SLOTS), N_FEATURES), np.float32)
        return np.stack([slot_features(aligned_maps(im, self.reference, self.config), self.geometry) for im in images])

    def slot_proba_from_features(self, feats: np.ndarray) -> np.ndarray:
        """``(n, 9, F)`` -> ``(n, 9, 4)`` probabilities of empty / blue / red / white."""
        return _slot_proba(feats, self.mean, self.scale, self.coef, self.intercept, self.colour_scale, self.beta)

    def predict_slot_proba(self, images: list[np.ndarray]) -> np.ndarray:
        return self.slot_proba_from_features(self.slot_features(list(images)))

    @staticmethod
    def presence_from_slots(slot_proba: np.ndarray) -> np.ndarray:
        """``(n, 9, 4)`` -> ``(n, 3)``: P(colour somewhere) as the most confident slot."""
        return slot_proba[:, :, 1:].max(axis=1)

    def predict_proba(self, images: list[np.ndarray]) -> np.ndarray:
        """Presence probabilities, shape (n, 3), columns in ``CLASSES`` order."""
        return self.presence_from_slots(self.predict_slot_proba(images))

    def predict_proba_bytes(self, data: bytes) -> list[float]:
        from factory_assets.vision.model import _decode

        return [float(p) for p in self.predict_proba([_decode(data)])[0]]

    def decide(self, proba: np.ndarray) -> list[dict[str, bool]]:
        t = np.array([self.thresholds[c] for c in CLASSES])
        return [{c: bool(v) for c, v in zip(CLASSES, row >= t)} for row in np.atleast_2d(proba)]

    def predict(self, images: list[np.ndarray]) -> list[dict[str, bool]]:
        return self.decide(self.predict_proba(images))

    def predict_slots(self, images: list[np.ndarray]) -> list[dict[str, dict]]:
        """Per frame: slot -> ``{"state": "empty"|"blue"|..., "type": None|"BLUE"|..., "probability": p}``."""
        return [slots_doc(p) for p in self.predict_slot_proba(images)]

    def predict_details(self, data: bytes) -> dict:
        """One JPEG/PNG frame -> everything a verbose response needs: presence
        probabilities (``[blue, red, white]``), decisions, thresholds and per-slot states."""
        from factory_assets.vision.model import _decode

        sp = self.predict_slot_proba([_decode(data)])
        proba = self.presence_from_slots(sp)[0]
        return {"model_version": self.version, "model_kind": self.kind, "labels": list(CLASSES),
                "probabilities": [float(p) for p in proba], "thresholds": dict(self.thresholds),
                "present": self.decide(proba)[0], "slots": slots_doc(sp[0])}

    # ---- persistence -----------------------------------------------------
    def to_bytes(self) -> bytes:
        entries = dict(self._arrays())
        entries["metadata_json.npy"] = _npy_bytes(_json_array(self.metadata))
        return pack_artifact(entries)

    @classmethod
    def from_npz(cls, npz, meta: dict) -> "SlotStockModel":
        metadata = json.loads(npz["metadata_json"].tobytes().decode("utf-8")) if "metadata_json" in npz.files else {}
        return cls(reference=npz["reference"], geometry=SlotGeometry.from_dict(meta["geometry"]), mean=npz["mean"],
                   scale=npz["scale"], coef=npz["coef"], intercept=meta["occupancy_intercept"],
                   colour_scale=npz["colour_scale"], beta=meta["beta"], thresholds=meta["thresholds"],
                   config=FeatureConfig.from_dict(meta["config"]), metadata=metadata)

    def save(self, model_dir: Path) -> Path:
        from factory_assets.vision.model import save_artifact

        return save_artifact(self, model_dir)


def _slot_proba(feats, mean, scale, coef, intercept, colour_scale, beta) -> np.ndarray:
    feats = np.asarray(feats, np.float64)
    x = (occupancy_features(feats) - mean) / scale
    p_occ = 1.0 / (1.0 + np.exp(-np.clip(x @ np.asarray(coef, np.float64) + intercept, -60, 60)))
    a = beta * colour_means(feats) / np.asarray(colour_scale, np.float64)
    a -= a.max(axis=-1, keepdims=True)
    e = np.exp(a)
    colour = e / e.sum(axis=-1, keepdims=True)
    return np.concatenate([(1.0 - p_occ)[..., None], p_occ[..., None] * colour], axis=-1)


def slots_doc(slot_proba: np.ndarray) -> dict[str, dict]:
    """``(9, 4)`` probabilities -> slot -> state, workpiece type and the state's probability."""
    out = {}
    for s, slot in enumerate(SLOTS):
        k = int(np.argmax(slot_proba[s]))
        out[slot] = {"state": SLOT_STATES[k], "type": STATE_TO_TYPE[k], "probability": round(float(slot_proba[s, k]), 4)}
    return out


# ---------------------------------------------------------------------------
# training


def fit_slot_model(images: list[np.ndarray], states: np.ndarray, seed: int = 0, n_augment: int | None = None,
                   config: FeatureConfig | None = None, geometry: SlotGeometry | None = None,
                   reference: np.ndarray | None = None) -> tuple[SlotStockModel, dict]:
    """Fit on in-memory frames and their slot states ``(n, 9)`` (0 empty, 1 blue, 2 red, 3 white).

    ``geometry`` given (a calibration) is used as it is; else it is learned from the frames.
    BLAS runs single-threaded so the same data and seed give the same model."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return _fit_slot_model(images, np.asarray(states, dtype=int), seed, n_augment, config, geometry, reference)


def _fit_slot_model(images, states, seed, n_augment, config, geometry, reference):
    import time

    from sklearn.linear_model import LogisticRegression

    from factory_assets.vision.features import augment, build_reference
    from factory_assets.vision.fit import DatasetError

    t0 = time.perf_counter()
    cfg = config or FeatureConfig()
    n = len(images)
    if n < 2:
        raise DatasetError("need at least 2 training images")
    if states.shape != (n, len(SLOTS)):
        raise DatasetError(f"slot states have shape {states.shape}, expected {(n, len(SLOTS))}")
    if n_augment is None:  # about 600 training frames for small sets, one extra copy each for big ones
        n_augment = int(np.clip(600 // n, 1, 10))
    rng = np.random.default_rng(seed)
    if reference is None:
        reference = np.round(build_reference(images), 4).astype(np.float32)
    maps = np.stack([aligned_maps(im, reference, cfg) for im in images])
    if geometry is None:
        try:
            geometry = SlotGeometry.fit(maps, states)
        except GeometryError as exc:
            raise DatasetError(f"cannot place the slots: {exc}") from exc
    geometry = SlotGeometry.from_dict(geometry.to_dict())  # the stored precision, so a loaded model predicts the same
    feats = [slot_features(m, geometry) for m in maps]
    ys = [states[i] for i in range(n)]
    original = [True] * n
    for i, img in enumerate(images):
        for _ in range(n_augment):
            # residual shift of what alignment leaves, plus a camera/lighting change
            shift = tuple(rng.uniform(-2.0, 2.0, 2))
            im = augment(img, rng, perspective=0.01) if rng.random() < 0.5 else img
            feats.append(slot_features(aligned_maps(im, reference, cfg, extra_shift=shift), geometry))
            ys.append(states[i])
            original.append(False)
    F = np.concatenate(feats).astype(np.float64)
    Y = np.concatenate(ys)
    X = occupancy_features(F)
    occ = Y > 0
    mean = X.mean(axis=0)
    scale = X.std(axis=0) + 1e-3
    if occ.all() or not occ.any():
        raise DatasetError("every slot of every training frame is " + ("occupied" if occ.all() else "empty") +
                           ": the slot model needs both")
    lr = LogisticRegression(C=0.5, max_iter=3000).fit((X - mean) / scale, occ.astype(int))
    coef, intercept = lr.coef_[0], float(lr.intercept_[0])
    # colour: the typical evidence of each colour's pieces; a colour never seen gets the seen ones' mean
    cm = colour_means(F)
    seen_scale = {k: float(np.median(cm[Y == k + 1, k])) for k in range(len(CLASSES)) if (Y == k + 1).sum() >= 3}
    default = float(np.mean(list(seen_scale.values()))) if seen_scale else 0.15
    colour_scale = np.array([max(seen_scale.get(k, default), 0.02) for k in range(len(CLASSES))])
    z = cm[occ] / colour_scale
    y_col = Y[occ] - 1

    def loglik(beta: float) -> float:
        a = beta * z
        a -= a.max(axis=1, keepdims=True)
        return float((a[np.arange(len(a)), y_col] - np.log(np.exp(a).sum(axis=1))).mean())

    beta = max(BETAS, key=loglik)
    model = SlotStockModel(reference=reference, geometry=geometry, mean=np.round(mean, 5), scale=np.round(scale, 5),
                           coef=np.round(coef, 5), intercept=round(intercept, 5),
                           colour_scale=np.round(colour_scale, 5), beta=beta, config=cfg,
                           metadata={"seed": seed, "n_images": n, "trainer": "LocalTrainer", "kind": "slots"})
    seen = np.unique(Y)
    fit = model.slot_proba_from_features(np.stack(feats[:n]))
    pred = fit.argmax(axis=-1)
    metrics = {
        "seed": seed, "n_images": n, "n_augment_per_image": n_augment, "n_training_vectors": int(len(X)),
        "model_kind": "slots", "geometry": geometry.to_dict(),
        "slot_states_seen": [SLOT_STATES[k] for k in seen],
        "train_fit": {"slot_accuracy": float((pred == states).mean()), "frames_all_slots_right": float((pred == states).all(axis=1).mean())},
        "cv": {"scheme": "none (the dataset's validation split holds out whole stock situations)", "n_folds": 0,
               "out_of_fold": None, "out_of_fold_augmented": None},
        "thresholds": dict(model.thresholds),
        "thresholds_source": "0.5: presence is the most confident slot's probability of the colour",
        "timing_seconds": {"total": round(time.perf_counter() - t0, 3)},
    }
    logger.info("slot model %s: %d frames, slot accuracy on training frames %.3f", model.version, n,
                metrics["train_fit"]["slot_accuracy"])
    return model, metrics
