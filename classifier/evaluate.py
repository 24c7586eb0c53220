"""evaluate(config, model, data): score a trained model on a prepared split, with bootstrap CIs, logged to MLflow."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from classifier import tracking
from classifier.config import EvaluateConfig
from classifier.data.dataset import CachedImages, SplitArrays, batched, load_split
from classifier.data.layout import DatasetInfo, read_info
from classifier.data.metadata import encode, from_plain
from classifier.data.transforms import Normalise, flips
from classifier.errors import UserError
from classifier.metrics import BOOTSTRAPPED, bootstrap_intervals, classification_metrics
from classifier.models import model_from_checkpoint
from classifier.plots import write_report
from classifier.train import BEST, amp_dtype, metric_name, predict_batches, resolve_device

RUN_ID = re.compile(r"[0-9a-f]{32}")


@dataclass
class EvaluationResult:
    """The evaluation run, its metrics (accuracy, roc_auc, ...) and 95% intervals of the bootstrapped ones."""

    run_id: str
    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]]


def evaluate(config: EvaluateConfig, model: str, data: Path) -> EvaluationResult:
    """Score `model` (checkpoint file, run id, or MLflow model URI) on `config.split` of the prepared `data`."""
    data = Path(data)
    info, checkpoint, arrays = checkpoint_and_split(model, data, config.split)
    device = resolve_device(config.device)
    labels, probabilities = predict_split(checkpoint, arrays, config.batch_size, device, config.tta)
    thresholds = checkpoint.get("threshold")
    scores = classification_metrics(labels, probabilities, info.classes, thresholds)
    intervals = {}
    if config.bootstrap:
        intervals = bootstrap_intervals(labels, probabilities, info.classes, config.bootstrap, config.seed, thresholds)
    tags = {"classifier.evaluated_model": model, "classifier.data": str(data.resolve())}
    with tracking.start_run(config.experiment, f"evaluate-{config.split}", tags):
        tracking.log_params(
            {
                "evaluated_model": model,
                "evaluated_data": str(data),
                "evaluated_split": config.split,
                "evaluated_tta": config.tta,
            }
        )
        logged = {metric_name(f"{config.split}_{key}"): value for key, value in scores.items()}
        for key, (low, high) in intervals.items():
            logged[f"{config.split}_{key}_ci_low"], logged[f"{config.split}_{key}_ci_high"] = low, high
        tracking.log_metrics(logged)
        with tempfile.TemporaryDirectory() as scratch:
            write_report(Path(scratch), labels, probabilities, info.classes, thresholds)
            tracking.log_artifacts(Path(scratch), "evaluation")
        run_id = tracking.active_run_id()
    return EvaluationResult(run_id, scores, {key: intervals[key] for key in BOOTSTRAPPED if key in intervals})


def checkpoint_and_split(model: str, data: Path, split: str) -> tuple[DatasetInfo, dict[str, Any], SplitArrays]:
    """The prepared `data`'s description, the checkpoint of `model` (checked to fit the data) and `split`'s images."""
    info = read_info(data)
    tracking.connect()
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = load_checkpoint(model, Path(scratch))
    check_fits(checkpoint, model, data, info)
    return info, checkpoint, read_split(data, split)


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


def read_split(data: Path, split: str) -> SplitArrays:
    """The images of `split`, refusing an empty split."""
    arrays = load_split(data, split)
    if len(arrays.labels) == 0:
        raise UserError(f"{data}: the {split} split is empty; pick another with --split")
    return arrays


def checkpoint_loader(
    checkpoint: dict[str, Any],
    arrays: SplitArrays,
    batch_size: int,
    device: torch.device,
    rows: np.ndarray | None = None,
) -> tuple[nn.Module, DataLoader, Callable[[Any], Any]]:
    """The checkpoint's network on `device`, a loader over `rows` of a split (all by default) with the metadata the
    network takes (encoded as in training), and the function that prepares a batch's inputs on the device."""
    preprocessing = checkpoint["preprocessing"]
    network = model_from_checkpoint(checkpoint).to(device)
    normalise = Normalise(preprocessing["mean"], preprocessing["std"]).to(device)
    encodings = from_plain(checkpoint.get("metadata"))
    metadata = encode(arrays.rows, encodings, "manifest.csv") if encodings else None
    loader = DataLoader(CachedImages(arrays, rows, metadata=metadata), batch_size=batch_size, collate_fn=batched)

    def inputs(batch: Any) -> Any:
        if isinstance(batch, tuple):
            return normalise(batch[0].to(device)), batch[1].to(device)
        return normalise(batch.to(device))

    return network, loader, inputs


def predict_split(
    checkpoint: dict[str, Any],
    arrays: SplitArrays,
    batch_size: int,
    device: torch.device,
    tta: bool = False,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and the checkpoint's probabilities (softmax, or sigmoid for multi-label models; averaged over flips
    with `tta`) for `rows` of a split (all by default)."""
    network, loader, inputs = checkpoint_loader(checkpoint, arrays, batch_size, device, rows)
    multi_label = checkpoint.get("task") == "multi_label"
    labels, _, probabilities = predict_batches(
        network, loader, inputs, amp_dtype("auto", device), flips if tta else None, multi_label=multi_label
    )
    return labels, probabilities


def load_checkpoint(model: str, scratch: Path) -> dict[str, Any]:
    """The checkpoint dict behind `model`: a file, a training run's best checkpoint, or a logged model's."""
    if Path(model).is_file():
        path = Path(model)
    elif RUN_ID.fullmatch(model):
        path = tracking.download_artifact(model, f"checkpoints/{BEST}", scratch)
        if path is None:
            raise UserError(f"run {model} has no checkpoints/{BEST}; pass a checkpoint file or a model URI")
    elif ":/" in model:
        found = sorted(tracking.download_model(model, scratch).rglob("*.pt"))
        if not found:
            raise UserError(f"{model}: holds no checkpoint (.pt); pass a model logged by `classifier train`")
        path = found[0]
    else:
        raise UserError(f"{model}: not a checkpoint file, run id or MLflow model URI (models:/NAME@alias, runs:/...)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"{model}: not a checkpoint written by `classifier train` ({type(error).__name__})") from error
