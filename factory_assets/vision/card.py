"""Model cards: the ``MODEL_CARD.md`` written next to a trained model, from the model and
its training metrics (``vision.fit`` / ``vision.slots``)."""
from __future__ import annotations

from factory_assets.vocabulary import CLASSES
from factory_assets.vision.model import ARTIFACT_NAME, StockModel


def card_for(model, metrics: dict) -> str:
    """The card of either model kind (``metrics["model_kind"]``: ``slots`` or ``presence``)."""
    return slot_model_card(model, metrics) if metrics.get("model_kind") == "slots" else model_card(model, metrics)


def slot_model_card(model, metrics: dict) -> str:
    g = model.geometry
    centres = ", ".join(f"{s} ({x:.0f}, {y:.0f})" for s, (x, y) in g.in_image().items())
    return f"""# Stock model {model.version} (per slot)

Classifies each of the nine rack slots (A1..C3) as empty / blue / red / white from one
camera frame; colour presence (blue, red, white) is the most confident slot's probability.

## Data
Train split of `{metrics['dataset']['dir']}`: {metrics['n_images']} frames with per-slot labels
(`train-annots/train.slots`), {metrics['n_augment_per_image']} augmented copies each; states seen:
{", ".join(metrics['slot_states_seen'])}. The validation split holds out whole stock situations.

## Slot geometry (learned from the labelled frames)
Lattice origin {g.origin}, column step {g.u}, row step {g.v} (160x120 work image);
slot centres in a 320x240 frame: {centres}.

## Training fit
slot accuracy {metrics['train_fit']['slot_accuracy']:.3f}, frames with all nine slots right
{metrics['train_fit']['frames_all_slots_right']:.3f}; training time {metrics['timing_seconds']['total']:.1f} s.

## Limits
Fixed camera: small shifts are registered away; a moved camera or rebuilt rack needs a
retraining on a few labelled frames (the geometry is re-learned from them).
"""


def model_card(model: StockModel, metrics: dict) -> str:
    oof = metrics["cv"]["out_of_fold"] or {}
    aug = metrics["cv"]["out_of_fold_augmented"] or {}
    th = ", ".join(f"{c} {t:.3f}" for c, t in model.thresholds.items())
    return f"""# Stock model {model.version}

Predicts which stock colours ({", ".join(CLASSES)}) are present in the
warehouse rack from one camera frame (multi-label).

## Data
Train split of `{metrics['dataset']['dir']}` (`train-annots/train.lst`):
{metrics['n_images']} images, {metrics['n_scenes']} scenes, {metrics['n_augment_per_image']}
augmented copies per image (shift, rotation, zoom, exposure, contrast, white
balance, noise). The validation split was not used for training or thresholds.

## Method
Frames are shrunk to 160x120, gray-world normalised and turned into three
colour-evidence maps (blue: b* < 0; red: crimson a* minus yellow; white: bright,
low chroma). The frame is aligned to a reference view by phase correlation of
gradient images, maps are pooled into {model.config.cell}x{model.config.cell}-pixel cells with a per-class
max filter ({", ".join(f"{c} {model.config.class_pool(i)}x{model.config.class_pool(i)}" for i, c in enumerate(model.classes))}) and standardised. Per class, a spatial matched filter
(mean present - mean absent) and a 1-D logistic calibration. The white-evidence
thresholds (L* > {model.config.white_l:g}, chroma scale {model.config.white_chroma:g}), the max-filter sizes and the
matched-filter cuts ({", ".join(f"{c} {k:g}" for c, k in (metrics.get("matched_filter_keep") or {}).items())}) were chosen by the same
cross-validation (original frames and augmented copies of held-out scenes). Artifact:
`{ARTIFACT_NAME}` (numpy arrays + JSON, no pickle). Seed {metrics['seed']}.

## Cross-validation ({metrics['cv']['scheme']}, {metrics['cv']['n_folds']} folds)
- out-of-fold per-label accuracy {oof.get('per_label_accuracy', float('nan')):.3f},
  exact match {oof.get('exact_match', float('nan')):.3f} (original frames)
- on augmented copies: per-label accuracy {aug.get('per_label_accuracy', float('nan')):.3f},
  exact match {aug.get('exact_match', float('nan')):.3f}
- thresholds (chosen on out-of-fold probabilities): {th}
- training time {metrics['timing_seconds']['total']:.1f} s

## Limits
- Learns *where* each colour sits on the rack: it assumes a fixed camera (small
  shifts are registered away; big moves, zoom or a rebuilt rack need retraining).
- Trained on very few real photos (one camera position); other lighting, other
  stock positions or partially hidden pieces may be misread.
- Presence only: no counts, no slot positions.
"""
