"""Tables that summarise labels, datasets and evaluations, as pandas DataFrames.

The Dagster layer turns each into a typed table in the UI; benchmark scripts and
the CLI can print or save the same frames. One row per class, source, label
combination or split: small tables, never per-frame data.
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def label_tables(labels: list[dict], classes: tuple | list) -> dict:
    """``per_class`` (present/absent), ``per_source`` and ``per_combination`` frame counts
    of effective label documents (each with ``present`` and ``source``)."""
    import pandas as pd

    from factory_assets.datasets.labels import combination

    if not labels:
        return {"per_class": pd.DataFrame({"class": list(classes), "present": 0, "absent": 0}),
                "per_source": pd.DataFrame({"source": pd.Series(dtype=str), "frames": pd.Series(dtype=int)}),
                "per_combination": pd.DataFrame({"combination": pd.Series(dtype=str),
                                                 "frames": pd.Series(dtype=int)})}
    df = pd.DataFrame([{**{c: bool(lab["present"][c]) for c in classes}, "source": lab["source"],
                        "combination": combination(lab["present"])} for lab in labels])
    present = df[list(classes)].sum().astype(int)
    per_class = pd.DataFrame({"class": list(classes), "present": present.values,
                              "absent": (len(df) - present).values})
    per_source = df.groupby("source").size().rename("frames").reset_index().sort_values("source")
    per_combination = (df.groupby("combination").size().rename("frames").reset_index()
                       .sort_values("combination"))
    return {"per_class": per_class, "per_source": per_source.reset_index(drop=True),
            "per_combination": per_combination.reset_index(drop=True)}


def split_table(counts: dict, classes: tuple | list):
    """One row per split (train, valid): images and the images where each class is present."""
    import pandas as pd

    return pd.DataFrame([{"split": s, "images": int(counts[s]["images"]), **{c: int(counts[s][c]) for c in classes}}
                         for s in ("train", "valid") if s in counts])


def metrics_table(metrics: dict):
    """One row per class of an evaluation (``vision.evaluate``): accuracy, precision,
    recall, f1 and the decision threshold, as floats."""
    import pandas as pd

    return pd.DataFrame([{"class": c, **{k: float(metrics[k][c]) for k in ("accuracy", "precision", "recall", "f1")},
                          "threshold": float(metrics["thresholds"][c])} for c in metrics["classes"]])
