"""The ``train`` entry point: the channels ``train``/``train_lst`` (and, when given,
``validation``/``validation_lst``) become a dataset in our layout, our trainer fits
the model into ``/opt/ml/model`` (artifact, ``metrics.json``, model card, and
``evaluation.json`` on the validation channel). Any failure writes its reason to
``/opt/ml/output/failure`` (SageMaker shows it as the job's FailureReason) and exits 1."""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from factory_assets.container.paths import MLPaths

logger = logging.getLogger(__name__)

FAILURE_LIMIT = 1024  # SageMaker keeps the first 1024 characters of the failure file


class ChannelError(ValueError):
    pass


def read_hyperparameters(paths: MLPaths) -> dict:
    """SageMaker writes every hyperparameter as a string."""
    if not paths.hyperparameters.is_file():
        return {}
    data = json.loads(paths.hyperparameters.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ChannelError(f"{paths.hyperparameters}: expected an object of string values")
    return data


def _lst_in(channel: Path) -> Path:
    found = sorted(channel.rglob("*.lst"))
    if len(found) != 1:
        raise ChannelError(f"channel {channel.name} must hold exactly one .lst file, found {len(found)}")
    return found[0]


def assemble_dataset(paths: MLPaths, dest: Path) -> Path:
    """Link the channels into the layout our trainer reads (no copies)."""
    dest.mkdir(parents=True, exist_ok=True)
    for channel, split in (("train", "train"), ("validation", "valid")):
        images, lst_channel = paths.channel(channel), paths.channel(f"{channel}_lst")
        if not images.is_dir():
            if channel == "train":
                raise ChannelError(f"channel 'train' is missing ({images})")
            continue
        if not lst_channel.is_dir():
            raise ChannelError(f"channel '{channel}_lst' is missing ({lst_channel})")
        (dest / f"{split}-imgs").symlink_to(images.resolve(), target_is_directory=True)
        (dest / f"{split}-annots").mkdir()
        (dest / f"{split}-annots" / f"{split}.lst").symlink_to(_lst_in(lst_channel).resolve())
    return dest


def run(paths: MLPaths) -> int:
    try:
        hp = read_hyperparameters(paths)
        seed = int(hp.get("seed", "0"))
        options = {"n_augment": int(hp["n_augment"])} if "n_augment" in hp else {}
        from factory_assets.backends.local import LocalBackendTrainer

        with tempfile.TemporaryDirectory(prefix="dataset-") as tmp:
            dataset = assemble_dataset(paths, Path(tmp) / "dataset")
            result = LocalBackendTrainer(**options).train(dataset, paths.model_dir, seed=seed)
            summary = {"model_version": result.version, "seed": seed}
            if (dataset / "valid-imgs").exists():
                from factory_assets.backends.local import evaluate

                summary["valid"] = evaluate(result.model, dataset, "valid")
            (paths.model_dir / "evaluation.json").write_text(json.dumps(summary, indent=2, default=str) + "\n",
                                                             encoding="utf-8")
        logger.info("model %s written to %s", result.version, paths.model_dir)
        return 0
    except Exception as exc:  # the contract: the reason goes to /opt/ml/output/failure, exit non-zero
        reason = f"{exc.__class__.__name__}: {exc}"
        logger.exception("training failed: %s", reason)
        paths.output_dir.mkdir(parents=True, exist_ok=True)
        paths.failure.write_text(reason[:FAILURE_LIMIT], encoding="utf-8")
        return 1
