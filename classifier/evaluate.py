"""evaluate(config, model, data): score a trained model on a prepared split, with bootstrap CIs, logged to MLflow."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from classifier import tracking
from classifier.config import EvaluateConfig
from classifier.data.dataset import CachedImages, batched, load_split
from classifier.data.layout import read_info
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
    info = read_info(data)
    tracking.connect()
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = load_checkpoint(model, Path(scratch))
    if list(checkpoint["classes"]) != list(info.classes):
        raise UserError(f"{model}: trained on classes {checkpoint['classes']}, but {data} has {info.classes}")
    preprocessing = checkpoint["preprocessing"]
    if (preprocessing["size"], preprocessing["channels"]) != (info.size, info.channels):
        raise UserError(
            f"{model}: expects {preprocessing['size']} px, {preprocessing['channels']} channel(s); {data} has "
            f"{info.size} px, {info.channels}; prepare the data with the model's size and channels"
        )
    arrays = load_split(data, config.split)
    if len(arrays.labels) == 0:
        raise UserError(f"{data}: the {config.split} split is empty; pick another with --split")
    device = resolve_device(config.device)
    network = model_from_checkpoint(checkpoint).to(device)
    normalise = Normalise(preprocessing["mean"], preprocessing["std"]).to(device)
    loader = DataLoader(CachedImages(arrays), batch_size=config.batch_size, collate_fn=batched)
    labels, _, probabilities = predict_batches(
        network,
        loader,
        lambda images: normalise(images.to(device)),
        amp_dtype("auto", device),
        flips if config.tta else None,
    )
    scores = classification_metrics(labels, probabilities, info.classes)
    intervals = {}
    if config.bootstrap:
        intervals = bootstrap_intervals(labels, probabilities, info.classes, config.bootstrap, config.seed)
    tags = {"classifier.evaluated_model": model, "classifier.data": str(data.resolve())}
    with tracking.start_run(config.experiment, f"evaluate-{config.split}", tags):
        tracking.log_params({"model": model, "data": str(data), "split": config.split, "tta": config.tta})
        logged = {metric_name(f"{config.split}_{key}"): value for key, value in scores.items()}
        for key, (low, high) in intervals.items():
            logged[f"{config.split}_{key}_ci_low"], logged[f"{config.split}_{key}_ci_high"] = low, high
        tracking.log_metrics(logged)
        with tempfile.TemporaryDirectory() as scratch:
            write_report(Path(scratch), labels, probabilities, info.classes)
            tracking.log_artifacts(Path(scratch), "evaluation")
        run_id = tracking.active_run_id()
    return EvaluationResult(run_id, scores, {key: intervals[key] for key in BOOTSTRAPPED if key in intervals})


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
