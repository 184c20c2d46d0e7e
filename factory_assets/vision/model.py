"""The local stock model: which of blue / red / white pieces are in the rack.

A model is small and pickle-free: a single ``.npz`` (numpy arrays only, no
object arrays) holding

* ``model_json``    - UTF-8 JSON (as uint8): format (``/1``, or ``/2`` when the feature
  config uses the affine normalisation or blur of ``features``), classes, feature config,
  per-class logistic calibration, thresholds;
* ``reference``     - (120, 160) float32 gradient image the frames are aligned to;
* ``weights``       - (3, n_cells) float32 spatial matched filter per class;
* ``metadata_json`` - UTF-8 JSON (as uint8): training metadata (not hashed).

``version`` is the SHA-256 (first 16 hex digits) of the predictive content -
model_json, reference and weights - so the same training run (same data, same
seed) always gives the same version, and any change of parameters or thresholds
gives a new one.

Scoring: for class c, ``p_c = sigmoid(coef_c * <weights_c, features_c(frame)> + intercept_c)``
and the class is present when ``p_c >= thresholds[c]``.
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from factory_assets.vocabulary import CLASSES
from factory_assets.vision.features import WORK_SIZE, FeatureConfig, extract

ARTIFACT_NAME = "stock_model.npz"
FORMAT = "factory-assets-stock-model/1"  # features as the first models (``FeatureConfig.is_v1``)
FORMAT_V2 = "factory-assets-stock-model/2"  # + FeatureConfig.normalise / blur; readers of /1 must refuse it
FORMATS = (FORMAT, FORMAT_V2)
SLOT_FORMAT = "factory-assets-slot-model/1"  # vision.slots.SlotStockModel; from_bytes/load read both
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed, so the artifact bytes are reproducible


class ModelFormatError(ValueError):
    """The bytes or folder do not hold a stock model this code can read."""


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _json_array(obj: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8"), dtype=np.uint8)


def pack_artifact(entries: dict[str, bytes]) -> bytes:
    """``.npy`` entries -> a reproducible ``.npz`` (fixed dates and modes), for either model kind."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, payload in entries.items():
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, payload)
    return buf.getvalue()


class StockModel:
    """Multi-label presence model; see the module docstring for the maths."""

    def __init__(self, reference: np.ndarray, weights: np.ndarray, calibration: np.ndarray,
                 thresholds: dict[str, float], config: FeatureConfig | None = None,
                 metadata: dict | None = None, classes: tuple[str, ...] = CLASSES):
        self.classes = tuple(classes)
        self.config = config or FeatureConfig()
        self.reference = np.asarray(reference, dtype=np.float32)
        self.weights = np.asarray(weights, dtype=np.float32)
        self.calibration = np.asarray(calibration, dtype=np.float64).reshape(len(self.classes), 2)
        self.thresholds = {c: float(thresholds[c]) for c in self.classes}
        self.metadata = dict(metadata or {})
        rows, cols = self.config.grid
        if self.reference.shape != (WORK_SIZE[1], WORK_SIZE[0]):
            raise ModelFormatError(f"reference has shape {self.reference.shape}, expected {(WORK_SIZE[1], WORK_SIZE[0])}")
        if self.weights.shape != (len(self.classes), rows * cols):
            raise ModelFormatError(f"weights have shape {self.weights.shape}, expected {(len(self.classes), rows * cols)}")
        self._model_json = {
            "format": FORMAT if self.config.is_v1 else FORMAT_V2,
            "classes": list(self.classes),
            "config": self.config.to_dict(),
            "calibration": [[float(a), float(b)] for a, b in self.calibration],
            "thresholds": self.thresholds,
        }
        h = hashlib.sha256()
        for part in (_npy_bytes(_json_array(self._model_json)), _npy_bytes(self.reference), _npy_bytes(self.weights)):
            h.update(part)
        self.version: str = h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"StockModel(version={self.version!r}, thresholds={self.thresholds})"

    # ---- inference -------------------------------------------------------
    def features(self, images: list[np.ndarray]) -> np.ndarray:
        """(n, 3, n_cells) features of BGR frames."""
        return np.stack([extract(im, self.reference, self.config) for im in images]) if images else \
            np.zeros((0, len(self.classes), self.weights.shape[1]), np.float32)

    def proba_from_features(self, feats: np.ndarray) -> np.ndarray:
        scores = np.einsum("ncf,cf->nc", feats.astype(np.float64), self.weights.astype(np.float64))
        z = scores * self.calibration[:, 0] + self.calibration[:, 1]
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))

    def predict_proba(self, images: list[np.ndarray]) -> np.ndarray:
        """Probabilities, shape (n, 3), columns in ``CLASSES`` order."""
        return self.proba_from_features(self.features(list(images)))

    def predict_proba_bytes(self, data: bytes) -> list[float]:
        """One JPEG/PNG frame as bytes -> [p_blue, p_red, p_white]. Raises
        ``ImageDecodeError`` (a ``ValueError``) on bytes that are not an image."""
        return [float(p) for p in self.predict_proba([_decode(data)])[0]]

    kind = "presence"

    def predict_details(self, data: bytes) -> dict:
        """One frame -> probabilities ``[blue, red, white]``, decisions, thresholds;
        ``slots`` is None (a presence model does not see slots; ``SlotStockModel`` fills it)."""
        proba = np.array(self.predict_proba_bytes(data))
        return {"model_version": self.version, "model_kind": self.kind, "labels": list(self.classes),
                "probabilities": [float(p) for p in proba], "thresholds": dict(self.thresholds),
                "present": self.decide(proba)[0], "slots": None}

    def decide(self, proba: np.ndarray) -> list[dict[str, bool]]:
        t = np.array([self.thresholds[c] for c in self.classes])
        return [{c: bool(v) for c, v in zip(self.classes, row >= t)} for row in np.atleast_2d(proba)]

    def predict(self, images: list[np.ndarray]) -> list[dict[str, bool]]:
        return self.decide(self.predict_proba(images))

    # ---- persistence -----------------------------------------------------
    def to_bytes(self) -> bytes:
        return pack_artifact({
            "model_json.npy": _npy_bytes(_json_array(self._model_json)),
            "reference.npy": _npy_bytes(self.reference),
            "weights.npy": _npy_bytes(self.weights),
            "metadata_json.npy": _npy_bytes(_json_array(self.metadata)),
        })

    @classmethod
    def from_bytes(cls, data: bytes) -> "StockModel":  # or a SlotStockModel, by the artifact's format
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                meta = json.loads(npz["model_json"].tobytes().decode("utf-8"))
                if meta.get("format") == SLOT_FORMAT:  # the per-slot model: same container, its own format
                    from factory_assets.vision.slots import SlotStockModel

                    return SlotStockModel.from_npz(npz, meta)
                reference = npz["reference"]
                weights = npz["weights"]
                metadata = json.loads(npz["metadata_json"].tobytes().decode("utf-8")) if "metadata_json" in npz.files else {}
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise ModelFormatError(f"not a stock model artifact: {exc}") from exc
        if meta.get("format") not in FORMATS:
            raise ModelFormatError(f"unsupported model format {meta.get('format')!r} (expected one of {FORMATS})")
        return cls(reference=reference, weights=weights, calibration=np.array(meta["calibration"]),
                   thresholds=meta["thresholds"], config=FeatureConfig.from_dict(meta["config"]),
                   metadata=metadata, classes=tuple(meta["classes"]))

    def save(self, model_dir: Path) -> Path:
        return save_artifact(self, model_dir)

    @classmethod
    def load(cls, model_dir: Path) -> "StockModel":  # or a SlotStockModel, by the artifact's format
        model_dir = Path(model_dir)
        path = model_dir if model_dir.is_file() else model_dir / ARTIFACT_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no stock model at {path}")
        return cls.from_bytes(path.read_bytes())


def _decode(data: bytes) -> np.ndarray:
    try:
        from factory_assets.vision.decode import decode_image
    except ImportError:  # pragma: no cover - decode.py is another module's job
        import cv2

        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
        if img is None:
            raise ValueError("bytes could not be decoded as an image")
        return img
    return decode_image(data)


def save_artifact(model, model_dir: Path) -> Path:
    """``model.to_bytes()`` to ``model_dir/ARTIFACT_NAME``, atomically (either model kind)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / ARTIFACT_NAME
    tmp = path.with_suffix(".npz.tmp")
    tmp.write_bytes(model.to_bytes())
    tmp.replace(path)
    return path
