"""cross_validate(config, data): one parent run, one nested fit per prepared fold, mean/std and out-of-fold report."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from classifier import tracking
from classifier.config import TrainConfig
from classifier.console import progress
from classifier.data.dataset import fit_indices, load_split
from classifier.data.layout import positive_index, read_info
from classifier.errors import UserError
from classifier.learn.device import resolve_device
from classifier.learn.inference import predict_split
from classifier.learn.train import config_dict, fit, metric_name
from classifier.measure.metrics import classification_metrics
from classifier.measure.plots import write_report


@dataclass
class CVResult:
    """The parent run, its fold runs, and the mean and std over folds of each fold's best-epoch validation metrics
    (keyed val_*, logged on the parent as best_val_*_mean and best_val_*_std)."""

    run_id: str
    fold_run_ids: list[str]
    mean: dict[str, float]
    std: dict[str, float]
    out_of_fold: dict[str, float]


def cross_validate(
    config: TrainConfig,
    data: Path,
    *,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, Any] | None = None,
    log_model: bool = False,
) -> CVResult:
    """Fit each fold of a `--folds K` dataset in a child run of one parent run that summarises them."""
    data = Path(data)
    info = read_info(data)
    if not info.folds:
        raise UserError(f"{data}: has no folds; prepare it with `classifier prepare --folds K` to cross-validate")
    tracking.connect()
    training = load_split(data, "training", config.cache)
    device = resolve_device(config.device)
    labels = np.empty_like(training.labels)
    probabilities = np.empty((len(training.labels), len(info.classes)), dtype=np.float32)
    thresholds = np.full(probabilities.shape if info.task == "multi_label" else len(labels), np.nan)
    positive = None
    with tracking.start_run(
        config.experiment, run_name or "cv", {**(tags or {}), "classifier.cv": "parent"}, parent_run_id
    ):
        parent = tracking.active_run_id()
        tracking.log_params({**config_dict(config), "folds": info.folds, "data_fingerprint": info.fingerprint})
        results = []
        for fold in progress(range(info.folds), desc="folds", unit="fold"):
            result = fit(config, data, parent_run_id=parent, run_name=f"fold-{fold}", fold=fold, log_model=log_model)
            results.append(result)
            rows = fit_indices(info, training, fold)[1]
            checkpoint = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
            labels[rows], probabilities[rows] = predict_split(
                checkpoint, training, config.batch_size * 2, device, rows=rows
            )
            thresholds[rows] = fold_thresholds(checkpoint)
            positive = positive_index(info.classes, checkpoint.get("positive_class"), info.task)
        keys = [key for key in results[0].best_metrics if key.startswith("val_")]
        values = {key: np.array([result.best_metrics[key] for result in results]) for key in keys}
        mean = {key: float(np.nanmean(value)) for key, value in values.items()}
        std = {key: float(np.nanstd(value, ddof=1)) for key, value in values.items()}
        decided = None if np.isnan(thresholds).all() else thresholds  # each image at its own fold model's threshold
        out_of_fold = classification_metrics(labels, probabilities, info.classes, decided, positive)
        summary = {f"best_{key}_mean": value for key, value in mean.items()}  # of each fold's best epoch, as named
        summary.update({f"best_{key}_std": value for key, value in std.items()})
        summary.update({metric_name(f"oof_{key}"): value for key, value in out_of_fold.items()})
        tracking.log_metrics(summary)
        with tempfile.TemporaryDirectory() as scratch:
            shows = f"out-of-fold ({info.folds} folds), run {tracking.active_run_name()}"
            write_report(Path(scratch), labels, probabilities, info.classes, decided, positive, shows)
            tracking.log_artifacts(Path(scratch), "out_of_fold")
    return CVResult(parent, [result.run_id for result in results], mean, std, out_of_fold)


def fold_thresholds(checkpoint: dict[str, Any]) -> float | list[float]:
    """The decision threshold(s) a fold's model decides with; without one, the rule it falls back to (0.5: argmax for
    two classes, the default of each class for multi-label data; nan, argmax, for more classes)."""
    threshold = checkpoint.get("threshold")
    if threshold is not None:
        return threshold
    return 0.5 if checkpoint.get("task") == "multi_label" or int(checkpoint["num_classes"]) == 2 else np.nan
