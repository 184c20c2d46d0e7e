"""Registered models as objects: the registry (storage) keeps artifact bytes, vision
turns them back into a model. The one place that joins the two for serving and checks."""
from __future__ import annotations


def load_model(fdb, version: str):
    """The registered model ``version``, deserialised (a presence or a per-slot model)."""
    from factory_assets.storage.models import load_model_bytes
    from factory_assets.vision.model import StockModel

    return StockModel.from_bytes(load_model_bytes(fdb, version))
