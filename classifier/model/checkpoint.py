"""Checkpoints as the logged model reads them: read, checked against a dataset, rebuilt into a network. No tracking:
the served model imports this."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from classifier.config import ThresholdRule
from classifier.data.layout import DatasetInfo
from classifier.errors import UserError
from classifier.nets.ensemble import ENSEMBLE, ensemble_from_checkpoint
from classifier.nets.models import model_from_checkpoint

BEST = "best.pt"  # a training run's best checkpoint, as saved locally and logged under checkpoints/
INFERENCE_KEYS = ("architecture", "num_classes", "in_chans", "state_dict", "classes", "preprocessing", "threshold")


def network_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    """Rebuild the network a checkpoint describes, an ensemble or a single one, in eval mode."""
    if checkpoint["architecture"] == ENSEMBLE:
        return ensemble_from_checkpoint(checkpoint)
    return model_from_checkpoint(checkpoint)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint dict (tensors and plain values only) and check it carries what inference needs."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint; pass a checkpoint file or an MLflow model URI") from None
    except Exception as error:
        raise UserError(f"{path}: not a readable checkpoint ({error}); pass a file written by training") from error
    missing = [key for key in INFERENCE_KEYS if key not in checkpoint] if isinstance(checkpoint, dict) else ["all"]
    if missing:
        raise UserError(
            f"{path}: not a classifier checkpoint (missing {', '.join(missing)}); pass one written by training"
        )
    return checkpoint


def check_fits(checkpoint: dict[str, Any], model: str, data: Path, info: DatasetInfo) -> None:
    """Refuse a model trained on other classes, image size or channels than the prepared `data`."""
    if list(checkpoint["classes"]) != list(info.classes):
        raise UserError(f"{model}: trained on classes {checkpoint['classes']}, but {data} has {info.classes}")
    preprocessing = checkpoint["preprocessing"]
    if (preprocessing["size"], preprocessing["channels"]) != (info.size, info.channels):
        raise UserError(
            f"{model}: expects {preprocessing['size']} px, {preprocessing['channels']} channel(s); {data} has "
            f"{info.size} px, {info.channels}; prepare the data with the model's size and channels"
        )


def stored_threshold_rule(checkpoint: dict[str, Any]) -> ThresholdRule:
    """The rule the checkpoint's threshold was chosen by; models from before `threshold_rule` record a
    `target_recall` (recall:R) or none (max F1)."""
    if checkpoint.get("threshold_rule"):
        return ThresholdRule.parse(checkpoint["threshold_rule"])
    target_recall = (checkpoint.get("config") or {}).get("target_recall")
    return ThresholdRule("max_f1") if target_recall is None else ThresholdRule("recall", float(target_recall))
